"""Per-image attributes: what a leaderboard can be broken down by and a split stratified by.

An attribute is one string per image. Where they come from:

* ``cell_type``: every dataset (the Sartorius ``cell_type`` column, else the majority class).
* ``cell_line``: LIVECell file names (``A172_Phase_A7_1_...`` -> ``A172``).
* any extra string field of a COCO ``images`` entry (the shared DSB2018 json's ``modality``:
  fluorescence / histology / brightfield), kept by the COCO reader in ``meta["attrs"]``, and the
  optional Sartorius columns (``plate_time``, ``sample_date``, ...).

The default stratification attribute of a dataset is the first of :data:`STRATIFY_PREFERENCE`
that every image has and that takes more than one value; ``cell_type`` otherwise (which is what
every split was stratified by before attributes existed, so such datasets keep their split).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from bench.data.errors import DataError
from bench.data.sample import Dataset, Sample

# a dataset that has one of these (on every image, with >= 2 values) is stratified by the first
STRATIFY_PREFERENCE = ("modality", "cell_line")
_LIVECELL_LINE = re.compile(r"^(?P<cell>[A-Za-z0-9\-]+)_Phase_[A-Z]\d+_\d+_")
# Sartorius columns that are per-image attributes (the rest of its optional columns are ids/times)
_SARTORIUS_ATTRS = ("plate_time", "sample_date", "elapsed_timedelta")


def livecell_cell_line(file_name: str) -> str | None:
    """'A172_Phase_A7_1_00d00h00m_1.tif' -> 'A172'; None for other names."""
    m = _LIVECELL_LINE.match(Path(file_name).name)
    return m["cell"] if m else None


def sample_attributes(sample: Sample, classes: list[str]) -> dict[str, str]:
    """Every attribute this image has, as strings."""
    out = {"cell_type": sample.cell_type(classes)}
    line = livecell_cell_line(str(sample.meta.get("file_name") or sample.path or ""))
    if line:
        out["cell_line"] = line
    for k in _SARTORIUS_ATTRS:
        if sample.meta.get(k) not in (None, ""):
            out[k] = str(sample.meta[k])
    for k, v in (sample.meta.get("attrs") or {}).items():
        out[str(k)] = str(v)
    return out


def available_attributes(dataset: Dataset) -> list[str]:
    """Attributes that every image of the dataset has (sorted)."""
    common: set[str] | None = None
    for s in dataset:
        keys = set(sample_attributes(s, dataset.classes))
        common = keys if common is None else common & keys
    return sorted(common or [])


def attribute_values(dataset: Dataset, name: str) -> dict[str, str]:
    """image id -> value of attribute ``name``; DataError naming the images that lack it and the
    attributes this dataset does have."""
    out, lacking = {}, []
    for s in dataset:
        v = sample_attributes(s, dataset.classes).get(name)
        if v is None:
            lacking.append(s.image_id)
        else:
            out[s.image_id] = v
    if lacking:
        raise DataError(dataset.root or dataset.name,
                        f"{len(lacking)} of {len(dataset)} images have no attribute {name!r} (e.g. image "
                        f"{lacking[0]}); attributes of every image here: "
                        f"{', '.join(available_attributes(dataset)) or 'none'}")
    return out


def default_stratify(dataset: Dataset) -> str:
    """The attribute a split of this dataset is stratified by when none is asked for."""
    have = set(available_attributes(dataset))
    for name in STRATIFY_PREFERENCE:
        if name in have and len(set(attribute_values(dataset, name).values())) > 1:
            return name
    return "cell_type"


def value_counts(values: dict[str, str]) -> dict[str, int]:
    """value -> number of images, most frequent first (ties by name)."""
    c = Counter(values.values())
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
