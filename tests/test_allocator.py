"""utils/allocator.py: freed memory stays in the process (no page faults on reuse), and the
user's own malloc settings or the opt-out switch win.  Each case runs in a fresh interpreter:
the setting is per process."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

# Allocates, touches and frees 64 MiB (beyond glibc's largest mmap threshold) through malloc
# (as torch's CPU allocator does) and counts the page faults of doing it again.
PROBE = """
import ctypes, resource
from utils.allocator import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    before = faults()
    block = libc.malloc(64 << 20)
    libc.memset(block, 1, 64 << 20)
    libc.free(block)
print(applied, faults() - before)
"""
PAGES = 64 * 2**20 // 4096

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc settings apply to glibc only")


def probe(**env_changes: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                        "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_", "LD_PRELOAD",
                        "BIRDSEP_KEEP_FREED_MEMORY")}
    env.update(env_changes, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = probe()
    assert applied
    assert faults < PAGES // 10


@glibc_only
def test_the_switch_and_the_users_settings_turn_it_off():
    applied, faults = probe(BIRDSEP_KEEP_FREED_MEMORY="0")
    assert not applied
    assert faults > PAGES // 2          # glibc's default: fresh pages every time
    applied, _ = probe(MALLOC_TRIM_THRESHOLD_="1048576")
    assert not applied
