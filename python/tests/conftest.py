import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "ffwd" / "tests" / "fixtures"


@pytest.fixture
def blobs():
    """Three Gaussian classes in 8 dimensions (seeded)."""
    r = np.random.default_rng(0)
    centers = r.normal(scale=3.0, size=(3, 8))
    y = r.integers(0, 3, size=600)
    x = (centers[y] + r.normal(size=(600, 8))).astype(np.float32)
    return x, y


@pytest.fixture
def ffwd_bin():
    """The `ffwd` binary built by `cargo build --release` (or $FFWD_BIN)."""
    path = pathlib.Path(os.environ.get("FFWD_BIN", ROOT / "target" / "release" / "ffwd"))
    if not path.exists():
        pytest.skip(f"{path} not built (cargo build --release)")
    return path
