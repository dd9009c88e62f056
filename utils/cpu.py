"""What this CPU can do, read once from Linux's /proc/cpuinfo."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86's AVX512_BF16 or AMX-BF16, read from
    Linux's /proc/cpuinfo). False elsewhere: other CPUs emulate bf16, not measured here."""
    try:
        return lists_bf16_flag(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def lists_bf16_flag(cpuinfo: str) -> bool:
    """Whether the `flags` line of a /proc/cpuinfo text names a bf16 multiply instruction."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.partition(":")[2].split()))
    return False
