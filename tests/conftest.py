"""Shared fixtures: the real xeno-canto dump in ../shared, tiny conf files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def xc_dump() -> Path:
    """The shared xeno-canto dump (recordings.json + audio/XC<id>.mp3)."""
    path = Path(os.environ.get("BIRDSEP_XC_DUMP", REPO_ROOT.parent / "shared" / "xeno-canto"))
    if not (path / "recordings.json").is_file():
        pytest.fail(f"xeno-canto dump not found at {path}; set BIRDSEP_XC_DUMP")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
