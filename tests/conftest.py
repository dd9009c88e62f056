"""Shared fixtures: the real xeno-canto dump in ../shared, tiny conf files."""
from __future__ import annotations

import os
import shutil
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


# A Conv-TasNet small enough for CPU tests (model-section keys of conf.yml).
TINY_MODEL = dict(n_filters=16, kernel_size=16, bn_chan=8, hid_chan=16, skip_chan=8,
                  conv_kernel_size=3, n_blocks=2, n_repeats=1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """CI has 2 cores shared by pytest and its subprocesses: one torch thread per test."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# torch.compile's CPU backend builds C++: tests that compile need a compiler.
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="torch.compile's CPU backend needs a C++ compiler")


@pytest.fixture
def fresh_dynamo():
    """No graphs compiled by an earlier test are reused (each test compiles its own), and
    none are left to later tests."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def shifted_depthwise_only(monkeypatch, fresh_dynamo):
    """Compiled code must run the shifted depthwise form: the F.conv1d form raises."""
    import fast_tasnet

    def no_conv(*args):
        raise AssertionError("the compiled model ran the F.conv1d depthwise form")

    monkeypatch.setitem(fast_tasnet.DEPTHWISE_FORMS, "conv", no_conv)
