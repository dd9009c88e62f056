"""Both implementations (`model.implementation`: stock, fast) are drop-ins for asteroid's
ConvTasNet: what asteroid's own model tests check, written for this recipe. Forward shapes,
`get_model_args`, `serialize` / `from_pretrained` in every direction, `separate()` on tensors,
arrays and files, and `torch.jit.trace`."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from asteroid.models import ConvTasNet

from model import load_best_model, model_class

NET = dict(n_src=2, n_filters=16, kernel_size=16, stride=8, bn_chan=8, hid_chan=16,
           skip_chan=8, n_blocks=3, n_repeats=1, conv_kernel_size=3, fb_name="free",
           sample_rate=8000)
VARIANTS = {
    "gLN": dict(),
    "cLN-softmax": dict(norm_type="cLN", mask_act="softmax"),
    "causal": dict(norm_type="cLN", causal=True),
    "3-sources": dict(n_src=3),
    "pinv": dict(who_is_pinv="dec"),
}
SAMPLES = 800


def models(implementation: str, variant: str, seed: int = 0):
    """asteroid's ConvTasNet with weights moved off their initialisation, and the recipe's
    `implementation` with the same weights."""
    kwargs = dict(NET, **VARIANTS[variant])
    torch.manual_seed(seed)
    reference = ConvTasNet(**kwargs)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    ours = model_class(implementation)(**kwargs)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), ours.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=1e-5, rtol=1e-4))


pytestmark = pytest.mark.parametrize("implementation", ["fast", "stock"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_shapes_of_1d_2d_3d_input(implementation, variant):
    reference, ours = models(implementation, variant)
    n_src = reference.masker.n_src
    with torch.no_grad():
        for wav, shape in [(torch.randn(SAMPLES), (n_src, SAMPLES)),
                           (torch.randn(3, SAMPLES), (3, n_src, SAMPLES)),
                           (torch.randn(2, 1, SAMPLES + 5), (2, n_src, SAMPLES + 5))]:
            out = ours(wav)
            assert out.shape == shape
            assert close(out, reference(wav))


@pytest.mark.parametrize("variant", ["gLN", "causal", "pinv"])
def test_model_args_rebuild_the_same_model(implementation, variant):
    reference, ours = models(implementation, variant)
    args = ours.get_model_args()
    assert args["n_src"] == reference.masker.n_src
    assert args["norm_type"] == reference.masker.norm_type
    for cls in (ConvTasNet, type(ours)):
        rebuilt = cls(**args)
        rebuilt.load_state_dict(ours.state_dict(), strict=True)
        assert rebuilt.decoder.is_pinv == (variant == "pinv")
        wav = torch.randn(1, SAMPLES)
        with torch.no_grad():
            assert close(rebuilt.eval()(wav), reference(wav))


@pytest.mark.parametrize("variant", ["gLN", "pinv"])
def test_serialised_models_load_in_every_direction(implementation, variant, tmp_path):
    reference, ours = models(implementation, variant)
    other = model_class("stock" if implementation == "fast" else "fast")
    wav = torch.randn(1, SAMPLES)
    path = tmp_path / "model.pth"
    torch.save(ours.serialize(), path)
    with torch.no_grad():
        expected = reference(wav)
        for cls in (ConvTasNet, type(ours), other):
            loaded = cls.from_pretrained(str(path)).eval()
            assert type(loaded) is cls
            assert loaded.decoder.is_pinv == (variant == "pinv")
            assert close(loaded(wav), expected)
        if variant == "gLN":
            # A file written by asteroid's own serialize() (no who_is_pinv, torch's version
            # as a TorchVersion) loads into ours, as a dict and from disk.
            assert close(type(ours).from_pretrained(reference.serialize()).eval()(wav), expected)
            exp_dir = tmp_path / "exp"
            exp_dir.mkdir()
            torch.save(reference.serialize(), exp_dir / "best_model.pth")
            assert close(type(ours).from_pretrained(str(exp_dir / "best_model.pth")).eval()(wav),
                         expected)
            assert close(load_best_model(exp_dir, implementation)(wav), expected)


def test_separate_tensors_arrays_and_files(implementation, tmp_path):
    reference, ours = models(implementation, "gLN")
    wav = 0.1 * torch.randn(1, SAMPLES)    # within [-1, 1]: asteroid writes 16-bit PCM files
    with torch.no_grad():
        expected = reference.separate(wav)     # asteroid rescales the estimates to the input
        assert close(ours.separate(wav), expected)
        arrays = ours.separate(wav.numpy())
        assert isinstance(arrays, np.ndarray)
        assert close(torch.from_numpy(arrays), expected)
    path = tmp_path / "mix.wav"
    sf.write(path, wav[0].numpy(), NET["sample_rate"], subtype="FLOAT")
    ours.separate(str(path), resample=False)
    for i in range(NET["n_src"]):
        written, rate = sf.read(tmp_path / f"mix_est{i + 1}.wav", dtype="float32")
        assert rate == NET["sample_rate"]
        diff = (torch.from_numpy(written) - expected[0, i]).abs()
        assert float(diff.max()) < 1e-4, (float(diff.max()), int(diff.argmax()), written.shape)


@pytest.mark.parametrize("variant", ["gLN", "cLN-softmax", "causal"])
@pytest.mark.parametrize("grad", [True, False])
def test_jit_trace_gives_the_eager_outputs(implementation, variant, grad):
    """A trace recorded on one length replays the eager model's outputs on another."""
    reference, ours = models(implementation, variant)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(ours, torch.randn(2, SAMPLES))
        wav = torch.randn(2, SAMPLES + 160)
        out = traced(wav)
    with torch.no_grad():
        assert close(out.detach(), reference(wav))
        assert close(out.detach(), ours(wav))
