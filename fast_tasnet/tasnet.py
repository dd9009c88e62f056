"""Conv-TasNet that trains and separates several times faster on CPU than asteroid's, with the
same parameters.

`FastConvTasNet` is asteroid's `ConvTasNet` (same constructor, same submodules, same
state-dict keys, same `serialize()` format) whose forward pass reads those parameters through a
faster implementation:

* Everything runs channels-last, `(batch, frames, channels)`, so each 1x1 convolution is a
  plain matrix product over `batch * frames` rows; the encoder is unfold + matmul and the
  decoder matmul + overlap-add.
* The norm before a 1x1 convolution is folded into it: gain into the weights, bias into the
  output bias, and the mean / scale of the norm applied to the (narrower) product.  With gLN
  (statistics per item) the first norm of a block also folds into the depthwise taps, and the
  second one's per-item scale applies to the block's residual and skip outputs.
* On x86-64 CPUs in float32 the tall products (rows = batch x frames: the forward products and
  the input gradients) run on oneDNN's matmul, which torch ships (`torch.ops.mkldnn`), rather
  than MKL's sgemm behind torch.mm (faster for these shapes: RESULTS.md); a gLN block's
  residual and skip outputs are then one product over all items, scaled per item after it.
  In separation a sigmoid or ReLU mask activation runs inside its product.  BIRDSEP_ONEDNN=0
  keeps torch.mm.
* The depthwise dilated convolution is the sum of its taps, `y[t] = b + sum_k w_k x[t + o_k]`,
  computed as multiply-adds on shifted slices (asteroid's depthwise conv backward is slow).
* On CPU in float32 each TCN block is one `torch.autograd.Function` with a hand-written
  backward that keeps three activations per block (asteroid's autograd keeps about a dozen),
  reuses scratch buffers instead of allocating, and computes its reductions with torch's
  cascade sums in chunks (long BLAS dot products would lose digits).  Without autograd
  (inference) two buffers serve all blocks.
* gLN blocks with positive PReLU slopes (the usual case) run their elementwise steps and
  reductions through the fused C kernels of tcn_native.py (one pass where torch needs several;
  built on first use with the system's C compiler); without a compiler, or with
  BIRDSEP_NATIVE=0, the same math runs on torch operators.
* In training on CPU, the mask head (output activation, masking, the decoder's matrix
  product) is one `torch.autograd.Function` too, whose backward is one pass of a C kernel
  (or, without one, a GEMM and a few torch passes).
* Under CPU bf16 autocast (Lightning's bf16-mixed) the same path runs with the gLN blocks'
  matrix products in bf16 (operands rounded to bf16, results in float32; nearly all of the
  model's arithmetic) and everything else in float32: faster products and thesis training steps
  on a CPU with AVX512_BF16 (CPUs without bf16 instructions emulate them: not measured here,
  expected slower).
* Elsewhere (CUDA, other autocast, float64 unless `impl="function"`) the same channels-last
  formulation runs on plain autograd operators, with gLN statistics in float32 or better.

Variants the fast path does not cover (norms other than gLN/cLN, filterbanks other than the
free one, multi-channel input, a masker other than TDConvNet) run asteroid's own modules, so the
model is never wrong, only slower.  Checkpoints load both ways with `strict=True`;
`serialize()` writes `model_name="ConvTasNet"` (and `who_is_pinv`), so asteroid's
`ConvTasNet.from_pretrained` loads it; `FastConvTasNet.from_pretrained` loads either.
`torch.jit.trace` records asteroid's forward (the fast path's in-place autograd functions
cannot be traced); the trace gives the same outputs.  Norm statistics are centred (never
E[x^2] - mean^2), so float32 gradients stay as accurate as asteroid's own
(tests/test_fast_gradients.py).
Speed and parity: `python -m tools.benchmark` (figures in RESULTS.md).
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from asteroid.masknn import norms
from asteroid.masknn.convolutional import TDConvNet, _Chop1d
from asteroid.models import ConvTasNet
from asteroid.utils.hub_utils import cached_download
from asteroid.utils.torch_utils import pad_x_to_y
from asteroid_filterbanks import FreeFB

from . import tcn_native

# asteroid's norms add this to the variance (norms.GlobLN / ChanLN default EPS).
NORM_EPS = 1e-8
# Element count of the temporary products summed chunk by chunk (bounded scratch memory).
_CHUNK_ELEMS = 1 << 20
IMPLEMENTATIONS = ("auto", "function", "autograd", "stock")


class _Workspace(threading.local):
    """Scratch buffers reused across blocks and steps (fresh allocations of large tensors cost
    page faults that can exceed the arithmetic).  Per thread; only for temporaries that never
    leave the function that borrowed them."""

    def __init__(self):
        self.buffers = {}

    def get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        # Tensors made under inference_mode cannot be updated outside it: separate buffers.
        key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.buffers[key] = buf
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the scratch buffers of the calling thread."""
    _WORKSPACE.buffers.clear()


# ----------------------------------------------------------------------------------------------
# Norm statistics on channels-last tensors.  gLN: one group per item (frames x channels);
# cLN: one group per frame (channels).  Statistics are shaped to broadcast against (B, T, C).
# ----------------------------------------------------------------------------------------------
def _group_view(x: torch.Tensor, kind: str) -> torch.Tensor:
    batch, frames, chans = x.shape
    return x.reshape(batch, frames * chans) if kind == "gLN" else x.reshape(batch * frames, chans)


def _stat_shape(x: torch.Tensor, kind: str) -> tuple:
    batch, frames, _ = x.shape
    return (batch, 1, 1) if kind == "gLN" else (batch, frames, 1)


def _norm_stats(x: torch.Tensor, kind: str, eps: float = NORM_EPS):
    """Mean and 1/sqrt(var + eps) per norm group (biased variance, as asteroid), centred
    (torch's var_mean): never E[x^2] - mean^2, which cancels when the mean is large against
    the spread."""
    var, mean = torch.var_mean(_group_view(x, kind), dim=1, correction=0)
    shape = _stat_shape(x, kind)
    return mean.view(shape), (var + eps).rsqrt_().view(shape)


def _group_sum(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Sum of a (B, T) per-frame quantity over each norm group, shaped like the statistics."""
    return x.sum(1).view(-1, 1, 1) if kind == "gLN" else x.unsqueeze(-1)


def _sum_over_time_of_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_t a[:, t, :] * b[:, t, :] -> (B, C), chunk by chunk (never the whole product in
    memory)."""
    batch, frames, chans = a.shape
    step = min(frames, max(1, _CHUNK_ELEMS // max(1, batch * chans)))
    total = None
    for start in range(0, frames, step):
        stop = min(frames, start + step)
        prod = _WORKSPACE.get("product", (batch, stop - start, chans), a)
        part = torch.mul(a[:, start:stop], b[:, start:stop], out=prod).sum(1)
        total = part if total is None else total.add_(part)
    return total


def _negative_part_dot(grad: torch.Tensor, x: torch.Tensor) -> float:
    """sum(grad * min(x, 0)) (the gradient of a PReLU slope).  Chunk by chunk with torch's
    cascade sums: the terms cancel, and a long float32 dot product (BLAS) loses digits."""
    g, v = grad.reshape(-1), x.reshape(-1)
    total = 0.0
    for start in range(0, v.numel(), _CHUNK_ELEMS):
        stop = start + _CHUNK_ELEMS
        chunk = v[start:stop]
        prod = torch.clamp(chunk, max=0, out=_WORKSPACE.get("product", chunk.shape, chunk))
        total += float(prod.mul_(g[start:stop]).sum())
    return total


def _rows_dot(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per norm group, sum of a * b over (B, T, C) tensors, shaped like the
    statistics.  Chunk by chunk with torch's cascade sums (a BLAS dot product accumulates
    millions of float32 terms in a few running sums and loses digits)."""
    batch, frames, chans = a.shape
    step = min(frames, max(1, _CHUNK_ELEMS // max(1, batch * chans)))
    total = a.new_zeros(batch) if kind == "gLN" else a.new_empty(batch, frames)
    for start in range(0, frames, step):
        stop = min(frames, start + step)
        prod = _WORKSPACE.get("product", (batch, stop - start, chans), a)
        part = a[:, start:stop]
        torch.mul(part, b[:, start:stop], out=prod)
        if kind == "gLN":
            total += prod.view(batch, -1).sum(1)
        else:
            total[:, start:stop] = prod.sum(-1)
    return total.view(batch, 1, 1) if kind == "gLN" else total.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# "norm -> 1x1 conv" with the norm's affine folded into the product:
#   z = rstd * ((q - mean) @ W'^T) + b',  W' = W * gamma,  b' = b + W @ beta
# ----------------------------------------------------------------------------------------------
def fold_norm_into_linear(weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                          beta: torch.Tensor):
    """Weights of `linear(norm_affine(x))` as `linear'(normalised x)` (differentiable)."""
    return weight * gamma, bias + weight @ beta


def _norm_linear_forward(q: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kind: str):
    batch, frames, chans = q.shape
    mean, rstd = _norm_stats(q, kind)
    # Centred before the product: rstd * (q @ W'^T) - rstd * mean * rowsum(W') would cancel
    # when the mean is large against the spread.
    centred = torch.sub(q, mean, out=_WORKSPACE.get("centred", q.shape, q))
    z = _linear(centred.view(-1, chans), w).view(batch, frames, -1)
    z.mul_(rstd).add_(b)
    return z, mean, rstd


def _norm_linear_backward(grads, q: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, kind: str):
    """Gradients of `_norm_linear_forward` w.r.t. q (new tensor), w and b.

    `grads`: gradients of consecutive column ranges of z (None for an unused range).
    Centred throughout: with c = q - mean and g = rstd * (dz @ W'), the input gradient is
    g - mean(g) - c * rstd^2 * mean(g * c) per norm group (no large terms that cancel)."""
    batch, frames, chans = q.shape
    n = chans * (frames if kind == "gLN" else 1)
    out_chans = w.shape[0]
    scaled = q.new_empty(batch, frames, out_chans)           # rstd * dz
    grad_b = q.new_zeros(out_chans)
    col = 0
    for grad in grads:
        width = grad.shape[-1]
        cols = slice(col, col + width)
        torch.mul(grad, rstd, out=scaled[..., cols])
        grad_b[cols] = grad.sum((0, 1))
        col += width
    centred = torch.sub(q, mean, out=_WORKSPACE.get("centred", q.shape, q))
    scaled2d = scaled.view(-1, out_chans)
    grad_w = torch.mm(scaled2d.t(), centred.view(-1, chans))
    grad_q = _linear(scaled2d, w.t()).view(batch, frames, chans)
    group_mean = _group_sum(grad_q.sum(-1), kind) / n
    coef = (rstd * rstd) * _rows_dot(centred, grad_q, kind) / -n
    grad_q.addcmul_(centred, coef).sub_(group_mean)
    return grad_q, grad_w, grad_b


# ----------------------------------------------------------------------------------------------
# Depthwise dilated convolution as a sum of shifted taps: y[t] = b + sum_k w[:, k] x[t + o_k].
# ----------------------------------------------------------------------------------------------
def _tap_slices(offset: int, frames: int):
    """(output slice, input slice) along time for one tap, or None when it never overlaps."""
    if abs(offset) >= frames:
        return None
    if offset >= 0:
        return slice(0, frames - offset), slice(offset, frames)
    return slice(-offset, frames), slice(0, frames + offset)


def _depthwise(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], offsets,
               out: Optional[torch.Tensor] = None, accumulate: bool = False) -> torch.Tensor:
    """taps: (P, C), or (P, B, 1, C) for per-item taps; offsets: P ints.
    With `accumulate`, the taps are added to `out` (bias ignored)."""
    frames = x.shape[1]
    first = offsets.index(0) if 0 in offsets and not accumulate else None
    if out is None:
        out = torch.empty_like(x)
    if accumulate:
        pass
    elif first is not None:
        if bias is None:
            torch.mul(x, taps[first], out=out)
        else:
            torch.addcmul(bias, x, taps[first], out=out)
    else:
        out.zero_()
        if bias is not None:
            out.add_(bias)
    for k, offset in enumerate(offsets):
        sl = _tap_slices(offset, frames)
        if k == first or sl is None:
            continue
        out[:, sl[0]].addcmul_(x[:, sl[1]], taps[k])
    return out


def _depthwise_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets) -> torch.Tensor:
    """(P, C) gradient of the taps."""
    frames = x.shape[1]
    rows = []
    for offset in offsets:
        sl = _tap_slices(offset, frames)
        if sl is None:
            rows.append(grad.new_zeros(grad.shape[-1]))
        else:
            rows.append(_sum_over_time_of_product(grad[:, sl[0]], x[:, sl[1]]).sum(0))
    return torch.stack(rows)


def _prelu_forward(x: torch.Tensor, slope: float, inplace: bool):
    """PReLU with one slope (= leaky ReLU).  Returns (output, saved tensor, saved-is-output):
    for a positive slope the output alone determines the backward pass."""
    if slope > 0:
        out = F.leaky_relu_(x, slope) if inplace else F.leaky_relu(x, slope)
        return out, out, True
    return F.leaky_relu(x, slope), x, False


def _prelu_backward_(grad: torch.Tensor, saved: torch.Tensor, slope: float, is_result: bool):
    """In place on `grad`; returns the gradient of the slope."""
    neg_dot = _negative_part_dot(grad, saved)
    grad_slope = neg_dot / slope if is_result else neg_dot
    torch.ops.aten.leaky_relu_backward.grad_input(grad, saved, slope, is_result, grad_input=grad)
    return grad.new_tensor([grad_slope])


# ----------------------------------------------------------------------------------------------
# Matrix products in a lower precision (`gemm`: None, or torch.bfloat16 under CPU bf16 autocast):
# the operands are rounded to it, the products come back in the activations' float32.  bf16
# products run faster than float32's on a CPU with AVX512_BF16 (RESULTS.md); the roundings cost
# a pass each.
# ----------------------------------------------------------------------------------------------
def _low(t: torch.Tensor, gemm: Optional[torch.dtype]) -> torch.Tensor:
    return t if gemm is None else t.to(gemm)


def _mm(a: torch.Tensor, b: torch.Tensor, gemm: Optional[torch.dtype],
        out: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[bias +] a @ b, the product in `gemm` precision; into `out` where torch computes it
    (the result is what counts: oneDNN's products come in a new tensor)."""
    if gemm is None:
        matrix_bias = bias is not None and bias.dim() == 2
        return _linear(a, b.t(), bias=None if matrix_bias else bias,
                       add=bias if matrix_bias else None, out=out)
    product = torch.mm(_low(a, gemm), _low(b, gemm))
    result = product.float() if out is None else out.copy_(product)
    return result if bias is None else result.add_(bias)


# Tall float32 products on CPU (rows = batch x frames, 128-1024 columns) go to oneDNN's matmul,
# the op torch.compile's CPU backend emits for linear layers, instead of MKL's sgemm behind
# torch.mm.  On this project's 2-core AMD EPYC (Zen 4) oneDNN was faster for the thesis
# model's forward and input-gradient products (RESULTS.md); the weight-gradient products (long
# sums over the rows) were as fast or faster with MKL and stay with torch.mm.  x86-64 only: elsewhere torch.mm's BLAS (Apple's Accelerate on
# Apple silicon, for one) was not measured against oneDNN.  BIRDSEP_ONEDNN=0 turns this off.
_ONEDNN_MIN_ROWS = 1024
_ONEDNN_MACHINES = ("x86_64", "amd64")
_ONEDNN_SWITCH = "BIRDSEP_ONEDNN"
_onednn_state: dict = {}          # "op": torch.ops.mkldnn._linear_pointwise, or None


def _onednn_op():
    if "op" not in _onednn_state:
        op = None
        if (platform.machine().lower() in _ONEDNN_MACHINES
                and torch.backends.mkldnn.is_available()):
            try:
                op = torch.ops.mkldnn._linear_pointwise
            except (AttributeError, RuntimeError):     # a torch build without the op
                op = None
        _onednn_state["op"] = op
    if os.environ.get(_ONEDNN_SWITCH, "1") == "0":
        return None
    return _onednn_state["op"]


def _onednn_for(a: torch.Tensor):
    """The oneDNN op when `_linear(a, ...)` would use it (float32 CPU rows, contiguous, at
    least _ONEDNN_MIN_ROWS of them, no autograd, not under torch.compile), else None."""
    # Under torch.compile the compiler picks the products; dynamo cannot trace the first
    # call's machine check (platform.uname) either.
    if (torch.compiler.is_compiling() or torch.is_grad_enabled() or a.dtype != torch.float32
            or a.device.type != "cpu" or a.stride(1) != 1 or a.shape[0] < _ONEDNN_MIN_ROWS):
        return None
    return _onednn_op()


# Activations oneDNN applies inside its products (and torch's in-place equivalents).
_FUSED_ACTS = {"relu": torch.relu_, "sigmoid": torch.sigmoid_}


def _linear(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
            add: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
            activation: Optional[str] = None) -> torch.Tensor:
    """a @ weight^T [+ bias (per column)] [+ add (a matrix shaped like the result)], then
    `activation` (one of _FUSED_ACTS, not with `add`) for a 2-D `a`: through oneDNN where
    `_onednn_for(a)` says so (a new tensor; the op has no backward), else torch's addmm (into
    `out` if given)."""
    op = _onednn_for(a)
    if op is not None:
        try:
            if add is None:
                return op(a, weight, bias, activation or "none", [], "")
            assert activation is None, "no activation after an addition"
            return op.binary(a, add, weight, bias, "add")
        except RuntimeError as err:   # e.g. no oneDNN kernel for this CPU: torch from now on
            _onednn_state["op"] = None
            logging.getLogger(__name__).warning("oneDNN matmul failed (%s); using torch.mm",
                                                err)
    if add is None and bias is None:
        result = torch.mm(a, weight.t(), out=out)
    else:
        result = torch.addmm(add if add is not None else bias, a, weight.t(), out=out)
        if add is not None and bias is not None:
            result.add_(bias)
    return result if activation is None else _FUSED_ACTS[activation](result)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gemm: Optional[torch.dtype],
            alpha: float = 1.0) -> torch.Tensor:
    """acc += alpha * a @ b, in place, the product in `gemm` precision."""
    if gemm is None:
        return acc.addmm_(a, b, alpha=alpha)
    return acc.add_(torch.mm(_low(a, gemm), _low(b, gemm)), alpha=alpha)


# ----------------------------------------------------------------------------------------------
# Autograd functions (CPU, float32).
# ----------------------------------------------------------------------------------------------
def _first_conv_gemms(grad_u, x, w_in, grad_x_out, n_res, gemm=None):
    """GEMMs of a block's first 1x1 conv backward: (grad_x (batch*frames, chans), grad_w_in)."""
    hid, chans = w_in.shape
    grad_u2d = _low(grad_u.view(-1, hid), gemm)
    grad_w_in = _mm(grad_u2d.t(), x.view(-1, chans), gemm)
    if grad_x_out is not None and n_res:   # residual: the GEMM adds to the incoming grad
        grad_x = _mm(grad_u2d, w_in, gemm, bias=grad_x_out.reshape(-1, chans))
    else:
        grad_x = _mm(grad_u2d, w_in, gemm)
    return grad_x, grad_w_in


def _first_conv_backward(grad_p, saved1, a1, is_result1, x, w_in, grad_x_out, n_res, gemm=None):
    """Backward of a block's first 1x1 conv and PReLU, shared by both block kernels.
    Returns (grad_x (batch*frames, chans), grad_w_in, grad_b_in, grad_slope1)."""
    grad_slope1 = _prelu_backward_(grad_p, saved1, a1, is_result1)
    grad_b_in = grad_p.view(-1, w_in.shape[0]).sum(0)
    grad_x, grad_w_in = _first_conv_gemms(grad_p, x, w_in, grad_x_out, n_res, gemm)
    return grad_x, grad_w_in, grad_b_in, grad_slope1


class _NormLinearFunction(torch.autograd.Function):
    """z = linear(norm(x)) with the norm's affine folded in the weights (see above)."""

    @staticmethod
    def forward(ctx, x, w, b, kind):
        x = x.contiguous()
        z, mean, rstd = _norm_linear_forward(x, w, b, kind)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.kind = kind
        return z

    @staticmethod
    def backward(ctx, gz):
        x, w, mean, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = _norm_linear_backward([gz], x, w, mean, rstd, ctx.kind)
        return grad_x, grad_w, grad_b, None


class _BlockFunction(torch.autograd.Function):
    """One Conv1DBlock plus the TCN's sums: returns (x + residual, skip + skip_out).

    The block: 1x1 conv, PReLU, norm, depthwise conv, PReLU, norm, [res | skip] 1x1 conv
    (`w_out` holds the first `n_res` residual rows, then the skip rows).  `skip` is None for
    the first block and is updated in place; an output is None when it has no rows.
    Keeps x and three hidden activations; recomputes nothing but a few reductions."""

    @staticmethod
    def forward(ctx, x, skip, w_in, b_in, slope1, gamma1, beta1, taps, b_dw, slope2, w_out,
                b_out, kind, offsets, n_res, gemm=None):
        # `gemm` is ignored: cLN blocks keep float32 products (lower precision: gLN blocks only).
        x = x.contiguous()
        batch, frames, chans = x.shape
        hid = w_in.shape[0]
        a1, a2 = float(slope1), float(slope2)
        u = torch.addmm(b_in, x.view(-1, chans), w_in.t()).view(batch, frames, hid)
        p, saved1, is_result1 = _prelu_forward(u, a1, inplace=True)
        mean1, rstd1 = _norm_stats(p, kind)
        normed = torch.sub(p, mean1).mul_(rstd1 * gamma1).add_(beta1)   # centred first
        if is_result1:
            del u
        v = _depthwise(normed, taps, b_dw, offsets)
        q, saved2, is_result2 = _prelu_forward(v, a2, inplace=True)
        z, mean2, rstd2 = _norm_linear_forward(q, w_out, b_out, kind)
        del v, q
        x_out = x + z[..., :n_res] if n_res else None
        skip_out = None
        if z.shape[-1] > n_res:
            if skip is None:
                # A copy, never a view of z: the next block updates skip in place, which
                # autograd refuses on a view (`.contiguous()` returns the view itself when z
                # has one frame and one item).
                skip_out = z[..., n_res:].clone()
            else:
                ctx.mark_dirty(skip)
                skip_out = skip.add_(z[..., n_res:])
        ctx.save_for_backward(x, saved1, normed, saved2, w_in, gamma1, beta1, taps, w_out,
                              mean1, rstd1, mean2, rstd2)
        ctx.cfg = (kind, offsets, a1, a2, is_result1, is_result2, n_res, skip is not None)
        return x_out, skip_out

    @staticmethod
    def backward(ctx, grad_x_out, grad_skip_out):
        (x, saved1, normed, saved2, w_in, gamma1, beta1, taps, w_out,
         mean1, rstd1, mean2, rstd2) = ctx.saved_tensors
        kind, offsets, a1, a2, is_result1, is_result2, n_res, had_skip = ctx.cfg
        batch, frames, chans = x.shape
        hid = w_in.shape[0]
        n_skip = w_out.shape[0] - n_res
        grads = []
        if n_res:
            grads.append(grad_x_out if grad_x_out is not None else x.new_zeros(batch, frames, n_res))
        if n_skip:
            grads.append(grad_skip_out if grad_skip_out is not None
                         else x.new_zeros(batch, frames, n_skip))
        # Second half: PReLU -> norm -> [res | skip] 1x1 conv.
        q = saved2 if is_result2 else F.leaky_relu(saved2, a2)
        grad_v, grad_w_out, grad_b_out = _norm_linear_backward(grads, q, w_out, mean2, rstd2,
                                                               kind)
        del q
        grad_slope2 = _prelu_backward_(grad_v, saved2, a2, is_result2)
        # Depthwise convolution.
        grad_b_dw = grad_v.sum((0, 1))
        grad_taps = _depthwise_weight_grad(grad_v, normed, offsets)
        grad_p = _depthwise(grad_v, taps, None, [-o for o in offsets])
        del grad_v
        # First norm.
        p = saved1 if is_result1 else F.leaky_relu(saved1, a1)
        if kind == "gLN":
            n = frames * hid
            sum_g = grad_p.sum(1)                                    # (B, H)
            p_c = p - mean1                                          # centred
            centred = _sum_over_time_of_product(grad_p, p_c)         # sum_t g * (p - mean)
            r1 = rstd1.view(batch, 1)
            grad_beta1 = sum_g.sum(0)
            grad_gamma1 = (r1 * centred).sum(0)
            mean_gxhat = (sum_g * gamma1).sum(1, keepdim=True) / n   # (B, 1)
            mean_gxhat_xhat = r1 * (centred * gamma1).sum(1, keepdim=True) / n
            coef_p = (-(r1 * r1) * mean_gxhat_xhat).view(batch, 1, 1)
            coef_c = (-r1 * mean_gxhat).view(batch, 1, 1)
            grad_p.mul_(rstd1 * gamma1).addcmul_(p_c, coef_p).add_(coef_c)
            del p_c
        else:
            grad_p, grad_gamma1, grad_beta1 = torch.ops.aten.native_layer_norm_backward(
                grad_p, p, [hid], mean1, rstd1, gamma1, beta1, [True, True, True])
        del p
        grad_x, grad_w_in, grad_b_in, grad_slope1 = _first_conv_backward(
            grad_p, saved1, a1, is_result1, x, w_in, grad_x_out, n_res)
        grad_skip = grad_skip_out if had_skip else None
        return (grad_x.view(batch, frames, chans), grad_skip, grad_w_in, grad_b_in, grad_slope1,
                grad_gamma1, grad_beta1, grad_taps, grad_b_dw, grad_slope2, grad_w_out,
                grad_b_out, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# gLN blocks: the statistics are per item, so the first norm folds into the depthwise taps and
# the second into per-item GEMM scalars; the residual and skip sums accumulate in the GEMMs.
# ----------------------------------------------------------------------------------------------
def _gln_depthwise(p: torch.Tensor, taps: torch.Tensor, b_dw: torch.Tensor, offsets,
                   scale: torch.Tensor, shift: torch.Tensor,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """depthwise(p * scale + shift) + b_dw, zero-padded, without forming p * scale + shift.
    scale, shift: (B, 1, C) per item and channel."""
    frames = p.shape[1]
    item_taps = taps[:, None, None, :] * scale                  # (P, B, 1, C)
    bias = b_dw + shift * taps.sum(0)                           # every tap sees `shift` ...
    out = _depthwise(p, item_taps, bias, offsets, out=out)
    for k, offset in enumerate(offsets):                        # ... but the padded ones
        if offset > 0:
            out[:, max(frames - offset, 0):] -= shift * taps[k]
        elif offset < 0:
            out[:, :min(-offset, frames)] -= shift * taps[k]
    return out


def _gln_output_gemms(q, rstd, mean, w_out, b_out, n_res, x, skip, gemm=None):
    """x + residual rows and skip + skip rows of `rstd * (q @ W'^T) + b' - rstd*mean*rowsum(W')`
    per item: with oneDNN one product then a scaled sum, with torch's products per-item GEMMs
    that accumulate (MKL was faster so).  `skip` (if given) is updated in place."""
    batch, frames, _ = q.shape
    out_chans = w_out.shape[0]
    shift = b_out - (rstd * mean).view(batch, 1) * w_out.sum(1)   # (B, O)
    rows = q.view(-1, q.shape[-1])
    if gemm is None and _onednn_for(rows) is not None:
        # One product for all items and both outputs (256 columns: oneDNN ran it faster than
        # MKL's per-item accumulating products), then each item's
        # scale and shift in a pass over the narrow outputs.
        z = _linear(rows, w_out).view(batch, frames, out_chans)
        item_rstd = rstd.view(batch, 1, 1)
        x_out = skip_out = None
        if n_res:
            x_out = torch.addcmul(x, z[..., :n_res], item_rstd).add_(shift[:, None, :n_res])
        if out_chans > n_res:
            skip_shift = shift[:, None, n_res:]
            if skip is None:
                skip_out = torch.addcmul(skip_shift, z[..., n_res:], item_rstd)
            else:
                skip_out = skip.addcmul_(z[..., n_res:], item_rstd).add_(skip_shift)
        return x_out, skip_out
    scales = rstd.view(-1).tolist()
    q = _low(q, gemm)
    x_out = skip_out = None
    if n_res:
        x_out = x + shift[:, None, :n_res]
        w_res_t = _low(w_out[:n_res].t(), gemm)
        for i in range(batch):
            _addmm_(x_out[i], q[i], w_res_t, gemm, alpha=scales[i])
    if out_chans > n_res:
        skip_shift = shift[:, None, n_res:]
        if skip is None:
            skip_out = skip_shift.expand(batch, frames, out_chans - n_res).clone()
        else:
            skip_out = skip.add_(skip_shift)
        w_skip_t = _low(w_out[n_res:].t(), gemm)
        for i in range(batch):
            _addmm_(skip_out[i], q[i], w_skip_t, gemm, alpha=scales[i])
    return x_out, skip_out


def _cpu_bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _native_kernels(x: torch.Tensor, *slopes: float):
    """tcn_native's kernels when they apply: CPU float32 and positive PReLU slopes (the
    kernels keep the PReLU outputs only).  None otherwise."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or min(slopes) <= 0:
        return None
    return tcn_native.kernels()


def _stats_from_moments(moments: torch.Tensor, count: int, like: torch.Tensor):
    """gLN (mean, rstd) shaped (B, 1, 1) from per-item float64 (mean, sum of squared
    deviations from the mean) of `count` values each (the native kernels' centred sums)."""
    var = moments[:, 1] / max(count, 1)
    rstd = (var + NORM_EPS).rsqrt_()
    return moments[:, 0].to(like.dtype).view(-1, 1, 1), rstd.to(like.dtype).view(-1, 1, 1)


def _gln_block_forward(x, skip, w_in, b_in, a1, gamma1, beta1, taps, b_dw, a2, w_out, b_out,
                       offsets, n_res, buffers=None, gemm=None):
    """Returns (x_out, skip_out, (saved1, is_result1, saved2, is_result2, stats))."""
    batch, frames, chans = x.shape
    hid = w_in.shape[0]
    native = _native_kernels(x, a1, a2)
    u, v = (None, None) if buffers is None else buffers
    if native is not None:
        # 1x1 conv, then bias + PReLU + statistics in one pass; depthwise + PReLU + statistics
        # in another.
        u = _mm(x.view(-1, chans), w_in.t(), gemm, out=u).view(batch, frames, hid)
        count = frames * hid
        mean1, rstd1 = _stats_from_moments(native.bias_prelu_stats_(u, b_in.contiguous(), a1),
                                           count, u)
        scale1 = rstd1 * gamma1                                     # (B, 1, H)
        shift1 = beta1 - mean1 * scale1
        v = torch.empty_like(u) if v is None else v
        sums2 = native.depthwise_prelu_stats(
            u, (taps * scale1).contiguous(), (taps * shift1).contiguous(), b_dw.contiguous(),
            tcn_native.offsets_tensor(offsets), a2, v)
        mean2, rstd2 = _stats_from_moments(sums2, count, v)
        x_out, skip_out = _gln_output_gemms(v, rstd2, mean2, w_out, b_out, n_res, x, skip,
                                            gemm)
        return x_out, skip_out, (u, True, v, True, (mean1, rstd1, mean2, rstd2))
    u = _mm(x.view(-1, chans), w_in.t(), gemm, out=u, bias=b_in).view(batch, frames, hid)
    p, saved1, is_result1 = _prelu_forward(u, a1, inplace=True)
    mean1, rstd1 = _norm_stats(p, "gLN")
    scale1 = rstd1 * gamma1
    shift1 = beta1 - mean1 * scale1
    v = _gln_depthwise(p, taps, b_dw, offsets, scale1, shift1, out=v)
    q, saved2, is_result2 = _prelu_forward(v, a2, inplace=True)
    mean2, rstd2 = _norm_stats(q, "gLN")
    x_out, skip_out = _gln_output_gemms(q, rstd2, mean2, w_out, b_out, n_res, x, skip, gemm)
    return x_out, skip_out, (saved1, is_result1, saved2, is_result2,
                             (mean1, rstd1, mean2, rstd2))


def _gln_tap_sums(grad_v, centred, taps, offsets, scale1, beta1):
    """Sums over time the depthwise convolution's backward needs (gLN blocks, torch ops):
    (sum_t dv (B, H), tap gradients (P, H), sum_g, sum_gc), where per tap `valid` is the sum of
    dv over the frames the tap reaches, dot_p = sum_t dv[t] centred[t + o] over them (centred =
    p - mean, the first norm's input centred by its mean), and
    sum_g = sum_k taps[k] valid_k, sum_gc = sum_k taps[k] dot_p_k (each (B, H))."""
    frames, hid = centred.shape[1], centred.shape[2]
    item_dv = grad_v.sum(1)                                         # (B, H)
    grad_taps, sum_g, sum_gc = [], 0, 0
    for k, offset in enumerate(offsets):
        sl = _tap_slices(offset, frames)
        if sl is None:
            grad_taps.append(taps.new_zeros(hid))
            continue
        if offset > 0:
            valid = item_dv - grad_v[:, frames - offset:].sum(1)
        elif offset < 0:
            valid = item_dv - grad_v[:, :-offset].sum(1)
        else:
            valid = item_dv
        dot_p = _sum_over_time_of_product(grad_v[:, sl[0]], centred[:, sl[1]])
        # normalised input = scale1 * (p - mean) + beta1
        grad_taps.append((scale1 * dot_p + beta1 * valid).sum(0))
        sum_g = sum_g + taps[k] * valid
        sum_gc = sum_gc + taps[k] * dot_p
    return item_dv, torch.stack(grad_taps), sum_g, sum_gc


class _GlobalNormBlockFunction(torch.autograd.Function):
    """`_BlockFunction` for gLN: same inputs and outputs, fewer passes and saved tensors
    (x, the first PReLU's output or input, the second PReLU's output or input)."""

    @staticmethod
    def forward(ctx, x, skip, w_in, b_in, slope1, gamma1, beta1, taps, b_dw, slope2, w_out,
                b_out, kind, offsets, n_res, gemm=None):
        x = x.contiguous()
        a1, a2 = float(slope1), float(slope2)
        had_skip = skip is not None
        x_out, skip_out, state = _gln_block_forward(x, skip, w_in, b_in, a1, gamma1, beta1,
                                                    taps, b_dw, a2, w_out, b_out, offsets, n_res,
                                                    gemm=gemm)
        if had_skip and skip_out is not None:
            ctx.mark_dirty(skip)
        saved1, is_result1, saved2, is_result2, stats = state
        ctx.save_for_backward(x, saved1, saved2, w_in, gamma1, beta1, taps, w_out, *stats)
        ctx.cfg = (offsets, a1, a2, is_result1, is_result2, n_res, had_skip, gemm)
        return x_out, skip_out

    @staticmethod
    def backward(ctx, grad_x_out, grad_skip_out):
        (x, saved1, saved2, w_in, gamma1, beta1, taps, w_out,
         mean1, rstd1, mean2, rstd2) = ctx.saved_tensors
        offsets, a1, a2, is_result1, is_result2, n_res, had_skip, gemm = ctx.cfg
        batch, frames, chans = x.shape
        hid = w_in.shape[0]
        out_chans = w_out.shape[0]
        parts = []                                   # (gradient, rows of w_out)
        if n_res:
            parts.append((grad_x_out if grad_x_out is not None
                          else x.new_zeros(batch, frames, n_res), slice(0, n_res)))
        if out_chans > n_res:
            parts.append((grad_skip_out if grad_skip_out is not None
                          else x.new_zeros(batch, frames, out_chans - n_res),
                          slice(n_res, out_chans)))
        # Output GEMMs and second norm.  With the output gradient scaled by each item's rstd,
        # dz' = rstd * [d res | d skip], grad_q = dz' @ W' is one GEMM over all items, and
        # so is each item's share of W''s gradient, M_b = dz'_b^T q_b.  The norm's backward
        # needs sum((q - mean) * grad_q) per item, which is <W', M_b>: no pass over grad_q.
        # M_b takes q centred (the uncentred sum less mean * sum(grad_q) would cancel when the
        # mean is large against the spread).
        q = saved2 if is_result2 else F.leaky_relu(saved2, a2)
        centred_q = torch.sub(q, mean2, out=_WORKSPACE.get("centred_q", q.shape, q))
        scaled = _WORKSPACE.get("grad_out_scaled", (batch, frames, out_chans), q)
        for g, rows in parts:
            torch.mul(g, rstd2, out=scaled[..., rows])
        low_scaled = _low(scaled, gemm)
        # oneDNN's products come in new tensors: no buffer for them.
        buffer = (_WORKSPACE.get("grad_hidden_a", q.shape, q).view(-1, hid)
                  if gemm is not None or _onednn_op() is None else None)
        grad_q = _mm(low_scaled.view(-1, out_chans), w_out, gemm, out=buffer).view(q.shape)
        item_shares = torch.bmm(low_scaled.transpose(1, 2),
                                _low(centred_q, gemm)).to(q.dtype)    # (B, O, H)
        item_sums = torch.cat([g.sum(1) for g, _ in parts], 1)          # (B, O)
        grad_w_out = item_shares.sum(0)
        grad_b_out = item_sums.sum(0)
        g_dot_s = (item_sums @ w_out.sum(1)).view(batch, 1, 1)
        p = saved1 if is_result1 else F.leaky_relu(saved1, a1)
        native = _native_kernels(x, a1, a2)
        wide = torch.float64 if q.dtype == torch.float32 else q.dtype
        rows = torch.mv(item_shares.view(batch, -1).to(wide), w_out.reshape(-1).to(wide))
        rows = rows.to(q.dtype).view(batch, 1, 1)
        n = frames * hid
        # With c = q - mean2: grad_q + slope * c + shift, shift = -mean(grad_q).
        slope = (-rstd2.pow(2) / n) * rows
        shift = (-rstd2 * g_dot_s) / n
        scale1 = (rstd1 * gamma1).view(batch, hid)
        r1 = rstd1.view(batch, 1)
        if native is not None:
            # The norm's and PReLU's backward and the depthwise sums in one pass.
            off = tcn_native.offsets_tensor(offsets)
            neg2, item_dv, tap_sum, tap_dot = native.norm_prelu_backward_taps_(
                grad_q, q, p, off, slope.view(-1).contiguous(), shift.view(-1).contiguous(),
                mean2.view(-1).contiguous(), mean1.view(-1).contiguous(), a2)
            grad_slope2 = grad_q.new_tensor([float(neg2.sum()) / a2])
            # tap_dot is centred: sum_t dv[t] (p[t + o] - mean1)
            item_dv, valid, dot_p = (t.to(q.dtype) for t in (item_dv, tap_sum, tap_dot))
            grad_taps = (scale1.unsqueeze(1) * dot_p + beta1 * valid).sum(0)
            sum_g = (taps * valid).sum(1)
            sum_gc = (taps * dot_p).sum(1)
        else:
            grad_q.addcmul_(centred_q, slope).add_(shift)
            grad_slope2 = _prelu_backward_(grad_q, saved2, a2, is_result2)
            centred_p = torch.sub(p, mean1, out=_WORKSPACE.get("centred_p", p.shape, p))
            item_dv, grad_taps, sum_g, sum_gc = _gln_tap_sums(grad_q, centred_p, taps, offsets,
                                                              scale1, beta1)
        del q, centred_q
        grad_v = grad_q
        grad_b_dw = item_dv.sum(0)
        # First norm (see the formulas of _BlockFunction).
        centred = sum_gc
        grad_beta1 = sum_g.sum(0)
        grad_gamma1 = (r1 * centred).sum(0)
        mean_gxhat = (sum_g * gamma1).sum(1, keepdim=True) / n
        mean_gxhat_xhat = r1 * (centred * gamma1).sum(1, keepdim=True) / n
        # grad_p = coef_p * (p - mean1) + coef_c + depthwise backward (centred)
        coef_p = (-(r1 * r1) * mean_gxhat_xhat).view(batch, 1, 1)
        coef_c = (-r1 * mean_gxhat).view(batch, 1, 1)
        grad_p = _WORKSPACE.get("grad_hidden_b", p.shape, p)
        item_taps = taps * scale1.unsqueeze(1)                          # (B, P, H)
        if native is not None:
            neg1, grad_b_in = native.norm_depthwise_prelu_backward(
                p, grad_v, item_taps.contiguous(), off, coef_p.view(-1).contiguous(),
                coef_c.view(-1).contiguous(), mean1.view(-1).contiguous(), a1, grad_p)
            grad_slope1 = grad_p.new_tensor([float(neg1.sum()) / a1])
            grad_b_in = grad_b_in.to(p.dtype)
            del p, grad_v, grad_q
            grad_x, grad_w_in = _first_conv_gemms(grad_p, x, w_in, grad_x_out, n_res, gemm)
        else:
            torch.addcmul(coef_c, centred_p, coef_p, out=grad_p)
            del p, centred_p
            _depthwise(grad_v, item_taps.transpose(0, 1).unsqueeze(2), None,
                       [-o for o in offsets], out=grad_p, accumulate=True)
            del grad_v, grad_q
            grad_x, grad_w_in, grad_b_in, grad_slope1 = _first_conv_backward(
                grad_p, saved1, a1, is_result1, x, w_in, grad_x_out, n_res, gemm)
        grad_skip = grad_skip_out if had_skip else None
        return (grad_x.view(batch, frames, chans), grad_skip, grad_w_in, grad_b_in, grad_slope1,
                grad_gamma1, grad_beta1, grad_taps, grad_b_dw, grad_slope2, grad_w_out,
                grad_b_out, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Mask head: masks = act(score) over sources, masked = masks * tf_rep, decoder frames.
# ----------------------------------------------------------------------------------------------
_MASK_ACTIVATIONS = {nn.Identity: "linear", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}


def _mask_activation_forward(score: torch.Tensor, name: str) -> torch.Tensor:
    """score (B, T, n_src, N) -> masks; softmax over the sources."""
    if name == "softmax":
        return torch.softmax(score, dim=2)
    if name == "sigmoid":
        return torch.sigmoid(score)
    if name == "relu":
        return torch.relu(score)
    return score


def _mask_activation_backward_(grad: torch.Tensor, mask: torch.Tensor, name: str):
    """Gradient of the score from that of the masks (in place on grad), in terms of the masks."""
    if name == "softmax":
        return grad.sub_((grad * mask).sum(2, keepdim=True)).mul_(mask)
    if name == "sigmoid":
        return grad.mul_(mask).mul_(1 - mask)
    if name == "relu":
        return grad.mul_(mask > 0)
    return grad


class _MaskDecodeFunction(torch.autograd.Function):
    """frames = (act(score) * tf_rep) @ filters: the masks, the masking and the decoder's
    matrix product (before its overlap-add).  score (B, T, S, N), tf_rep (B, T, N), filters
    (N, L) -> frames (B, T, S, L).  Keeps the masks only; the backward is one pass of a C
    kernel (the torch fallback: a matrix product and a few elementwise passes)."""

    @staticmethod
    def forward(ctx, score, tf_rep, filters, activation):
        batch, frames, n_src, n_filters = score.shape
        mask = _mask_activation_forward(score, activation)
        masked = torch.mul(mask, tf_rep.unsqueeze(2))
        out = torch.mm(masked.view(-1, n_filters), filters)
        ctx.save_for_backward(mask, tf_rep, filters)
        ctx.activation = activation
        return out.view(batch, frames, n_src, -1)

    @staticmethod
    def backward(ctx, grad_frames):
        mask, tf_rep, filters = ctx.saved_tensors
        batch, frames, n_src, n_filters = mask.shape
        taps = filters.shape[1]
        native = None
        if mask.device.type == "cpu" and mask.dtype == torch.float32:
            native = tcn_native.kernels()
        if native is not None:
            rows = batch * frames
            grad_score, grad_tf, grad_w = native.mask_decode_backward(
                grad_frames.contiguous().view(rows, n_src, taps), filters.t().contiguous(),
                mask.contiguous().view(rows, n_src, n_filters),
                tf_rep.contiguous().view(rows, n_filters), ctx.activation)
            return (grad_score.view(mask.shape), grad_tf.view(tf_rep.shape),
                    grad_w.t().to(filters.dtype), None)
        grad_2d = grad_frames.reshape(-1, taps)
        grad_masked = torch.mm(grad_2d, filters.t()).view(mask.shape)
        masked = mask * tf_rep.unsqueeze(2)
        grad_w = torch.mm(masked.view(-1, n_filters).t(), grad_2d)
        grad_tf = (grad_masked * mask).sum(2)
        grad_score = _mask_activation_backward_(grad_masked.mul_(tf_rep.unsqueeze(2)), mask,
                                                ctx.activation)
        return grad_score, grad_tf, grad_w, None


# ----------------------------------------------------------------------------------------------
# Parameters of asteroid's modules, read in the channels-last layout.
# ----------------------------------------------------------------------------------------------
_NORM_KINDS = {norms.GlobLN: "gLN", norms.ChanLN: "cLN"}


def _norm_kind(module: nn.Module) -> Optional[str]:
    return _NORM_KINDS.get(type(module))


def _block_geometry(block: nn.Module):
    """(depthwise conv, tap offsets) of a Conv1DBlock, or None if it is not the standard one."""
    layers = list(block.shared_block)
    if len(layers) != 6:
        return None
    depth = layers[3]
    chop = 0
    if isinstance(depth, nn.Sequential):
        if len(depth) != 2 or not isinstance(depth[1], _Chop1d):
            return None
        depth, chop = depth[0], depth[1].chop_size
    if not isinstance(depth, nn.Conv1d) or depth.groups != depth.in_channels:
        return None
    kernel, dilation = depth.kernel_size[0], depth.dilation[0]
    padding = depth.padding[0]
    if depth.stride[0] != 1 or not isinstance(padding, int):
        return None
    # Output length of asteroid's block must equal its input length for the residual sum.
    if 2 * padding - dilation * (kernel - 1) - chop != 0:
        return None
    offsets = [k * dilation - padding for k in range(kernel)]
    return depth, offsets


def masker_supported(masker: nn.Module) -> bool:
    """True when `masker` is a TDConvNet the channels-last implementation reproduces exactly."""
    if type(masker) is not TDConvNet:
        return False
    if _norm_kind(masker.bottleneck[0]) is None:
        return False
    for block in masker.TCN:
        layers = list(block.shared_block)
        if _block_geometry(block) is None:
            return False
        if not isinstance(layers[0], nn.Conv1d) or layers[0].kernel_size[0] != 1:
            return False
        for idx in (1, 4):
            if not isinstance(layers[idx], nn.PReLU) or layers[idx].weight.numel() != 1:
                return False
        if _norm_kind(layers[2]) is None or _norm_kind(layers[5]) != _norm_kind(layers[2]):
            return False
    prelu = masker.mask_net[0]
    return isinstance(prelu, nn.PReLU) and prelu.weight.numel() == 1


def _block_tensors(block: nn.Module, keep_residual: bool):
    """Parameters of one block, 1x1 convs as matrices, the second norm folded into res|skip."""
    in_conv, prelu1, norm1, _, prelu2, norm2 = list(block.shared_block)
    depth, offsets = _block_geometry(block)
    weights, biases = [], []
    if keep_residual:
        weights.append(block.res_conv.weight.squeeze(-1))
        biases.append(block.res_conv.bias)
    if block.skip_out_chan:
        weights.append(block.skip_conv.weight.squeeze(-1))
        biases.append(block.skip_conv.bias)
    w_out = weights[0] if len(weights) == 1 else torch.cat(weights, 0)
    b_out = biases[0] if len(biases) == 1 else torch.cat(biases, 0)
    return dict(
        w_in=in_conv.weight.squeeze(-1), b_in=in_conv.bias, slope1=prelu1.weight,
        gamma1=norm1.gamma, beta1=norm1.beta, w_dw=depth.weight.squeeze(1), b_dw=depth.bias,
        slope2=prelu2.weight, gamma2=norm2.gamma, beta2=norm2.beta, w_out=w_out, b_out=b_out,
        offsets=offsets, kind=_norm_kind(norm1),
        n_res=block.res_conv.out_channels if keep_residual else 0,
    )


def _norm_reference(x: torch.Tensor, kind: str, gamma: torch.Tensor, beta: torch.Tensor):
    """gLN / cLN on channels-last tensors with plain autograd ops (statistics in float32)."""
    if kind == "cLN":
        return F.layer_norm(x, (x.shape[-1],), gamma, beta, NORM_EPS)
    x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    var, mean = torch.var_mean(x32, dim=(1, 2), keepdim=True, correction=0)
    normed = (x32 - mean) * torch.rsqrt(var + NORM_EPS)
    return (normed * gamma.to(x32.dtype) + beta.to(x32.dtype)).to(x.dtype)


def _depthwise_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, offsets):
    """Depthwise conv of a channels-last tensor via F.conv1d (any device, autocast-friendly)."""
    kernel = len(offsets)
    dilation = offsets[1] - offsets[0] if kernel > 1 else 1
    left = -offsets[0]
    right = offsets[-1]
    xt = F.pad(x.transpose(1, 2), (max(left, 0), max(right, 0)))
    if left < 0:
        xt = xt[..., -left:]
    y = F.conv1d(xt, weight.unsqueeze(1), bias, dilation=dilation, groups=x.shape[-1])
    return y[..., : x.shape[1]].transpose(1, 2)


def _depthwise_shifted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, offsets):
    """The same convolution as `_depthwise_reference`, as a sum of shifted, scaled copies of x:
    elementwise operators only, which torch.compile can fuse with the PReLU and norm around
    them (F.conv1d stays a separate cuDNN call forward and backward)."""
    frames = x.shape[1]
    total = bias.to(x.dtype)
    for k, offset in enumerate(offsets):
        sl = _tap_slices(offset, frames)
        if sl is None:
            continue
        shifted = F.pad(x[:, sl[1]], (0, 0, sl[0].start, frames - sl[0].stop))
        total = total + shifted * weight[:, k].to(x.dtype)
    return total


DEPTHWISE_FORMS = {"conv": _depthwise_reference, "shifted": _depthwise_shifted}


def _load_serialised(path) -> dict:
    """A serialised model file (asteroid's format), loaded with torch's safe `weights_only`
    unpickler. asteroid's own `serialize()` stores torch.__version__ as a TorchVersion (a str
    subclass), which that unpickler refuses by default: it is allowed here, so files written
    by asteroid itself load too."""
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------
class FastConvTasNet(ConvTasNet):
    """asteroid's ConvTasNet with a fast forward/backward; same arguments and state dict.

    `impl` (attribute, not saved): "auto" (default: autograd functions on CPU float32, plain
    channels-last autograd elsewhere), "function", "autograd", or "stock" (asteroid's forward).
    `depthwise` (attribute, not saved): how the "autograd" path runs the depthwise convolution,
    one of DEPTHWISE_FORMS: "conv" (default, F.conv1d) or "shifted" (sums of shifted copies).
    Extra keyword `who_is_pinv` ("dec"/"enc") is passed to asteroid's `make_enc_dec` and, unlike
    asteroid, kept in `get_model_args()` so a pseudo-inverse decoder survives serialisation.
    """

    def __init__(self, n_src, *args, **kwargs):
        super().__init__(n_src, *args, **kwargs)
        self.who_is_pinv = kwargs.get("who_is_pinv")
        self.impl = "auto"
        self.depthwise = "conv"

    # --- serialisation -----------------------------------------------------------------------
    def get_model_args(self):
        args = super().get_model_args()
        if self.decoder.is_pinv:
            args["who_is_pinv"] = "dec"
        elif self.encoder.is_pinv:
            args["who_is_pinv"] = "enc"
        return args

    def serialize(self):
        conf = super().serialize()
        # Same weights and arguments as asteroid's model: let every asteroid tool load it.
        conf["model_name"] = "ConvTasNet"
        # asteroid stores torch.__version__ as a TorchVersion, which torch.load's default
        # weights_only=True refuses to unpickle.
        versions = conf["infos"]["software_versions"]
        conf["infos"]["software_versions"] = {k: str(v) for k, v in versions.items()}
        return conf

    @classmethod
    def from_pretrained(cls, pretrained_model_conf_or_path, *args, **kwargs):
        """Load a serialised ConvTasNet (ours or asteroid's) as a FastConvTasNet."""
        conf = pretrained_model_conf_or_path
        if isinstance(conf, (str, os.PathLike)):
            conf = _load_serialised(cached_download(str(conf)))
        missing = [k for k in ("model_name", "model_args", "state_dict") if k not in conf]
        if missing:
            raise ValueError(f"Not a serialised asteroid model: missing {missing}")
        if conf["model_name"] not in ("ConvTasNet", cls.__name__):
            raise ValueError(f"Expected a ConvTasNet, got model_name={conf['model_name']!r}")
        model = cls(*args, **{**conf["model_args"], **kwargs})
        model.load_state_dict(conf["state_dict"])
        return model

    # --- which parts run fast ----------------------------------------------------------------
    def _fast_encoder(self) -> bool:
        enc = self.encoder
        return type(enc.filterbank) is FreeFB and enc.padding == 0 and enc.as_conv1d

    def _fast_decoder(self) -> bool:
        dec = self.decoder
        return type(dec.filterbank) is FreeFB and dec.padding == 0 and dec.output_padding == 0

    def _mode(self, x: torch.Tensor) -> str:
        if torch.jit.is_tracing():
            # torch.jit.trace records asteroid's forward (same parameters, same outputs): the
            # fast path's autograd functions update tensors in place, which a trace cannot
            # replay.
            return "stock"
        if self.impl != "auto":
            return self.impl
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
        if cpu_fp32 and (not torch.is_autocast_enabled("cpu") or _cpu_bf16_autocast()):
            return "function"
        return "autograd"

    @staticmethod
    def _function_precision(mode: str):
        """(dtype of the gLN blocks' matrix products, context to run the fast path in).
        Under CPU bf16 autocast the function path takes bf16 products and runs with autocast
        off (its functions choose the precision of each operation themselves)."""
        if mode == "function" and _cpu_bf16_autocast():
            return torch.bfloat16, torch.autocast("cpu", enabled=False)
        return None, contextlib.nullcontext()

    # --- forward -----------------------------------------------------------------------------
    def forward(self, wav):
        mode = self._mode(wav)
        if mode == "stock" or (wav.ndim == 3 and wav.shape[1] != 1):
            return super().forward(wav)
        if mode not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {mode!r}")
        gemm, scope = self._function_precision(mode)
        with scope:
            return self._forward_channels_last(wav, mode, gemm)

    def _forward_channels_last(self, wav, mode: str, gemm: Optional[torch.dtype]):
        ndim = wav.ndim
        wav3 = wav.reshape(1, 1, -1) if ndim == 1 else (wav.unsqueeze(1) if ndim == 2 else wav)
        tf_rep = self._encode(wav3)                                  # (B, T, N)
        activation = self._mask_activation()
        if (mode == "function" and torch.is_grad_enabled() and activation is not None
                and self._fast_decoder() and masker_supported(self.masker)):
            # Masks, masking and the decoder's matrix product in one function (its backward
            # is one pass; autograd's is six over (B, T, n_src, N) tensors).
            score = self._mask_scores(tf_rep, mode, gemm)            # (B, T, n_src, N)
            filters = self.decoder.get_filters().squeeze(1)          # (N, L)
            frames = _MaskDecodeFunction.apply(score, tf_rep, filters, activation)
            decoded = self._overlap_add(frames)                      # (B, n_src, time)
        else:
            masks = self._masks(tf_rep, mode, gemm)                  # (B, T, n_src, N)
            if torch.is_grad_enabled():
                masked = masks * tf_rep.unsqueeze(2)
            else:
                masked = masks.mul_(tf_rep.unsqueeze(2))
            decoded = self._decode(masked)                           # (B, n_src, time)
        reconstructed = pad_x_to_y(decoded, wav3)
        return reconstructed.squeeze(0) if ndim == 1 else reconstructed

    def forward_masker(self, tf_rep: torch.Tensor) -> torch.Tensor:
        """asteroid's interface: (batch, feats, frames) -> (batch, n_src, feats, frames)."""
        mode = self._mode(tf_rep)
        if mode == "stock":
            return self.masker(tf_rep)
        gemm, scope = self._function_precision(mode)
        with scope:
            masks = self._masks(tf_rep.transpose(1, 2).contiguous(), mode, gemm)
        return masks.permute(0, 2, 3, 1)

    def _encode(self, wav3: torch.Tensor) -> torch.Tensor:
        if not self._fast_encoder():
            return self.forward_encoder(wav3).transpose(1, 2).contiguous()
        filters = self.encoder.get_filters()                        # (N, 1, L)
        frames = wav3[:, 0].unfold(-1, filters.shape[-1], self.encoder.stride)
        tf_rep = torch.matmul(frames, filters.squeeze(1).t())
        return self.enc_activation(tf_rep)

    def _decode(self, masked: torch.Tensor) -> torch.Tensor:
        if not self._fast_decoder():
            return self.forward_decoder(masked.permute(0, 2, 3, 1))
        filters = self.decoder.get_filters()                        # (N, 1, L)
        return self._overlap_add(torch.matmul(masked, filters.squeeze(1)))

    def _overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        """Decoder frames (B, T, n_src, L) -> waveforms (B, n_src, time)."""
        batch, n_frames, n_src, kernel = frames.shape
        stride = self.decoder.stride
        frames = frames.permute(0, 2, 1, 3)                         # (B, S, T, L)
        if kernel % stride == 0:
            hops = kernel // stride
            parts = [F.pad(frames[..., j * stride:(j + 1) * stride], (0, 0, j, hops - 1 - j))
                     for j in range(hops)]
            wav = parts[0]
            for part in parts[1:]:
                wav = wav + part
            return wav.reshape(batch, n_src, -1)
        length = (n_frames - 1) * stride + kernel
        cols = frames.reshape(batch * n_src, n_frames, kernel).transpose(1, 2)
        wav = F.fold(cols, (1, length), (1, kernel), stride=(1, stride))
        return wav.view(batch, n_src, length)

    def _masks(self, tf_rep: torch.Tensor, mode: str, gemm: Optional[torch.dtype] = None
               ) -> torch.Tensor:
        """Masks (B, T, n_src, out_chan) from a channels-last representation (B, T, N)."""
        masker = self.masker
        if mode == "stock" or not masker_supported(masker):
            return masker(tf_rep.transpose(1, 2)).permute(0, 3, 1, 2)
        activation = self._mask_activation()
        if mode == "function" and not torch.is_grad_enabled() and activation in _FUSED_ACTS:
            # Separating: the activation runs inside the product (its last pass over the scores).
            return self._mask_scores(tf_rep, mode, gemm, activation)
        score = self._mask_scores(tf_rep, mode, gemm)
        # asteroid applies output_act to (B, n_src, out_chan, T): give it that view.
        return masker.output_act(score.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _mask_activation(self) -> Optional[str]:
        """Name of the masker's output activation when _MaskDecodeFunction implements it."""
        act = self.masker.output_act
        if type(act) is nn.Softmax:
            # asteroid's softmax runs over dim 1 of (B, n_src, N, T): the sources.
            return "softmax" if act.dim == 1 else None
        return _MASK_ACTIVATIONS.get(type(act))

    def _mask_scores(self, tf_rep: torch.Tensor, mode: str,
                     gemm: Optional[torch.dtype] = None, activation: Optional[str] = None
                     ) -> torch.Tensor:
        """Mask scores before the output activation (or after `activation`, one of
        _FUSED_ACTS), (B, T, n_src, out_chan), contiguous."""
        masker = self.masker
        if mode == "function" and not torch.is_grad_enabled():
            mask_in = self._mask_input_inference(tf_rep, gemm)
        elif mode == "function":
            mask_in = self._mask_input_function(tf_rep, gemm)
        else:
            mask_in = self._mask_input_autograd(tf_rep)
        prelu, conv = masker.mask_net
        batch, n_frames, _ = mask_in.shape
        hidden = F.prelu(mask_in, prelu.weight)
        if torch.is_grad_enabled():
            score = F.linear(hidden, conv.weight.squeeze(-1), conv.bias)
        else:
            score = _linear(hidden.reshape(batch * n_frames, -1), conv.weight.squeeze(-1),
                            conv.bias, activation=activation)
        return score.view(batch, n_frames, masker.n_src, masker.out_chan)

    def _bottleneck_weights(self):
        norm, conv = self.masker.bottleneck
        w, b = fold_norm_into_linear(conv.weight.squeeze(-1), conv.bias, norm.gamma, norm.beta)
        return w, b, _norm_kind(norm)

    def _block_list(self):
        masker = self.masker
        last = len(masker.TCN) - 1
        # The last block's residual output is never used when skip connections exist.
        return [_block_tensors(blk, keep_residual=not (masker.skip_chan and i == last))
                for i, blk in enumerate(masker.TCN)]

    @staticmethod
    def _accumulate(out, skip, z, n_res: int, inplace: bool = False):
        """TCN sums: out += residual rows of z, skip += skip rows of z."""
        if n_res:
            out = out.add_(z[..., :n_res]) if inplace else out + z[..., :n_res]
        if z.shape[-1] > n_res:
            sk = z[..., n_res:]
            if skip is None:
                skip = sk.contiguous() if inplace else sk
            else:
                skip = skip.add_(sk) if inplace else skip + sk
        return out, skip

    def _mask_input_function(self, tf_rep: torch.Tensor, gemm: Optional[torch.dtype] = None
                             ) -> torch.Tensor:
        w_b, b_b, kind = self._bottleneck_weights()
        out = _NormLinearFunction.apply(tf_rep, w_b, b_b, kind)
        skip = None
        for p in self._block_list():
            w_out, b_out = fold_norm_into_linear(p["w_out"], p["b_out"], p["gamma2"], p["beta2"])
            taps = p["w_dw"].t().contiguous()
            block_fn = _GlobalNormBlockFunction if p["kind"] == "gLN" else _BlockFunction
            x_out, skip = block_fn.apply(
                out, skip, p["w_in"], p["b_in"], p["slope1"], p["gamma1"], p["beta1"], taps,
                p["b_dw"], p["slope2"], w_out, b_out, p["kind"], p["offsets"], p["n_res"], gemm)
            if x_out is not None:
                out = x_out
        return skip if self.masker.skip_chan else out

    @torch.no_grad()
    def _mask_input_inference(self, tf_rep: torch.Tensor, gemm: Optional[torch.dtype] = None
                              ) -> torch.Tensor:
        """Same computation as the autograd function, in place, two reused buffers."""
        w_b, b_b, kind = self._bottleneck_weights()
        out, _, _ = _norm_linear_forward(tf_rep.contiguous(), w_b, b_b, kind)
        skip = None
        blocks = self._block_list()
        batch, n_frames, chans = out.shape
        hid = blocks[0]["w_in"].shape[0] if blocks else 0
        # oneDNN's first products come in new tensors: no buffer for them.
        keep_u = _onednn_op() is None
        u = out.new_empty(batch * n_frames, hid) if keep_u else None
        v = out.new_empty(batch, n_frames, hid)
        for p in blocks:
            if p["w_in"].shape[0] != hid:
                hid = p["w_in"].shape[0]
                u = out.new_empty(batch * n_frames, hid) if keep_u else None
                v = out.new_empty(batch, n_frames, hid)
            if p["kind"] == "gLN":
                w_out, b_out = fold_norm_into_linear(p["w_out"], p["b_out"], p["gamma2"],
                                                     p["beta2"])
                x_out, skip, _ = _gln_block_forward(
                    out, skip, p["w_in"], p["b_in"], float(p["slope1"]), p["gamma1"],
                    p["beta1"], p["w_dw"].t().contiguous(), p["b_dw"], float(p["slope2"]),
                    w_out, b_out, p["offsets"], p["n_res"], buffers=(u, v), gemm=gemm)
                if x_out is not None:
                    out = x_out
                continue
            u3 = _linear(out.view(-1, chans), p["w_in"], bias=p["b_in"], out=u).view(
                batch, n_frames, hid)
            F.leaky_relu_(u3, float(p["slope1"]))
            mean1, rstd1 = _norm_stats(u3, p["kind"])
            u3.sub_(mean1).mul_(rstd1 * p["gamma1"]).add_(p["beta1"])   # centred first
            _depthwise(u3, p["w_dw"].t().contiguous(), p["b_dw"], p["offsets"], out=v)
            F.leaky_relu_(v, float(p["slope2"]))
            w_out, b_out = fold_norm_into_linear(p["w_out"], p["b_out"], p["gamma2"], p["beta2"])
            z, _, _ = _norm_linear_forward(v, w_out, b_out, p["kind"])
            out, skip = self._accumulate(out, skip, z, p["n_res"], inplace=True)
        return skip if self.masker.skip_chan else out

    def _mask_input_autograd(self, tf_rep: torch.Tensor) -> torch.Tensor:
        """Device-generic channels-last path on plain autograd ops (CUDA, autocast)."""
        norm, conv = self.masker.bottleneck
        kind = _norm_kind(norm)
        if self.depthwise not in DEPTHWISE_FORMS:
            raise ValueError(f"depthwise must be one of {tuple(DEPTHWISE_FORMS)}, "
                             f"got {self.depthwise!r}")
        depthwise = DEPTHWISE_FORMS[self.depthwise]
        out = F.linear(_norm_reference(tf_rep, kind, norm.gamma, norm.beta),
                       conv.weight.squeeze(-1), conv.bias)
        skip = None
        for p in self._block_list():
            h = F.prelu(F.linear(out, p["w_in"], p["b_in"]), p["slope1"])
            h = _norm_reference(h, kind, p["gamma1"], p["beta1"])
            h = F.prelu(depthwise(h, p["w_dw"], p["b_dw"], p["offsets"]), p["slope2"])
            h = _norm_reference(h, kind, p["gamma2"], p["beta2"])
            z = F.linear(h, p["w_out"], p["b_out"])
            out, skip = self._accumulate(out, skip, z, p["n_res"])
        return skip if self.masker.skip_chan else out
