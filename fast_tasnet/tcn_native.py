"""Fused CPU kernels for tasnet.py's gLN blocks and mask head (csrc/tcn_kernels.c), built
on first use.

torch runs a block's elementwise steps and reductions (PReLU, norm statistics, depthwise taps
and their gradients) as a dozen separate passes over (batch, frames, hidden) tensors, and the
mask head's backward (decoder product, masking, activation) as six; these kernels do each
group in one pass.  Speed: `python -m tools.benchmark` (figures in RESULTS.md, Speed).

The C file is compiled with the system's C compiler (`cc`, or $CC) for this CPU
(-march=native) into a cache directory ($BIRDSEP_CACHE, default ~/.cache/birdsep), keyed by the
source, the flags and the CPU, and loaded with ctypes; no torch headers, so it builds in about a
second.  Without a compiler, or with BIRDSEP_NATIVE=0, `kernels()` returns None and
tasnet.py uses its torch implementation (same results, slower); the reason is logged once.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "tcn_kernels.c"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
ENV_SWITCH = "BIRDSEP_NATIVE"

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}            # "lib": the loaded library or None, "reason": why None


class NativeKernelError(RuntimeError):
    """A native kernel reported a failure (out of memory)."""


def _cpu_signature() -> str:
    """CPU model and flags, so that a cache shared between machines never runs code built for
    another CPU (-march=native)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    root = os.environ.get("BIRDSEP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "birdsep")
    return Path(root)


def build(compiler: Optional[str] = None) -> Path:
    """Compile the kernels (if not cached) and return the shared library's path.
    Raises RuntimeError with the compiler's message when it fails."""
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler '{compiler}' on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler,) + CFLAGS).encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"tcn_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builds (DataLoader workers, parallel
    # tests) never load a half-written library.
    fd, part = tempfile.mkstemp(suffix=".so.part", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", part],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(part, target)
    finally:
        if os.path.exists(part):
            os.unlink(part)
    return target


_LONG, _FLOAT, _INT, _PTR = ctypes.c_long, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "bias_prelu_stats": [_PTR, _PTR, _LONG, _LONG, _LONG, _FLOAT, _PTR, _INT],
    "depthwise_prelu_stats": [_PTR, _PTR, _LONG, _LONG, _LONG, _LONG, _PTR, _PTR, _PTR, _PTR,
                              _FLOAT, _PTR, _INT],
    "norm_prelu_backward_taps": [_PTR, _PTR, _PTR, _LONG, _LONG, _LONG, _LONG, _PTR, _PTR, _PTR,
                                 _PTR, _PTR, _FLOAT, _PTR, _PTR, _PTR, _PTR, _INT],
    "norm_depthwise_prelu_backward": [_PTR, _PTR, _PTR, _LONG, _LONG, _LONG, _LONG, _PTR, _PTR,
                                      _PTR, _PTR, _PTR, _FLOAT, _PTR, _PTR, _INT],
    "mask_decode_backward": [_PTR, _PTR, _PTR, _PTR, _LONG, _LONG, _LONG, _LONG, _INT, _PTR, _PTR,
                             _PTR, _INT],
}
# Mask activations of mask_decode_backward (the C file's ACT_* codes).
MASK_ACTIVATIONS = {"linear": 0, "relu": 1, "sigmoid": 2, "softmax": 3}


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


def kernels() -> Optional["NativeKernels"]:
    """The kernels, or None when they are switched off or cannot be built (reason logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = NativeKernels(_load())
            except (OSError, RuntimeError) as err:
                _state["lib"], _state["reason"] = None, str(err)
                log.warning("native TCN kernels unavailable (%s); using the torch "
                            "implementation (same results, slower)", err)
    return _state["lib"]


def unavailable_reason() -> Optional[str]:
    """Why `kernels()` returned None (after a call), or None."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    return _state.get("reason")


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("native kernels take contiguous CPU tensors")


class NativeKernels:
    """Typed wrappers: tensors in, tensors out; shapes as in csrc/tcn_kernels.c."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def _call(self, name: str, *args) -> None:
        if getattr(self.lib, name)(*args, torch.get_num_threads()) != 0:
            raise NativeKernelError(f"{name}: out of memory")

    def bias_prelu_stats_(self, x: torch.Tensor, bias: torch.Tensor, slope: float) -> torch.Tensor:
        """x = leaky_relu(x + bias) in place, x (B, T, C), bias (C,); returns (B, 2) float64
        (mean, sum of squared deviations from the mean) per item."""
        _check(x, bias)
        batch, frames, chans = x.shape
        sums = torch.empty(batch, 2, dtype=torch.float64)
        self._call("bias_prelu_stats", _ptr(x), _ptr(bias), batch, frames, chans, slope,
                   _ptr(sums))
        return sums

    def depthwise_prelu_stats(self, p: torch.Tensor, taps: torch.Tensor, shift: torch.Tensor,
                              bias: torch.Tensor, offsets: torch.Tensor, slope: float,
                              out: torch.Tensor) -> torch.Tensor:
        """out = leaky(depthwise(p) ...) (see the C file); taps, shift: (B, P, C); offsets: (P,)
        int64.  Returns (B, 2) float64 (mean, sum of squared deviations) per item of out."""
        _check(p, taps, shift, bias, offsets, out)
        batch, frames, chans = p.shape
        sums = torch.empty(batch, 2, dtype=torch.float64)
        self._call("depthwise_prelu_stats", _ptr(p), _ptr(out), batch, frames, chans,
                   offsets.numel(), _ptr(offsets), _ptr(taps), _ptr(shift), _ptr(bias), slope,
                   _ptr(sums))
        return sums

    def norm_prelu_backward_taps_(self, g: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                                  offsets: torch.Tensor, coef_q: torch.Tensor,
                                  coef_c: torch.Tensor, q_mean: torch.Tensor,
                                  p_mean: torch.Tensor, slope: float):
        """In place on g; q_mean, p_mean (B,): the norms' means that centre q and p.
        Returns (neg (B,), item_sum (B, C), tap_sum (B, P, C), tap_dot (B, P, C)), float64."""
        _check(g, q, p, offsets, coef_q, coef_c, q_mean, p_mean)
        batch, frames, chans = g.shape
        n_taps = offsets.numel()
        neg = torch.empty(batch, dtype=torch.float64)
        item_sum = torch.empty(batch, chans, dtype=torch.float64)
        tap_sum = torch.empty(batch, n_taps, chans, dtype=torch.float64)
        tap_dot = torch.empty(batch, n_taps, chans, dtype=torch.float64)
        self._call("norm_prelu_backward_taps", _ptr(g), _ptr(q), _ptr(p), batch, frames, chans,
                   n_taps, _ptr(offsets), _ptr(coef_q), _ptr(coef_c), _ptr(q_mean),
                   _ptr(p_mean), slope, _ptr(neg),
                   _ptr(item_sum), _ptr(tap_sum), _ptr(tap_dot))
        return neg, item_sum, tap_sum, tap_dot

    def norm_depthwise_prelu_backward(self, p: torch.Tensor, g: torch.Tensor,
                                      taps: torch.Tensor, offsets: torch.Tensor,
                                      coef_p: torch.Tensor, coef_c: torch.Tensor,
                                      p_mean: torch.Tensor, slope: float, out: torch.Tensor):
        """Writes out (p centred by p_mean (B,)); returns (neg (B,), col_sum (C,)), float64."""
        _check(p, g, taps, offsets, coef_p, coef_c, p_mean, out)
        batch, frames, chans = p.shape
        neg = torch.empty(batch, dtype=torch.float64)
        col_sum = torch.empty(chans, dtype=torch.float64)
        self._call("norm_depthwise_prelu_backward", _ptr(p), _ptr(g), _ptr(out), batch, frames,
                   chans, offsets.numel(), _ptr(offsets), _ptr(taps), _ptr(coef_p), _ptr(coef_c),
                   _ptr(p_mean), slope, _ptr(neg), _ptr(col_sum))
        return neg, col_sum

    def mask_decode_backward(self, grad_frames: torch.Tensor, w_dec: torch.Tensor,
                             mask: torch.Tensor, tf_rep: torch.Tensor, activation: str):
        """Backward of frames = (act(score) * tf_rep) @ w_dec^T (see the C file).
        grad_frames (R, S, L), w_dec (L, N), mask (R, S, N) = act(score), tf_rep (R, N).
        Returns (grad_score (R, S, N), grad_tf_rep (R, N), grad_w_dec (L, N) float64)."""
        _check(grad_frames, w_dec, mask, tf_rep)
        rows, n_src, taps = grad_frames.shape
        n_filters = w_dec.shape[1]
        grad_score = torch.empty_like(mask)
        grad_tf = torch.empty_like(tf_rep)
        grad_w = torch.empty(taps, n_filters, dtype=torch.float64)
        self._call("mask_decode_backward", _ptr(grad_frames), _ptr(w_dec), _ptr(mask),
                   _ptr(tf_rep), rows, n_src, n_filters, taps, MASK_ACTIVATIONS[activation],
                   _ptr(grad_score), _ptr(grad_tf), _ptr(grad_w))
        return grad_score, grad_tf, grad_w


def offsets_tensor(offsets: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(offsets), dtype=torch.long)
