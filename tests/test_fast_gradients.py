"""Float32 gradients of the fast model against exact (float64) ones: as accurate as asteroid's
own float32 model, over many inputs, batch sizes, norms, kernel sizes and lengths.

Each implementation's float32 gradient is compared with asteroid's float64 gradient, tensor by
tensor, and the fast model's error is bounded by a multiple of asteroid float32's own error
(plus a small floor): a fixed bound cannot hold, since float32's error depends on the input.

The PReLU slopes are 1 here, so the exact gradient is a smooth function of the input. With
other slopes, a PReLU input within rounding of zero changes side between float32 and float64,
and the exact gradient itself jumps there (a 1e-6 relative change of such an input moves some
slopes' float64 gradients by their own size): such inputs measure the kink, not an
implementation. Negative and mixed slopes are covered by test_fast_tasnet.py's parity tests.
"""
from __future__ import annotations

import pytest
import torch
from asteroid.models import ConvTasNet

from fast_tasnet import FastConvTasNet

NET = dict(n_src=2, n_filters=24, kernel_size=16, stride=8, bn_chan=12, hid_chan=20,
           skip_chan=10, n_blocks=5, n_repeats=2, mask_act="sigmoid", fb_name="free",
           sample_rate=8000)
# The fast model's error may be this many times asteroid float32's, per tensor, plus FLOOR
# (relative): the centred statistics keep it there; the uncentred ones (E[x^2] - mean^2)
# exceeded it by far once the hidden activations carry an offset.
FACTOR, FLOOR = 50.0, 1e-4
INPUTS = 8

CASES = {
    # name: (norm, P, causal, offset added to every block's first 1x1 conv bias, batch, samples)
    "gLN-P3": ("gLN", 3, False, 0.0, 1, 2000),
    "gLN-P5-batch2": ("gLN", 5, False, 0.0, 2, 1000),
    "cLN-P3": ("cLN", 3, False, 0.0, 1, 2000),
    "causal-cLN": ("cLN", 3, True, 0.0, 1, 2000),
    "gLN-batch3-short": ("gLN", 3, False, 0.0, 3, 200),
    # Hidden activations of mean 300 against a spread of a few units: E[x^2] - mean^2
    # cancels there.
    "gLN-P3-offset": ("gLN", 3, False, 300.0, 1, 2000),
    "gLN-P5-offset-batch2": ("gLN", 5, False, 300.0, 2, 1000),
    "cLN-P3-offset-batch2": ("cLN", 3, False, 300.0, 2, 1000),
    "causal-cLN-offset": ("cLN", 3, True, 300.0, 1, 2000),
}


def smooth_models(norm: str, kernel: int, causal: bool, offset: float, seed: int = 0):
    """asteroid float32 and float64 models and the fast float32 one, same weights: moved off
    their initialisation, every PReLU slope 1, first 1x1 conv biases shifted by `offset`."""
    kwargs = dict(NET, norm_type=norm, conv_kernel_size=kernel, causal=causal)
    torch.manual_seed(seed)
    stock = ConvTasNet(**kwargs)
    with torch.no_grad():
        for param in stock.parameters():
            param.add_(0.3 * torch.randn_like(param))
        for module in stock.modules():
            if isinstance(module, torch.nn.PReLU):
                module.weight.fill_(1.0)
        for block in stock.masker.TCN:
            block.shared_block[0].bias.add_(offset)
    fast = FastConvTasNet(**kwargs)
    fast.load_state_dict(stock.state_dict(), strict=True)
    exact = ConvTasNet(**kwargs)
    exact.load_state_dict(stock.state_dict(), strict=True)
    return stock, fast, exact.double()


def gradients(model, mixture, weights) -> dict[str, torch.Tensor]:
    model.zero_grad()
    (model(mixture) * weights).sum().backward()
    return {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}


def relative_errors(grads, exact) -> dict[str, float]:
    assert grads.keys() == exact.keys()
    return {k: float((grads[k] - exact[k]).norm() / exact[k].norm().clamp_min(1e-300))
            for k in exact}


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """The fast model with its C kernels, or with its torch implementation alone."""
    if request.param == "torch":
        monkeypatch.setenv("BIRDSEP_NATIVE", "0")
    else:
        monkeypatch.delenv("BIRDSEP_NATIVE", raising=False)
    return request.param


@pytest.mark.parametrize("case", list(CASES))
def test_float32_gradients_as_accurate_as_asteroids(case, kernels):
    norm, kernel, causal, offset, batch, samples = CASES[case]
    stock, fast, exact = smooth_models(norm, kernel, causal, offset)
    failures = []
    for i in range(INPUTS):
        gen = torch.Generator().manual_seed(1000 + i)
        mixture = torch.randn(batch, samples, generator=gen)
        weights = torch.randn(batch, NET["n_src"], samples, generator=gen)
        reference = gradients(exact, mixture.double(), weights.double())
        err_stock = relative_errors(gradients(stock, mixture, weights), reference)
        err_fast = relative_errors(gradients(fast, mixture, weights), reference)
        failures += [(i, name, err_fast[name], err_stock[name]) for name in reference
                     if err_fast[name] > FACTOR * err_stock[name] + FLOOR]
    assert not failures, f"(input, tensor, fast error, asteroid float32 error): {failures[:5]}"


@pytest.mark.parametrize("norm,causal", [("gLN", False), ("cLN", False), ("cLN", True)])
@pytest.mark.parametrize("batch", [1, 2])
def test_one_frame_trains_like_asteroid(norm, causal, batch, kernels):
    """A 16-sample input is one encoder frame: asteroid trains on it, so must we."""
    kwargs = dict(NET, norm_type=norm, causal=causal, conv_kernel_size=3)
    torch.manual_seed(3)
    stock = ConvTasNet(**kwargs).double()
    fast = FastConvTasNet(**kwargs).double()
    fast.load_state_dict(stock.state_dict(), strict=True)
    fast.impl = "function"      # the CPU autograd functions, also in float64
    mixture = torch.randn(batch, 16, dtype=torch.float64)
    weights = torch.randn(batch, NET["n_src"], 16, dtype=torch.float64)
    errors = relative_errors(gradients(fast, mixture, weights),
                             gradients(stock, mixture, weights))
    assert max(errors.values()) < 1e-8, errors
    errors32 = relative_errors(gradients(fast.float(), mixture.float(), weights.float()),
                               gradients(stock.float(), mixture.float(), weights.float()))
    assert max(errors32.values()) < 1e-3, errors32     # the float32 kernels, no in-place error
