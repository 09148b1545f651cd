"""A fast, deterministic synthetic phase-contrast cell dataset in the Kaggle Sartorius format.

``generate(out_dir)`` writes ``out_dir/train.csv`` (one row per mask, Kaggle RLE:
1-based starts, row-major) and ``out_dir/train/<id>.png`` (8-bit grayscale), so every
reader, adapter and metric of the harness can run end to end without the real data.

What it imitates (calibrated on real Sartorius annotations and PNGs):

* three cell types, one per image: ``shsy5y`` (dense, ~30-780 cells per 704x520 image,
  median area ~196 px, elongated and irregular, some with a short neurite), ``astro``
  (few, large: median ~557 px, a body plus 2-5 long thin curved processes, up to ~7000 px)
  and ``cort`` (sparse, small and roundish, median ~203 px);
* images grouped into samples (the same well at 2-4 plate times share ``sample_id``
  and cell type);
* instance masks are independent (not a label image): touching cells overlap by a
  few percent of the foreground pixels, as in the real annotations; every mask is one
  4-connected region of at least 8 px, clipped at the image border;
* the image: a flat grey background at mean 128 with weak sensor noise, a very gentle
  low-frequency illumination gradient, slightly dark textured cell interiors with a dark
  inner rim and a bright outer halo (the phase-contrast look), bright borders between
  touching cells, and unannotated debris (dark granules with halos);
* each cell is drawn inside its own bounding-box crop, so 100 full-size images take a
  few seconds.

Same seed -> byte-identical csv and PNGs (one ``SeedSequence`` per image).
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REF_W, REF_H = 704, 520
CSV_COLUMNS = ["id", "annotation", "width", "height", "cell_type", "plate_time", "sample_date", "sample_id",
               "elapsed_timedelta"]
CELL_TYPES = ("shsy5y", "astro", "cort")
TYPE_MIX = (0.25, 0.22, 0.53)  # real train set: 155 / 131 / 320 of 606 images
MIN_AREA = 8
_SAMPLE_PREFIX = {"shsy5y": "shsy5y[diff_from_D4]", "astro": "astro[hippo]", "cort": "cort[pre-treatment]"}


@dataclass(frozen=True)
class CellParams:
    n_median: float          # instances per 704x520 image (lognormal median) ...
    n_sigma: float
    n_range: tuple[int, int]  # ... clipped to this range before area scaling
    area_median: float       # target mask area (lognormal), before border clipping
    area_sigma: float
    area_max: float
    aspect: tuple[float, float]   # minor/major axis ratio of the body
    harmonics: float         # amplitude of the radial low-frequency perturbations
    bend: float              # max banana bend of the body
    p_process: float         # probability that a cell has processes
    n_process: tuple[int, int]
    process_frac: tuple[float, float]  # fraction of the area in processes
    process_radius: tuple[float, float]
    clustered: float         # fraction of cells placed around cluster centres
    cluster_sigma: tuple[float, float]
    max_overlap: float       # largest accepted overlap (fraction of the new mask)
    p_touch: float           # probability a cell may overlap up to max_overlap (else ~1%)
    interior: tuple[float, float]  # grey offset of the interior (mean, sd)
    texture: float
    halo: float
    border: float
    debris: float            # debris granules per 704x520 image


PARAMS = {
    "shsy5y": CellParams(
        n_median=300, n_sigma=0.6, n_range=(30, 780), area_median=205, area_sigma=0.55, area_max=1700,
        aspect=(0.3, 0.65), harmonics=0.16, bend=0.35, p_process=0.35, n_process=(1, 2),
        process_frac=(0.1, 0.25), process_radius=(1.0, 1.4), clustered=0.75, cluster_sigma=(25, 70),
        max_overlap=0.15, p_touch=0.6, interior=(-10.0, 4.0), texture=8.0, halo=140.0, border=22.0, debris=60),
    "astro": CellParams(
        n_median=55, n_sigma=0.6, n_range=(5, 130), area_median=560, area_sigma=0.85, area_max=7200,
        aspect=(0.25, 0.6), harmonics=0.12, bend=0.2, p_process=1.0, n_process=(2, 5),
        process_frac=(0.12, 0.35), process_radius=(1.2, 2.0), clustered=0.5, cluster_sigma=(40, 110),
        max_overlap=0.2, p_touch=0.6, interior=(-7.0, 3.0), texture=6.0, halo=125.0, border=15.0, debris=40),
    "cort": CellParams(
        n_median=32, n_sigma=0.5, n_range=(10, 100), area_median=205, area_sigma=0.45, area_max=1500,
        aspect=(0.6, 0.95), harmonics=0.07, bend=0.1, p_process=0.1, n_process=(1, 1),
        process_frac=(0.08, 0.18), process_radius=(1.0, 1.2), clustered=0.5, cluster_sigma=(10, 40),
        max_overlap=0.15, p_touch=0.8, interior=(-10.0, 5.0), texture=5.0, halo=160.0, border=20.0, debris=35),
}

# A stand-in for LIVECell (a second dataset to pretrain on, which cellbench cannot download):
# other cell types with other shapes and densities, written in COCO format as LIVECell is.
# Not LIVECell: no claim about transfer to real LIVECell follows from it.
LIVECELL_TYPES = ("a172", "bv2", "skov3")
PARAMS.update({
    "a172": CellParams(   # large, flat, irregular, spread processes
        n_median=60, n_sigma=0.5, n_range=(10, 160), area_median=900, area_sigma=0.6, area_max=6000,
        aspect=(0.4, 0.8), harmonics=0.22, bend=0.2, p_process=0.7, n_process=(1, 3),
        process_frac=(0.1, 0.25), process_radius=(1.2, 1.8), clustered=0.4, cluster_sigma=(40, 100),
        max_overlap=0.1, p_touch=0.5, interior=(-6.0, 3.0), texture=7.0, halo=110.0, border=15.0, debris=30),
    "bv2": CellParams(    # small, round, dense microglia
        n_median=450, n_sigma=0.5, n_range=(80, 900), area_median=110, area_sigma=0.35, area_max=500,
        aspect=(0.75, 1.0), harmonics=0.05, bend=0.05, p_process=0.05, n_process=(1, 1),
        process_frac=(0.05, 0.1), process_radius=(1.0, 1.1), clustered=0.6, cluster_sigma=(20, 60),
        max_overlap=0.1, p_touch=0.7, interior=(-12.0, 4.0), texture=4.0, halo=170.0, border=25.0, debris=50),
    "skov3": CellParams(  # medium, elongated, bent
        n_median=150, n_sigma=0.5, n_range=(20, 400), area_median=450, area_sigma=0.5, area_max=2500,
        aspect=(0.25, 0.5), harmonics=0.12, bend=0.4, p_process=0.2, n_process=(1, 2),
        process_frac=(0.08, 0.2), process_radius=(1.0, 1.3), clustered=0.7, cluster_sigma=(30, 80),
        max_overlap=0.12, p_touch=0.6, interior=(-8.0, 4.0), texture=6.0, halo=130.0, border=18.0, debris=40),
})
_SAMPLE_PREFIX.update({t: f"livecell-like[{t}]" for t in LIVECELL_TYPES})
STYLES = {"sartorius": (CELL_TYPES, TYPE_MIX), "livecell": (LIVECELL_TYPES, (0.34, 0.33, 0.33))}


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def generate(out_dir: str | Path, n_images: int = 100, size: tuple[int, int] = (704, 520), seed: int = 0,
             style: str = "sartorius") -> Path:
    """Writes out_dir/train.csv and out_dir/train/<id>.png; returns out_dir.

    ``style="livecell"``: the LIVECell stand-in (other cell types and shapes), written as
    LIVECell is, in COCO format: ``out_dir/livecell_like.json`` and ``out_dir/images/<id>.png``.
    """
    from PIL import Image

    if style not in STYLES:
        raise ValueError(f"unknown synthetic style {style!r} (one of {', '.join(STYLES)})")

    out_dir = Path(out_dir)
    width, height = int(size[0]), int(size[1])
    if n_images < 1:
        raise ValueError("n_images must be >= 1")
    if width < 8 or height < 8:
        raise ValueError(f"size {width}x{height} too small (want at least 8x8)")
    img_dir = out_dir / ("train" if style == "sartorius" else "images")
    img_dir.mkdir(parents=True, exist_ok=True)

    plan = _plan(n_images, seed, style)
    rows: list[tuple[str, list[str], dict]] = []
    for i, meta in enumerate(plan):
        iid = image_id(seed, i, style)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        img, masks = render_image(rng, meta["cell_type"], width, height, meta["density"])
        Image.fromarray(img, mode="L").save(img_dir / f"{iid}.png", compress_level=3)
        rows.append((iid, [_kaggle_rle_crop(m, y0, x0, width) for y0, x0, m in masks], meta))

    rows.sort(key=lambda r: r[0])  # Kaggle's train.csv is ordered by id
    if style != "sartorius":
        _write_coco(out_dir / "livecell_like.json", rows, width, height, STYLES[style][0])
        return out_dir
    with open(out_dir / "train.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for iid, anns, meta in rows:
            tail = [meta["plate_time"], meta["sample_date"], meta["sample_id"], meta["elapsed_timedelta"]]
            for a in anns:
                w.writerow([iid, a, width, height, meta["cell_type"], *tail])
    return out_dir


def image_id(seed: int, index: int, style: str = "sartorius") -> str:
    """12 hex chars, deterministic from (seed, index) (and the style, other than the default)."""
    key = f"cellbench-synth:{seed}:{index}" + ("" if style == "sartorius" else f":{style}")
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _write_coco(path: Path, rows, width: int, height: int, types: tuple[str, ...]) -> None:
    """LIVECell's layout: one COCO instance json, compressed RLE segmentations, overlap kept."""
    import json

    from bench.data import rle

    cat = {t: k + 1 for k, t in enumerate(types)}
    images, annos = [], []
    for n, (iid, anns, meta) in enumerate(rows, start=1):
        images.append({"id": n, "file_name": f"{iid}.png", "width": width, "height": height,
                       "cell_type": meta["cell_type"], "sample_id": meta["sample_id"]})
        for a in anns:
            counts = rle.kaggle_decode(a, height, width)
            m = rle.decode_mask(counts, height, width)
            ys, xs = np.nonzero(m)
            annos.append({"id": len(annos) + 1, "image_id": n, "category_id": cat[meta["cell_type"]],
                          "segmentation": rle.to_coco_rle(counts, height, width), "area": int(m.sum()),
                          "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                   int(ys.max() - ys.min() + 1)], "iscrowd": 0})
    cats = [{"id": k, "name": t, "supercategory": "cell"} for t, k in cat.items()]
    path.write_text(json.dumps({"images": images, "annotations": annos, "categories": cats}))


# ---------------------------------------------------------------------------
# dataset plan: cell types, samples (wells) and plate times
# ---------------------------------------------------------------------------

def _type_counts(n: int, mix=TYPE_MIX) -> list[int]:
    raw = np.array(mix) * n
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    if n >= 3:
        while (counts == 0).any():
            counts[np.argmax(counts)] -= 1
            counts[np.flatnonzero(counts == 0)[0]] += 1
    return counts.tolist()


def _plan(n_images: int, seed: int, style: str = "sartorius") -> list[dict]:
    rng = np.random.default_rng(seed)
    groups = []
    types, mix = STYLES[style]
    for ct, k in zip(types, _type_counts(n_images, mix)):
        well = 0
        while k > 0:
            g = min(k, int(rng.integers(2, 5)))
            k -= g
            well += 1
            row, col, site = "ABCDEFGH"[rng.integers(0, 8)], int(rng.integers(1, 13)), int(rng.integers(1, 5))
            sample_id = f"{_SAMPLE_PREFIX[ct]}_{row}{col}-{site}"
            day = int(rng.integers(0, 500))
            date = (np.datetime64("2019-01-01") + np.timedelta64(day, "D")).astype(str)
            density = float(np.exp(rng.normal(0.0, PARAMS[ct].n_sigma)))
            minutes = np.sort(rng.choice(np.arange(0, 24 * 60, 30), size=g, replace=False))
            groups.append([dict(cell_type=ct, sample_id=sample_id, sample_date=date,
                                plate_time=f"{m // 60:02d}h{m % 60:02d}m00s",
                                elapsed_timedelta=f"0 days {m // 60:02d}:{m % 60:02d}:00",
                                density=density * (1.0 + 0.08 * t) * float(np.exp(rng.normal(0.0, 0.1))))
                           for t, m in enumerate(minutes.tolist())])
    order = rng.permutation(len(groups))
    return [m for gi in order for m in groups[gi]]


# ---------------------------------------------------------------------------
# one image
# ---------------------------------------------------------------------------

def render_image(rng: np.random.Generator, cell_type: str, width: int, height: int, density: float = 1.0):
    """-> (H x W uint8 image, [(y0, x0, bool crop), ...] masks in image coordinates)."""
    p = PARAMS[cell_type]
    H, W = height, width
    scale = (W * H) / (REF_W * REF_H)
    n_full = float(np.clip(p.n_median * density, *p.n_range))
    n_target = max(1, int(round(n_full * scale)))

    n_clusters = max(1, int(round(rng.uniform(3, 9) * math.sqrt(scale))))
    centres = np.column_stack([rng.uniform(0, H, n_clusters), rng.uniform(0, W, n_clusters)])
    spreads = rng.uniform(*p.cluster_sigma, n_clusters) * max(0.3, math.sqrt(scale))

    occ = np.zeros((H, W), dtype=bool)
    interior = np.zeros((H, W), dtype=np.float32)
    borders = np.zeros((H, W), dtype=np.float32)
    masks: list[tuple[int, int, np.ndarray]] = []
    attempts, max_attempts = 0, 4 * n_target + 20
    while len(masks) < n_target and attempts < max_attempts:
        attempts += 1
        crop, oy, ox = _cell_mask(rng, p)
        if rng.random() < p.clustered:
            k = rng.integers(0, n_clusters)
            cy, cx = rng.normal(centres[k], spreads[k])
        else:
            cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        if not masks and attempts > max_attempts // 2:  # guarantee one mask: fall back to the centre
            cy, cx = H / 2, W / 2
        placed = _place(crop, int(round(cy)) - oy, int(round(cx)) - ox, H, W)
        if placed is None:
            continue
        y0, x0, m = placed
        area = int(np.count_nonzero(m))
        sl = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
        limit = p.max_overlap if rng.random() < p.p_touch else 0.01
        if masks and np.count_nonzero(occ[sl] & m) > limit * area:
            continue
        occ[sl] |= m
        interior[sl] += m * np.float32(rng.normal(*p.interior))
        borders[sl] += m & ~ndi.binary_erosion(m)
        masks.append((y0, x0, m))
    if not masks:  # pathological (e.g. every shape dropped): one round cell in the middle
        r = max(2, min(H, W) // 8)
        yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
        m = (yy * yy + xx * xx) <= r * r
        y0, x0, m = _place(m, H // 2 - r, W // 2 - r, H, W)
        occ[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] |= m
        masks.append((y0, x0, m))

    img = _paint(rng, p, occ, interior, borders, scale)
    return img, masks


def _place(crop: np.ndarray, y0: int, x0: int, H: int, W: int):
    """Clip a crop placed at (y0, x0) to the image; keep its largest 4-connected part."""
    h, w = crop.shape
    ya, yb, xa, xb = max(0, -y0), min(h, H - y0), max(0, -x0), min(w, W - x0)
    if ya >= yb or xa >= xb:
        return None
    m = crop[ya:yb, xa:xb]
    y0, x0 = y0 + ya, x0 + xa
    lab, n = ndi.label(m)
    if n == 0:
        return None
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(np.argmax(sizes))
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    m = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    if np.count_nonzero(m) < MIN_AREA:
        return None
    return y0 + int(rows[0]), x0 + int(cols[0]), np.ascontiguousarray(m)


def _cell_mask(rng: np.random.Generator, p: CellParams):
    """One cell in a local crop -> (bool crop, row, col of its centre in the crop)."""
    area = float(min(p.area_max, p.area_median * math.exp(rng.normal(0.0, p.area_sigma))))
    area = max(area, 2.0 * MIN_AREA)
    has_proc = rng.random() < p.p_process
    frac = rng.uniform(*p.process_frac) if has_proc else 0.0
    body_area = area * (1.0 - frac)

    q = rng.uniform(*p.aspect)
    a = math.sqrt(body_area / (math.pi * q))
    b = q * a
    ks = np.arange(2, 6, dtype=np.float64)
    amps = p.harmonics * rng.uniform(0.2, 1.0, ks.size) / np.sqrt(ks - 1)
    if amps.sum() > 0.6:
        amps *= 0.6 / amps.sum()
    phases = rng.uniform(0, 2 * math.pi, ks.size)
    theta = rng.uniform(0, math.pi)
    bend = rng.uniform(-p.bend, p.bend)
    ext = a * (1 + amps.sum()) * (1 + abs(bend)) + 2.0

    # processes: curved polylines (0.5 px steps) leaving the body, with tapering radius
    pts, rads = np.zeros((0, 2)), np.zeros(0)
    if has_proc:
        n_proc = int(rng.integers(p.n_process[0], p.n_process[1] + 1))
        r0 = rng.uniform(*p.process_radius, n_proc)
        widths = (r0 + 1.0) + 1.0  # mean width of a tapering line stamped with radius r0 -> 1
        lengths = rng.dirichlet(np.full(n_proc, 2.0)) * (area - body_area) / widths
        base = theta + (np.arange(n_proc) * 2 * math.pi / n_proc if n_proc > 1
                        else np.array([math.pi * rng.integers(0, 2)]))
        all_pts, all_r = [], []
        for j in range(n_proc):
            ang = base[j] + rng.normal(0, 0.35)
            # start well inside the body along that direction
            du, dv = math.cos(ang - theta), math.sin(ang - theta)
            rb = 1.0 / math.hypot(du / a, dv / b)
            n_steps = max(2, int(2 * (lengths[j] + 0.6 * rb)))
            turn = np.cumsum(rng.normal(0, 0.035, n_steps))
            turn = ndi.gaussian_filter1d(turn, 8) if n_steps > 4 else turn
            head = ang + turn
            xy = np.cumsum(0.5 * np.column_stack([np.sin(head), np.cos(head)]), axis=0)
            xy += 0.4 * rb * np.array([math.sin(ang), math.cos(ang)])
            t = np.linspace(0, 1, n_steps)
            all_pts.append(xy)
            all_r.append(r0[j] + (1.0 - r0[j]) * t)
        pts, rads = np.concatenate(all_pts), np.concatenate(all_r)

    E = int(math.ceil(ext))
    lo, hi = np.array([-E, -E]), np.array([E + 1, E + 1])
    if len(pts):
        lo = np.minimum(lo, np.floor(pts.min(axis=0)).astype(int) - 3)
        hi = np.maximum(hi, np.ceil(pts.max(axis=0)).astype(int) + 4)
    off = rng.uniform(-0.5, 0.5, 2)
    yy = (np.arange(lo[0], hi[0]) - off[0])[:, None]
    xx = (np.arange(lo[1], hi[1]) - off[1])[None, :]
    c, s = math.cos(theta), math.sin(theta)
    u = xx * c + yy * s
    v = -xx * s + yy * c - bend * u * u / a
    un, vn = u / a, v / b
    rho = np.hypot(un, vn)
    phi = np.arctan2(vn, un)
    r = 1.0 + sum(amps[j] * np.cos(ks[j] * phi + phases[j]) for j in range(ks.size))
    m = rho <= r

    if len(pts):
        iy = np.clip(np.rint(pts[:, 0] - lo[0]).astype(int), 0, m.shape[0] - 1)
        ix = np.clip(np.rint(pts[:, 1] - lo[1]).astype(int), 0, m.shape[1] - 1)
        rad = np.zeros(m.shape, dtype=np.float64)
        np.maximum.at(rad, (iy, ix), rads)
        seeds = rad > 0
        dist, (ny, nx) = ndi.distance_transform_edt(~seeds, return_indices=True)
        m |= dist <= rad[ny, nx] + 1e-9
    return m, -int(lo[0]), -int(lo[1])


def _paint(rng: np.random.Generator, p: CellParams, occ: np.ndarray, interior: np.ndarray,
           borders: np.ndarray, scale: float) -> np.ndarray:
    H, W = occ.shape
    u = occ.astype(np.float32)

    # unannotated debris: small dark granules (some in clumps) with their own halo
    debris = np.zeros((H, W), dtype=np.float32)
    n_deb = int(rng.poisson(p.debris * scale))
    if n_deb:
        n_clumps = max(1, n_deb // 12)
        cz = np.column_stack([rng.uniform(0, H, n_clumps), rng.uniform(0, W, n_clumps)])
        in_clump = rng.random(n_deb) < 0.5
        pos = np.where(in_clump[:, None], cz[rng.integers(0, n_clumps, n_deb)] + rng.normal(0, 6, (n_deb, 2)),
                       np.column_stack([rng.uniform(0, H, n_deb), rng.uniform(0, W, n_deb)]))
        for (y, x), rr, dark in zip(pos, rng.uniform(1.0, 3.2, n_deb), rng.uniform(0.6, 1.0, n_deb)):
            R = int(math.ceil(rr))
            yi, xi = int(round(y)), int(round(x))
            ya, yb, xa, xb = max(0, yi - R), min(H, yi + R + 1), max(0, xi - R), min(W, xi + R + 1)
            if ya >= yb or xa >= xb:
                continue
            dy = (np.arange(ya, yb) - y)[:, None]
            dx = (np.arange(xa, xb) - x)[None, :]
            np.maximum(debris[ya:yb, xa:xb], dark * (dy * dy + dx * dx <= rr * rr), out=debris[ya:yb, xa:xb])

    # phase-contrast optics: the blurred-minus-sharp profile gives a dark inner rim
    # and a bright outer halo around every object
    obj = np.maximum(u, debris)
    blur = ndi.gaussian_filter(obj, 1.1)
    halo = np.maximum(blur - obj, 0) - 0.35 * np.maximum(obj - blur, 0)
    noise_t = ndi.gaussian_filter(rng.standard_normal((H, W)).astype(np.float32), 1.0)
    texture = p.texture * 2.5 * noise_t * u
    img = (p.halo * halo
           + ndi.gaussian_filter(interior, 0.8)
           + p.border * ndi.gaussian_filter(borders, 0.6)
           + texture
           - 35.0 * ndi.gaussian_filter(debris, 0.7))

    # a very gentle illumination gradient (real images are flat-field corrected)
    yy = np.linspace(-1, 1, H, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, W, dtype=np.float32)[None, :]
    g = rng.normal(0, 0.8, 3)
    img += g[0] * xx + g[1] * yy + g[2] * (xx * xx + yy * yy - 0.66)

    img += rng.uniform(1.2, 4.0) * rng.standard_normal((H, W)).astype(np.float32)
    img += 128.0 - float(img.mean())
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Kaggle RLE straight from a crop (identical to rle.kaggle_encode_mask on the full mask)
# ---------------------------------------------------------------------------

def _kaggle_rle_crop(m: np.ndarray, y0: int, x0: int, width: int) -> str:
    h, w = m.shape
    pad = np.zeros((h, w + 2), dtype=bool)
    pad[:, 1:-1] = m
    flat = pad.ravel()
    d = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # padded flat index of the first changed pixel
    s_p, e_p = d[0::2], d[1::2]
    row = s_p // (w + 2)
    gs = (y0 + row) * width + x0 + (s_p - row * (w + 2) - 1)
    ge = (y0 + row) * width + x0 + (e_p - row * (w + 2) - 1)
    # runs touching the right border continue on the next row when the mask wraps
    brk = gs[1:] != ge[:-1]
    s = gs[np.concatenate(([True], brk))]
    e = ge[np.concatenate((brk, [True]))]
    out = np.empty(2 * s.size, dtype=np.int64)
    out[0::2], out[1::2] = s + 1, e - s
    return " ".join(map(str, out.tolist()))


if __name__ == "__main__":  # python -m bench.data.synth OUT [N] [SEED]
    import sys
    import time

    t0 = time.perf_counter()
    out = generate(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100,
                   seed=int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
