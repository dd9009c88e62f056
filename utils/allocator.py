"""Keep freed memory in the process (glibc malloc), so training steps stop page-faulting.

PyTorch's CPU allocator is plain malloc.  With glibc's defaults, every tensor above the mmap
threshold (at most 32 MiB) is a fresh mmap, and freed memory at the top of the heap goes back
to the kernel as soon as more than a few MiB are free.  A training step frees all its
activations in the backward pass, so the next step gets them back as new pages: each one is
faulted in and zeroed by the kernel before torch writes it.  These settings remove nearly all
of those page faults, which makes thesis-size training steps and inference markedly faster for
asteroid's model and the fast one alike (RESULTS.md, Speed); small tensors (the CPU preset's)
gain little.  train.py, eval.py and separate.py apply them.

`keep_freed_memory()` tells malloc to serve every size from the heap and never trim it, as
CUDA's caching allocator does for GPU memory: the resident size stays at the peak of the
run instead of shrinking between steps.  Settings the user gave malloc through the
environment win.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Environment variables through which glibc users tune malloc themselves.
_USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_", "LD_PRELOAD")
# Opt-out: BIRDSEP_KEEP_FREED_MEMORY=0.
_SWITCH = "BIRDSEP_KEEP_FREED_MEMORY"

_applied: list[bool] = []


def keep_freed_memory() -> bool:
    """Apply the malloc settings once per process; True when they are in effect.

    No-op (False) off Linux/glibc, when the environment already tunes malloc (or preloads
    another allocator), or with BIRDSEP_KEEP_FREED_MEMORY=0."""
    if _applied:
        return _applied[0]
    _applied.append(_apply())
    return _applied[0]


def _apply() -> bool:
    if os.environ.get(_SWITCH, "1") == "0":
        return False
    user = [name for name in _USER_SETTINGS if os.environ.get(name)]
    if user:
        log.info("malloc left as configured by %s", ", ".join(user))
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt tunables of this kind)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Never give the top of the heap back; serve large blocks from the heap, not from mmap
    # (mmap'd blocks are unmapped on free, whatever the trim threshold).
    ok = mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(M_MMAP_MAX, 0) == 1
    if not ok:
        log.warning("mallopt refused the settings; freed memory goes back to the kernel")
    return ok
