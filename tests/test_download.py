"""Issue 14: `bench data get`, offline. Every dataset of the registry is fetched from a local HTTP
server on 127.0.0.1 (http.server in a thread) serving small archives made here, in the layout of
the real ones: a good download and unpack, a wrong checksum, an interrupted transfer resumed, an
existing target left untouched. A guard refuses any connection beyond 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from bench.cli import app
from bench.data import download as dl
from bench.data.errors import DataError
from bench.data.io import load_dataset

H, W = 20, 24


# ---------------------------------------------------------------------------
# no network beyond 127.0.0.1; a local server with Range support and programmable faults
# ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    real = socket.getaddrinfo

    def guarded(host, *a, **k):
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test_download: no network beyond 127.0.0.1 (asked for {host})")
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):
        srv = self.server
        name = self.path.lstrip("/")
        srv.log.append((name, self.headers.get("Range")))
        data = srv.files.get(name)
        if data is None:
            self.send_error(404)
            return
        fault = srv.faults[name].pop(0) if srv.faults.get(name) else None
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and srv.ranges:
            start = int(m[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "cut":  # announce everything, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if fault == "corrupt":
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
        self.wfile.write(body)


@pytest.fixture()
def server(monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.faults, srv.log, srv.ranges = {}, {}, [], True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    monkeypatch.setenv(dl.MIRROR_ENV, srv.base)
    yield srv
    srv.shutdown()
    srv.server_close()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def pin(monkeypatch, name: str, files: dict[str, bytes]) -> None:
    monkeypatch.setitem(dl.DATASETS, name, dl.pinned(dl.DATASETS[name], {n: sha(b) for n, b in files.items()}))


# ---------------------------------------------------------------------------
# small archives in the layout of the real ones
# ---------------------------------------------------------------------------

def _png(arr: np.ndarray, mode=None) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr, mode).save(b, format="PNG")
    return b.getvalue()


def _tif(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    tifffile.imwrite(b, arr)
    return b.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    """A zip whose bytes depend on its members only (fixed timestamps), so checksums are stable."""
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in members.items():
            z.writestr(zipfile.ZipInfo(n, date_time=(2020, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return b.getvalue()


def _disk(cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def dsb_members(prefix: str = "") -> dict[str, bytes]:
    out = {}
    for k, iid in enumerate(["0a1b", "9f8e"]):
        rgba = np.dstack([np.full((H, W), 40 * (k + 1), np.uint8)] * 3 + [np.full((H, W), 255, np.uint8)])
        out[f"{prefix}{iid}/images/{iid}.png"] = _png(rgba, "RGBA")
        for j, (cy, cx) in enumerate([(5, 5), (12, 16)]):
            out[f"{prefix}{iid}/masks/m{j}.png"] = _png(_disk(cy, cx + k, 3).astype(np.uint8) * 255)
    return out


def labels_image(n=3) -> np.ndarray:
    lab = np.zeros((H, W), np.uint16)
    for j in range(n):
        lab[_disk(4 + 6 * j, 5 + 6 * j, 2)] = j + 1
    return lab


def livecell_files(line: str | None) -> dict[str, bytes]:
    from bench.data import rle
    from bench.data.sample import Instances

    names = {"A172": ["A172_Phase_A7_1_00d00h00m_1.tif", "A172_Phase_C7_1_01d04h00m_2.tif"],
             "BV2": ["BV2_Phase_B4_1_00d00h00m_1.tif"]}
    members = {}
    for ct, fns in names.items():
        for fn in fns:
            members[f"images/livecell_train_val_images/{ct}/{fn}"] = _tif(np.full((H, W), 90, np.uint8))
    files = {"images.zip": _zip(members)}
    inst = Instances.from_label_image(labels_image().astype(np.int64), cls_id=0)
    keep = [fn for ct, fns in names.items() for fn in fns if line is None or ct.lower() == line]

    def coco(split_fns):
        images = [{"id": i + 1, "file_name": fn, "height": H, "width": W} for i, fn in enumerate(split_fns)]
        anns = [{"id": 100 * im["id"] + j, "image_id": im["id"], "category_id": 1, "iscrowd": 0,
                 "segmentation": rle.to_coco_rle(c, H, W)} for im in images for j, c in enumerate(inst.counts)]
        return json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cell"}]}).encode()

    for split, fns in (("train", keep[:1]), ("val", keep[1:2] or keep[:1]), ("test", keep[:1])):
        files[f"livecell_coco_{split}.json" if line is None else f"livecell_{line}_{split}.json"] = coco(fns)
    return files


def usiigaci_files() -> dict[str, bytes]:
    top = f"Usiigaci-{dl.USIIGACI_COMMIT}/Mask R-CNN/train"
    members = {}
    for n in (1, 2, 10):
        members[f"{top}/set{n}/raw.tif"] = _tif(np.full((H, W), 1000 * n, np.uint16))
        members[f"{top}/set{n}/instances_ids.png"] = _png(labels_image(2).astype(np.uint8))
    members[f"Usiigaci-{dl.USIIGACI_COMMIT}/README.md"] = b"readme"
    return {f"Usiigaci-{dl.USIIGACI_COMMIT[:7]}.zip": _zip(members)}


def dsb_files(variant: str | None = None) -> dict[str, bytes]:
    if variant == "fixed":
        top = f"kaggle-dsbowl-2018-dataset-fixes-{dl.DSB_FIXES_COMMIT}/"
        members = {top + "README.md": b"fixes", **dsb_members(top + "stage1_train/")}
        return {f"kaggle-dsbowl-2018-dataset-fixes-{dl.DSB_FIXES_COMMIT[:7]}.zip": _zip(members)}
    pad = {"pad.bin": np.random.default_rng(0).bytes(300_000)}  # big enough that half a transfer is many chunks
    return {"stage1_train.zip": _zip({**pad, **dsb_members()}), "stage1_train_labels.csv": b"ImageId,EncodedPixels\n"}


CASES = [("dsb2018", None, dsb_files(), 2), ("dsb2018", "fixed", dsb_files("fixed"), 2),
         ("livecell", None, livecell_files(None), 1), ("livecell", "a172", livecell_files("a172"), 1),
         ("usiigaci", None, usiigaci_files(), 3)]


# ---------------------------------------------------------------------------
# good downloads of every dataset
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,variant,files,n_images", CASES,
                         ids=[f"{c[0]}-{c[1] or 'default'}" for c in CASES])
def test_every_dataset_downloads_unpacks_and_reads(server, tmp_path, monkeypatch, name, variant, files, n_images):
    server.files.update(files)
    pin(monkeypatch, name, files)
    target = tmp_path / "data" / name
    res = dl.get(name, target, variant, progress=False, echo=lambda s: None)
    assert res.status == "downloaded" and res.target == target
    assert all(f["verified"] and f["sha256"] == sha(files[n]) for n, f in res.files.items())
    assert set(res.files) == set(files)
    ds = load_dataset(res.data)  # the layout `bench run --data` reads
    assert len(ds) == n_images == res.images
    assert (target / dl.MARKER).is_file()
    assert not dl.staging_dir(target).exists()
    assert {n for n, _ in server.log} == set(files)


def test_livecell_cell_line_keeps_only_its_images(server, tmp_path, monkeypatch):
    files = livecell_files("a172")
    server.files.update(files)
    res = dl.get("livecell", tmp_path / "lc", "a172", verify=False, progress=False, echo=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "lc" / "images").iterdir()) == [
        "A172_Phase_A7_1_00d00h00m_1.tif", "A172_Phase_C7_1_01d04h00m_2.tif"]
    assert res.data.name == "livecell_a172_train.json"
    assert not any(f["verified"] for f in res.files.values())


def test_usiigaci_becomes_a_label_folder(server, tmp_path):
    server.files.update(usiigaci_files())
    res = dl.get("usiigaci", tmp_path / "u", verify=False, progress=False, echo=lambda s: None)
    names = sorted(p.name for p in res.target.iterdir() if not p.name.startswith("."))
    assert names == ["set01.tif", "set01_masks.png", "set02.tif", "set02_masks.png", "set10.tif",
                     "set10_masks.png"]
    ds = load_dataset(res.data)
    assert [len(s.instances) for s in ds] == [2, 2, 2] and ds.samples[0].image.dtype == np.uint16


def test_cli_get_with_url_and_no_verify(server, tmp_path, monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV)
    server.files.update(dsb_files())
    target = tmp_path / "dsb"
    r = CliRunner().invoke(app, ["data", "get", "dsb2018", "--to", str(target), "--url", server.base + "/",
                                 "--no-verify"])
    assert r.exit_code == 0, r.output
    assert "not verified" in r.output and f"sha256 {sha(dsb_files()['stage1_train.zip'])}" in r.output
    assert f"use: bench run --data {target}" in r.output
    r = CliRunner().invoke(app, ["data", "check", str(target)])
    assert r.exit_code == 0 and "ok: 2 images, 4 masks" in r.output
    r = CliRunner().invoke(app, ["data", "get", "dsb2018", "--to", str(target), "--check"])
    assert r.exit_code == 0 and "ok:" in r.output


def test_unknown_checksum_needs_no_verify(server, tmp_path):
    server.files.update(dsb_files())
    with pytest.raises(DataError, match="cannot verify.*--no-verify"):
        dl.get("dsb2018", tmp_path / "d", progress=False, echo=lambda s: None)
    r = CliRunner().invoke(app, ["data", "get", "usiigaci", "--to", str(tmp_path / "u")])
    assert r.exit_code == 2 and "cannot verify" in r.output and "--no-verify" in r.output
    assert server.log == [] and not (tmp_path / "d").exists() and not (tmp_path / "u").exists()


def test_unknown_names_and_variants(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        dl.get("imagenet", tmp_path / "x")
    with pytest.raises(DataError, match="unknown variant"):
        dl.get("livecell", tmp_path / "x", "hela")
    r = CliRunner().invoke(app, ["data", "get"])
    assert r.exit_code == 0 and all(n in r.output for n in dl.DATASETS)
    assert "stage1_train.zip" in r.output and "unknown (needs --no-verify)" in r.output


# ---------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------

def test_corrupted_download_leaves_nothing(server, tmp_path, monkeypatch):
    files = dsb_files()
    server.files.update(files)
    pin(monkeypatch, "dsb2018", files)
    server.faults["stage1_train.zip"] = ["corrupt"]
    target = tmp_path / "dsb"
    with pytest.raises(DataError, match="checksum mismatch") as e:
        dl.get("dsb2018", target, progress=False, echo=lambda s: None)
    assert "nothing was kept" in str(e.value)
    assert not target.exists() and not dl.staging_dir(target).exists()
    assert list(tmp_path.iterdir()) == []

    # the same through the command line: exit 2, no traceback, nothing left
    server.faults["stage1_train.zip"] = ["corrupt"]
    r = CliRunner().invoke(app, ["data", "get", "dsb2018", "--to", str(target)])
    assert r.exit_code == 2 and "checksum mismatch" in r.output and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_wrong_published_checksum_is_refused(server, tmp_path, monkeypatch):
    files = usiigaci_files()
    server.files.update(files)
    monkeypatch.setitem(dl.DATASETS, "usiigaci", dl.pinned(dl.DATASETS["usiigaci"], {n: "0" * 64 for n in files}))
    with pytest.raises(DataError, match="checksum mismatch"):
        dl.get("usiigaci", tmp_path / "u", progress=False, echo=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_is_resumed(server, tmp_path, monkeypatch):
    files = dsb_files()
    server.files.update(files)
    pin(monkeypatch, "dsb2018", files)
    server.faults["stage1_train.zip"] = ["cut"]
    res = dl.get("dsb2018", tmp_path / "dsb", progress=False, echo=lambda s: None)
    assert res.resumed == 1 and res.files["stage1_train.zip"]["verified"]
    zips = [rng for n, rng in server.log if n == "stage1_train.zip"]
    half = len(files["stage1_train.zip"]) // 2
    assert len(zips) == 2 and zips[0] is None
    assert 0 < int(zips[1].split("=")[1].rstrip("-")) <= half  # continued from what the first request got
    assert len(load_dataset(res.data)) == 2


def test_interrupted_transfer_restarts_where_range_is_ignored(server, tmp_path, monkeypatch):
    files = usiigaci_files()
    server.files.update(files)
    server.ranges = False
    pin(monkeypatch, "usiigaci", files)
    (name,) = files
    server.faults[name] = ["cut"]
    res = dl.get("usiigaci", tmp_path / "u", progress=False, echo=lambda s: None)
    assert res.files[name]["verified"] and len([n for n, _ in server.log if n == name]) == 2


def test_failed_run_keeps_its_part_and_the_next_run_resumes(server, tmp_path, monkeypatch):
    files = dsb_files()
    server.files.update(files)
    pin(monkeypatch, "dsb2018", files)
    server.faults["stage1_train.zip"] = ["cut", "cut"]
    target = tmp_path / "dsb"
    with pytest.raises(DataError, match="the same command resumes"):
        dl.get("dsb2018", target, progress=False, retries=1, echo=lambda s: None)
    assert not target.exists()
    part = dl.staging_dir(target) / "downloads" / "stage1_train.zip.part"
    kept = part.stat().st_size
    assert 0 < kept < len(files["stage1_train.zip"])
    server.log.clear()
    res = dl.get("dsb2018", target, progress=False, echo=lambda s: None)
    assert res.status == "downloaded" and res.files["stage1_train.zip"]["verified"]
    assert [rng for n, rng in server.log if n == "stage1_train.zip"] == [f"bytes={kept}-"]  # resumed, not restarted
    assert not dl.staging_dir(target).exists()


def test_existing_target_is_left_untouched(server, tmp_path, monkeypatch):
    files = dsb_files()
    server.files.update(files)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my own work")
    with pytest.raises(DataError, match="left untouched"):
        dl.get("dsb2018", target, verify=False, progress=False, echo=lambda s: None)
    r = CliRunner().invoke(app, ["data", "get", "dsb2018", "--to", str(target), "--no-verify"])
    assert r.exit_code == 2 and "left untouched" in r.output
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "my own work"
    assert server.log == [] and not dl.staging_dir(target).exists()

    # a target a previous `get` completed: reported as present, nothing fetched, nothing changed
    done = tmp_path / "done"
    dl.get("dsb2018", done, verify=False, progress=False, echo=lambda s: None)
    before = sorted((p.relative_to(done), p.stat().st_mtime_ns) for p in done.rglob("*"))
    server.log.clear()
    r = CliRunner().invoke(app, ["data", "get", "dsb2018", "--to", str(done), "--no-verify"])
    assert r.exit_code == 0 and "already holds dsb2018 (left untouched)" in r.output
    assert server.log == [] and sorted((p.relative_to(done), p.stat().st_mtime_ns) for p in done.rglob("*")) == before
    r = CliRunner().invoke(app, ["data", "get", "dsb2018", "--to", str(done), "--variant", "bbbc038", "--no-verify"])
    assert r.exit_code == 0 and "already holds" in r.output  # the default variant, named
    r = CliRunner().invoke(app, ["data", "get", "dsb2018", "--to", str(done), "--variant", "fixed", "--no-verify"])
    assert r.exit_code == 2 and "left untouched" in r.output and server.log == []


def test_empty_existing_target_is_used(server, tmp_path):
    server.files.update(usiigaci_files())
    (tmp_path / "u").mkdir()
    res = dl.get("usiigaci", tmp_path / "u", verify=False, progress=False, echo=lambda s: None)
    assert res.images == 3


def test_archive_without_the_layout_is_an_error(server, tmp_path, monkeypatch):
    server.files.update({"stage1_train.zip": _zip({"readme.txt": b"x"}), "stage1_train_labels.csv": b""})
    with pytest.raises(DataError, match="no stage1_train"):
        dl.get("dsb2018", tmp_path / "d", verify=False, progress=False, echo=lambda s: None)
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------
# sartorius: by hand with the Kaggle CLI, then --check
# ---------------------------------------------------------------------------

def test_sartorius_explains_and_checks(tmp_path):
    from bench.data.synth import generate

    r = CliRunner().invoke(app, ["data", "get", "sartorius", "--to", str(tmp_path / "s")])
    assert r.exit_code == 0
    assert "kaggle competitions download -c sartorius-cell-instance-segmentation" in r.output
    assert not (tmp_path / "s").exists()
    generate(tmp_path / "s", n_images=2, size=(96, 64), seed=0)
    r = CliRunner().invoke(app, ["data", "get", "sartorius", "--to", str(tmp_path / "s"), "--check"])
    assert r.exit_code == 0 and "ok:" in r.output and "2 images" in r.output, r.output
    (tmp_path / "s" / "train" / sorted(p.name for p in (tmp_path / "s" / "train").iterdir())[0]).unlink()
    r = CliRunner().invoke(app, ["data", "get", "sartorius", "--to", str(tmp_path / "s"), "--check"])
    assert r.exit_code == 2 and "missing" in r.output
