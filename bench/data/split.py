"""The one train/val split every model shares: stratified by cell type, grouped by well.

Deterministic from (ids, groups, classes, seed) alone: no hash() of Python objects,
no set ordering, so the same dataset gives the same split on any machine. Its hash
goes into every run's manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.data.errors import DataError
from bench.data.sample import Dataset
from bench.util import atomic_write_text


def dataset_fingerprint(dataset: Dataset) -> str:
    """Content hash of the annotations (ids, sizes, classes, masks): changes if any mask changes."""
    h = hashlib.sha256()
    for s in sorted(dataset.samples, key=lambda s: s.image_id):
        h.update(f"{s.image_id}|{s.height}|{s.width}|{s.cell_type(dataset.classes)}|".encode())
        for c in s.instances.counts:
            h.update(np.asarray(c, dtype=np.uint32).tobytes())
        h.update(s.instances.classes.astype(np.int64).tobytes())
    return h.hexdigest()


def split_hash(train: list[str], val: list[str], fingerprint: str) -> str:
    payload = json.dumps({"train": sorted(train), "val": sorted(val), "dataset": fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_split(dataset: Dataset, val: float = 0.2, seed: int = 0, stratify: str | None = None) -> dict:
    """Assign whole groups to val, per stratum, until each stratum has ~``val`` of its images.

    The strata are the values of the per-image attribute ``stratify`` (default:
    :func:`bench.data.attributes.default_stratify`: DSB2018's ``modality``, LIVECell's
    ``cell_line``, else ``cell_type``, which gives the same split, and hash, as before
    attributes existed). Groups (Sartorius ``sample_id``, LIVECell well) are shuffled with a
    seeded RNG in sorted order, then taken greedily while that keeps the stratum's val share
    closest to the target; every stratum with >= 2 groups gets at least one val group.
    """
    from bench.data.attributes import attribute_values, default_stratify

    if not 0 < val < 1:
        raise ValueError(f"val fraction must be in (0, 1), got {val}")
    stratify = stratify or default_stratify(dataset)
    strata = attribute_values(dataset, stratify)
    by_type: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    group_type: dict[str, str] = {}
    for s in dataset.samples:
        ct = strata[s.image_id]
        g = s.group
        if group_type.setdefault(g, ct) != ct:
            # a group spanning types is stratified under its first type; it still never straddles
            ct = group_type[g]
        by_type[ct][g].append(s.image_id)
    rng = np.random.default_rng(seed)
    val_ids: list[str] = []
    leftovers: list[tuple[str, str]] = []
    for ct in sorted(by_type):
        groups = by_type[ct]
        names = sorted(groups)
        order = [names[i] for i in rng.permutation(len(names))]
        total = sum(len(v) for v in groups.values())
        target, taken = val * total, 0
        chosen = []
        for g in order:
            n = len(groups[g])
            if len(order) - len(chosen) <= 1:
                break  # keep at least one group of every type in train
            if abs(taken + n - target) <= abs(taken - target) or (not chosen and len(order) >= 2):
                chosen.append(g)
                taken += n
        for g in chosen:
            val_ids.extend(groups[g])
        leftovers.extend((ct, g) for g in order if g not in chosen)
    if not val_ids:  # tiny data: no type had two groups' worth; move the smallest spare group
        spare = [(len(by_type[ct][g]), ct, g) for ct, g in leftovers
                 if sum(1 for c2, _ in leftovers if c2 == ct) >= 2]
        if not spare:
            raise DataError(dataset.name, f"too small to split: {len(group_type)} group(s) of images; "
                                          "every cell type needs one group in train")
        val_ids.extend(by_type[min(spare)[1]][min(spare)[2]])
    val_set = set(val_ids)
    train_ids = sorted(s.image_id for s in dataset.samples if s.image_id not in val_set)
    val_ids = sorted(val_set)
    fp = dataset_fingerprint(dataset)
    return {
        "train": train_ids, "val": val_ids, "seed": seed, "val_fraction": val,
        "dataset": dataset.name, "dataset_hash": fp, "hash": split_hash(train_ids, val_ids, fp),
        "groups": "sample_id/well", "stratified_by": stratify,
        # images per stratum in train and val (DSB2018: fluorescence / histology / brightfield)
        "strata": {v: {"train": sum(strata[i] == v for i in train_ids), "val": sum(strata[i] == v for i in val_ids)}
                   for v in sorted(set(strata.values()))},
    }


def split_note(split: dict) -> dict:
    """What a run's manifest says about how its split was stratified (and why that may differ from
    runs made before per-image attributes: those were all stratified by cell type)."""
    by = split.get("stratified_by", "cell_type")
    note = {"split_stratified_by": by}
    if split.get("strata"):
        note["split_strata"] = split["strata"]
    if by != "cell_type":
        note["split_note"] = (f"stratified by the per-image attribute {by!r} (bench/data/attributes.py), so "
                              "this split differs from one made before attributes existed (those were "
                              "stratified by cell type only); datasets without such an attribute keep "
                              "their earlier split and hash")
    return note


def write_split(split: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(split, indent=1))


def read_split(path: str | Path, dataset: Dataset | None = None) -> dict:
    path = Path(path)
    try:
        split = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding errors
        raise DataError(path, f"cannot read split ({e})") from None
    if not isinstance(split, dict):
        raise DataError(path, f"split is a {type(split).__name__}, not an object")
    for k in ("train", "val", "hash"):
        if k not in split:
            raise DataError(path, f"split has no '{k}'")
    for k in ("train", "val"):
        if not isinstance(split[k], list) or not all(isinstance(i, str) for i in split[k]):
            raise DataError(path, f"split's '{k}' is not a list of image ids")
    if dataset is not None:
        known = {s.image_id for s in dataset.samples}
        unknown = [i for i in split["train"] + split["val"] if i not in known]
        if unknown:
            raise DataError(path, f"{len(unknown)} ids not in dataset {dataset.name}, e.g. {unknown[:3]}")
        if split.get("dataset_hash") and split["dataset_hash"] != dataset_fingerprint(dataset):
            raise DataError(path, "split was made for different annotations (dataset hash differs)")
    return split
