"""Shared fixtures: a tiny synthetic dataset and the real annotations in ../shared (skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.util import shared_data

# multi-threaded torch on a loaded 2-core box is ~10x slower than single-threaded (DEVELOPERS.md)
os.environ.setdefault("OMP_NUM_THREADS", "1")



@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_data()
    if d is None:
        pytest.skip("../shared/data is not present")
    return d


@pytest.fixture(scope="session")
def real_csv(shared) -> Path:
    p = shared / "sartorius_gallegi_t4e" / "derived" / "val_fold0_part1_56ids_sartorius_rle.csv"
    if not p.is_file():
        pytest.skip(f"{p} is not present")
    return p


@pytest.fixture(scope="session")
def real_json(shared) -> Path:
    p = shared / "sartorius_gallegi_t4e" / "data" / "val_fold0_split_part1.json"
    if not p.is_file():
        pytest.skip(f"{p} is not present")
    return p


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """12 synthetic Sartorius-format images of 128x128 (seconds to make)."""
    from bench.data.synth import generate

    out = tmp_path_factory.mktemp("synth") / "tiny"
    generate(out, n_images=12, size=(128, 128), seed=0)
    return out
