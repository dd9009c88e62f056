"""The fused C kernels (fast_tasnet/tcn_native.py, fast_tasnet/csrc/tcn_kernels.c): built here,
the same results as fast_tasnet/tasnet.py's torch implementation and asteroid, reproducible
across thread counts, and a clear fallback when they cannot be built."""
from __future__ import annotations

import shutil

import pytest
import torch
from asteroid.models import ConvTasNet

from conftest import TINY_MODEL
from fast_tasnet import FastConvTasNet, tcn_native
from fast_tasnet.tasnet import _MaskDecodeFunction
from model import model_kwargs
from utils.config import read_conf

NATIVE_MODEL = dict(TINY_MODEL, n_filters=24, bn_chan=12, hid_chan=20, skip_chan=10, n_blocks=5)
SAMPLES = 400


@pytest.fixture
def kwargs(repo_root):
    conf = read_conf(repo_root / "conf.yml")
    conf["model"].update(NATIVE_MODEL)
    return model_kwargs(conf)


@pytest.fixture
def fresh_native_state(monkeypatch, tmp_path):
    """An empty build cache and no loaded library, restored afterwards."""
    monkeypatch.setenv("BIRDSEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tcn_native, "_state", {})
    return tmp_path / "cache"


def pair(kwargs, seed=0):
    """Stock and ours with the same perturbed weights; PReLU slopes stay positive, the case the
    native kernels take."""
    torch.manual_seed(seed)
    stock = ConvTasNet(**kwargs)
    with torch.no_grad():
        for name, param in stock.named_parameters():
            param.add_(0.1 * torch.randn_like(param))
            if param.numel() == 1:          # PReLU slopes
                param.abs_()
    ours = FastConvTasNet(**kwargs)
    ours.load_state_dict(stock.state_dict(), strict=True)
    return stock, ours


def forward_backward(model, mixture, weights):
    model.zero_grad()
    out = model(mixture)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def max_relative(grads, reference):
    return max(float((grads[n] - reference[n]).norm() / reference[n].norm().clamp_min(1e-30))
               for n in reference)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_kernels_build_with_the_system_compiler(fresh_native_state):
    assert tcn_native.kernels() is not None, tcn_native.unavailable_reason()
    assert list(fresh_native_state.glob("tcn_kernels-*.so"))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_native_and_torch_paths_agree_with_asteroid(kwargs, monkeypatch):
    stock, ours = pair(kwargs)
    mixture, weights = torch.randn(3, SAMPLES), torch.randn(3, 2, SAMPLES)
    out_stock, grads_stock = forward_backward(stock, mixture, weights)
    assert tcn_native.kernels() is not None
    out_native, grads_native = forward_backward(ours, mixture, weights)
    monkeypatch.setenv(tcn_native.ENV_SWITCH, "0")
    assert tcn_native.kernels() is None
    out_torch, grads_torch = forward_backward(ours, mixture, weights)
    for out in (out_native, out_torch):
        assert (out - out_stock).abs().max() <= 1e-5 * out_stock.abs().max()
    assert max_relative(grads_native, grads_stock) < 1e-3
    assert max_relative(grads_native, grads_torch) < 1e-3
    monkeypatch.delenv(tcn_native.ENV_SWITCH)
    with torch.inference_mode():
        assert (ours(mixture) - out_stock).abs().max() <= 1e-5 * out_stock.abs().max()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_kernel_sums_do_not_depend_on_the_thread_count():
    native = tcn_native.kernels()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, 40, generator=gen)
    q, p = torch.randn(3, 1000, 40, generator=gen), torch.randn(3, 1000, 40, generator=gen)
    offsets = tcn_native.offsets_tensor([-4, 0, 4])
    coefs = tuple(torch.randn(3, generator=gen) for _ in range(4))   # coef_q, coef_c, means
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = x.clone()
            sums = native.bias_prelu_stats_(y, torch.randn(40, generator=gen.manual_seed(1)), 0.2)
            g = x.clone()
            taps = native.norm_prelu_backward_taps_(g, q, p, offsets, *coefs, 0.3)
            results.append((y, sums, g, *taps))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def mask_decode_gradients(score, tf_rep, filters, activation):
    """Gradients of a weighted sum of _MaskDecodeFunction's frames (score, tf_rep, filters)."""
    leaves = [t.detach().clone().requires_grad_() for t in (score, tf_rep, filters)]
    frames = _MaskDecodeFunction.apply(*leaves, activation)
    weights = torch.linspace(-1, 1, frames.numel(), dtype=frames.dtype).view(frames.shape)
    (frames * weights).sum().backward()
    return frames.detach(), [t.grad for t in leaves]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "relu", "linear"])
def test_mask_decode_kernel_matches_float64_autograd(activation, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    score = torch.randn(2, 150, 3, 24, generator=gen)    # 300 rows: three row chunks
    tf_rep = torch.randn(2, 150, 24, generator=gen).relu()
    filters = torch.randn(24, 8, generator=gen)
    # float64 runs the torch fallback of the function's backward; check it against autograd.
    wide = [t.double() for t in (score, tf_rep, filters)]
    leaves = [t.clone().requires_grad_() for t in wide]
    act = {"sigmoid": torch.sigmoid, "relu": torch.relu, "linear": lambda x: x,
           "softmax": lambda x: torch.softmax(x, dim=2)}[activation]
    frames = torch.matmul(act(leaves[0]) * leaves[1].unsqueeze(2), leaves[2])
    weights = torch.linspace(-1, 1, frames.numel(), dtype=frames.dtype).view(frames.shape)
    (frames * weights).sum().backward()
    expected = [t.grad for t in leaves]
    out64, grads64 = mask_decode_gradients(*wide, activation)
    assert torch.allclose(out64, frames.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads64, expected):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # float32: the C kernel, then the torch fallback; both near float64 (softmax cancels digits:
    # about 3e-5 here).
    results = []
    for native in ("1", "0"):
        monkeypatch.setenv(tcn_native.ENV_SWITCH, native)
        results.append(mask_decode_gradients(score, tf_rep, filters, activation)[1])
    for grads in results:
        for got, want in zip(grads, expected):
            assert (got.double() - want).norm() <= 1e-4 * want.norm()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_mask_decode_kernel_does_not_depend_on_the_thread_count():
    native = tcn_native.kernels()
    gen = torch.Generator().manual_seed(4)
    grad_frames, w_dec = torch.randn(700, 2, 8, generator=gen), torch.randn(8, 32, generator=gen)
    mask, tf_rep = torch.rand(700, 2, 32, generator=gen), torch.randn(700, 32, generator=gen)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(native.mask_decode_backward(grad_frames, w_dec, mask, tf_rep,
                                                       "sigmoid"))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_kernels_take_items_without_frames():
    native = tcn_native.kernels()
    x = torch.empty(2, 0, 8)
    sums = native.bias_prelu_stats_(x, torch.zeros(8), 0.25)
    assert torch.equal(sums, torch.zeros(2, 2, dtype=torch.float64))


def test_a_failed_build_says_why(fresh_native_state):
    with pytest.raises(RuntimeError, match="no C compiler 'no-such-cc'"):
        tcn_native.build(compiler="no-such-cc")
    with pytest.raises(RuntimeError, match="false failed"):
        tcn_native.build(compiler="false")
    assert not list(fresh_native_state.glob("*.part"))   # nothing half-written left behind


def test_without_a_compiler_the_model_uses_torch(kwargs, fresh_native_state, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-cc")
    stock, ours = pair(kwargs)
    mixture = torch.randn(2, SAMPLES)
    with torch.no_grad():
        expected = stock(mixture)
        assert (ours(mixture) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert tcn_native.kernels() is None
    assert "no C compiler" in tcn_native.unavailable_reason()
    assert "native TCN kernels unavailable" in caplog.text
