"""FastConvTasNet against asteroid's ConvTasNet: same outputs and gradients for every recipe
variant, state dicts and serialised models interchangeable, and the benchmark's quick run."""
from __future__ import annotations

import json

import pytest
import torch
from asteroid.models import ConvTasNet

from conftest import TINY_MODEL
from fast_tasnet import FastConvTasNet, masker_supported, tasnet
from tools import benchmark
from model import model_kwargs
import separate
from utils.config import read_conf, write_conf

# A little deeper than TINY_MODEL so that dilations reach past the frames of the short inputs
# (taps that never overlap) and blocks of both norms are exercised.
PARITY_MODEL = dict(TINY_MODEL, n_filters=24, bn_chan=12, hid_chan=20, skip_chan=10, n_blocks=6)
SAMPLES = 400   # 49 frames: dilations 1..32

VARIANTS = {
    "gLN-sigmoid-linear": dict(),
    "cLN-softmax": dict(norm_type="cLN", mask_act="softmax"),
    "causal-cLN": dict(norm_type="cLN", causal=True),
    "relu-encoder-relu-mask": dict(encoder="relu", mask_act="relu"),
    "pinv-decoder": dict(encoder="pinv"),
    "3-sources-P5": dict(n_src=3, conv_kernel_size=5),
}


@pytest.fixture
def conf(repo_root):
    return read_conf(repo_root / "conf.yml")


def kwargs_for(conf, **model):
    conf["model"].update(PARITY_MODEL, **model)
    return model_kwargs(conf)


def perturbed_pair(kwargs, seed=0):
    """Stock model with non-trivial norms and PReLUs, and ours with its weights (strict)."""
    torch.manual_seed(seed)
    stock = ConvTasNet(**kwargs)
    with torch.no_grad():
        for param in stock.parameters():
            param.add_(0.1 * torch.randn_like(param))
        # Negative PReLU slopes take the backward path that keeps the PReLU input.
        stock.masker.TCN[0].shared_block[1].weight.fill_(-0.3)
        stock.masker.TCN[1].shared_block[4].weight.fill_(-0.2)
    ours = FastConvTasNet(**kwargs)
    ours.load_state_dict(stock.state_dict(), strict=True)
    return stock, ours


def relative(a, b):
    return float((a - b).norm() / b.norm())


def forward_backward(model, mixture, weights):
    model.zero_grad()
    estimates = model(mixture)
    (estimates * weights).sum().backward()
    return estimates.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same_grads(ours, stock, tol):
    assert ours.keys() == stock.keys()
    for name in stock:
        if stock[name] is None:   # the last block's residual conv feeds nothing
            assert ours[name] is None or not ours[name].any(), name
            continue
        assert relative(ours[name], stock[name]) < tol, (name, relative(ours[name], stock[name]))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("impl", ["function", "autograd", "autograd-shifted"])
def test_outputs_and_gradients_equal_asteroid_in_float64(conf, variant, impl):
    """Exact math (float64): the CPU autograd functions and the device-generic path (its
    depthwise convolution by F.conv1d or as shifted copies)."""
    stock, ours = perturbed_pair(kwargs_for(conf, **VARIANTS[variant]))
    stock.double()
    ours.double()
    ours.impl, _, form = impl.partition("-")
    ours.depthwise = form or "conv"
    mixture = torch.randn(2, SAMPLES, dtype=torch.float64)
    weights = torch.randn(2, stock.masker.n_src, SAMPLES, dtype=torch.float64)
    out_stock, grads_stock = forward_backward(stock, mixture, weights)
    out_ours, grads_ours = forward_backward(ours, mixture, weights)
    assert relative(out_ours, out_stock) < 1e-10
    assert_same_grads(grads_ours, grads_stock, 1e-8)
    with torch.no_grad():
        assert relative(ours(mixture), out_stock) < 1e-10


class CountingOneDNN:
    """Stands in for torch.ops.mkldnn._linear_pointwise: counts the calls and runs the op."""

    def __init__(self, op):
        self.op, self.calls = op, []

    def __call__(self, *args):
        self.calls.append(args[3])           # the activation
        return self.op(*args)

    def binary(self, *args):
        self.calls.append(args[4])           # "add"
        return self.op.binary(*args)


@pytest.fixture(params=["onednn", "torch"])
def gemm_library(request, monkeypatch):
    """Tall float32 products through oneDNN (every product, however few its rows, so that
    the tiny models take that path) or through torch (BIRDSEP_ONEDNN=0).  Yields the counter
    of oneDNN calls, or None."""
    if request.param == "torch":
        monkeypatch.setenv("BIRDSEP_ONEDNN", "0")
        yield None
        return
    monkeypatch.delenv("BIRDSEP_ONEDNN", raising=False)
    op = tasnet._onednn_op()
    if op is None:
        pytest.skip("this torch build has no oneDNN matmul")
    counter = CountingOneDNN(op)
    monkeypatch.setattr(tasnet, "_ONEDNN_MIN_ROWS", 1)
    monkeypatch.setitem(tasnet._onednn_state, "op", counter)
    yield counter


@pytest.mark.parametrize("variant", ["gLN-sigmoid-linear", "cLN-softmax", "pinv-decoder",
                                     "relu-encoder-relu-mask"])
def test_float32_parity_within_benchmark_tolerances(conf, variant, gemm_library):
    stock, ours = perturbed_pair(kwargs_for(conf, **VARIANTS[variant]))
    mixture, weights = torch.randn(3, SAMPLES), torch.randn(3, 2, SAMPLES)
    out_stock, grads_stock = forward_backward(stock, mixture, weights)
    out_ours, grads_ours = forward_backward(ours, mixture, weights)
    assert (out_ours - out_stock).abs().max() <= 1e-4 * out_stock.abs().max()
    assert_same_grads(grads_ours, grads_stock, 1e-3)
    with torch.inference_mode():
        assert relative(ours(mixture), out_stock) < 1e-5
        assert relative(ours(mixture[:1]), out_stock[:1]) < 1e-5   # one recording at a time
    if gemm_library is not None:
        assert "add" in gemm_library.calls
        act = VARIANTS[variant].get("mask_act", "sigmoid")
        assert (act in gemm_library.calls) == (act in ("sigmoid", "relu"))


def test_onednn_products_fall_back_to_torch(monkeypatch, caplog):
    class Failing:
        def __call__(self, *args):
            raise RuntimeError("no kernel for this CPU")

        binary = __call__

    monkeypatch.setattr(tasnet, "_ONEDNN_MIN_ROWS", 1)
    monkeypatch.setitem(tasnet._onednn_state, "op", Failing())
    monkeypatch.delenv("BIRDSEP_ONEDNN", raising=False)
    a, w, b, add = torch.randn(30, 8), torch.randn(5, 8), torch.randn(5), torch.randn(30, 5)
    with torch.no_grad():
        result = tasnet._linear(a, w, bias=b, add=add)
    assert torch.allclose(result, a @ w.t() + b + add, atol=1e-6)
    assert tasnet._onednn_state["op"] is None and "oneDNN matmul failed" in caplog.text
    with torch.no_grad():                    # from now on torch, the activation included
        result = tasnet._linear(a, w, bias=b, activation="sigmoid")
    assert torch.allclose(result, torch.sigmoid(a @ w.t() + b), atol=1e-6)


@pytest.mark.parametrize("machine, expected", [("x86_64", True), ("AMD64", True),
                                                ("arm64", False), ("aarch64", False)])
def test_onednn_products_only_on_x86(monkeypatch, machine, expected):
    if expected and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.delenv("BIRDSEP_ONEDNN", raising=False)
    monkeypatch.setattr(tasnet.platform, "machine", lambda: machine)
    decided = dict(tasnet._onednn_state)
    tasnet._onednn_state.clear()              # decide again on this "machine"
    try:
        assert (tasnet._onednn_op() is not None) == expected
    finally:
        tasnet._onednn_state.clear()
        tasnet._onednn_state.update(decided)


def test_products_that_need_gradients_stay_with_torch(gemm_library):
    # The oneDNN op has no backward: with autograd on, torch computes the product.
    a = torch.randn(40, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    tasnet._linear(a, w).sum().backward()
    assert torch.allclose(a.grad, w.sum(0).expand(40, 8).detach())
    assert torch.allclose(w.grad, a.sum(0).expand(6, 8).detach())
    if gemm_library is not None:
        assert gemm_library.calls == []


def test_shapes_follow_asteroid(conf):
    stock, ours = perturbed_pair(kwargs_for(conf))
    with torch.no_grad():
        for wav in (torch.randn(SAMPLES), torch.randn(2, SAMPLES), torch.randn(2, 1, SAMPLES + 3)):
            expected = stock(wav)
            assert ours(wav).shape == expected.shape
            assert torch.allclose(ours(wav), expected, atol=1e-5)
        tf_rep = stock.forward_encoder(torch.randn(2, 1, SAMPLES))
        assert torch.allclose(ours.forward_masker(tf_rep), stock.forward_masker(tf_rep), atol=1e-5)


def test_training_after_inference_mode(conf):
    """Scratch buffers made under inference_mode must not leak into training."""
    stock, ours = perturbed_pair(kwargs_for(conf))
    mixture = torch.randn(2, SAMPLES)
    with torch.inference_mode():
        ours(mixture)
    out_stock, grads_stock = forward_backward(stock, mixture, torch.ones(2, 2, SAMPLES))
    out_ours, grads_ours = forward_backward(ours, mixture, torch.ones(2, 2, SAMPLES))
    assert_same_grads(grads_ours, grads_stock, 1e-3)


def test_unsupported_norm_falls_back_to_asteroid(conf):
    kwargs = kwargs_for(conf, norm_type="cgLN", causal=True)
    stock, ours = perturbed_pair(kwargs)
    assert not masker_supported(ours.masker)
    mixture = torch.randn(2, SAMPLES)
    with torch.no_grad():
        assert torch.allclose(ours(mixture), stock(mixture), atol=1e-6)


def test_state_dicts_load_both_ways_strictly(conf):
    kwargs = kwargs_for(conf)
    stock, ours = perturbed_pair(kwargs, seed=1)
    assert list(ours.state_dict()) == list(stock.state_dict())
    back = ConvTasNet(**kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    mixture = torch.randn(1, SAMPLES)
    with torch.no_grad():
        assert torch.equal(back(mixture), stock(mixture))


@pytest.mark.parametrize("encoder", ["linear", "pinv"])
def test_serialised_model_loads_in_asteroid_and_in_ours(conf, tmp_path, encoder):
    stock, ours = perturbed_pair(kwargs_for(conf, encoder=encoder), seed=2)
    path = tmp_path / "best_model.pth"
    torch.save(ours.serialize(), path)
    mixture = torch.randn(1, SAMPLES)
    with torch.no_grad():
        expected = stock(mixture)
        by_asteroid = ConvTasNet.from_pretrained(str(path))
        by_ours = FastConvTasNet.from_pretrained(str(path))
        assert type(by_asteroid) is ConvTasNet and type(by_ours) is FastConvTasNet
        assert by_asteroid.decoder.is_pinv == by_ours.decoder.is_pinv == (encoder == "pinv")
        assert torch.allclose(by_asteroid(mixture), expected, atol=1e-6)
        assert torch.allclose(by_ours(mixture), expected, atol=1e-5)
        if encoder == "linear":  # asteroid's serialize() forgets who_is_pinv (model.py)
            # asteroid's own serialisation (a dict) loads into ours too.
            assert torch.allclose(FastConvTasNet.from_pretrained(stock.serialize())(mixture),
                                  expected, atol=1e-5)
    with pytest.raises(ValueError, match="ConvTasNet"):
        FastConvTasNet.from_pretrained(dict(ours.serialize(), model_name="DPRNNTasNet"))


def tiny_confs(conf, tmp_path):
    conf["model"].update(TINY_MODEL)
    conf["training"].update(segment_s=0.5, num_threads=1)
    thesis, preset = tmp_path / "conf.yml", tmp_path / "conf_cpu.yml"
    write_conf(conf, thesis)
    conf["model"].update(n_blocks=3)
    write_conf(conf, preset)
    return thesis, preset


def test_benchmark_quick_run_writes_the_figures(conf, tmp_path):
    thesis, preset = tiny_confs(conf, tmp_path)
    out = tmp_path / "bench.json"
    benchmark.main(["--quick", "--in_process", "--conf", str(thesis), "--preset_conf", str(preset),
                    "--json", str(out), "--infer_rounds", "2"])
    figures = json.loads(out.read_text())
    for key in ["train_speedup_thesis", "train_speedup_preset", "rtf_thesis_ours",
                "rtf_thesis_stock", "infer_speedup_thesis", "eval_sdr_speedup", "parity_ok",
                "device", "torch_version", "threads_thesis", "cpu_model"]:
        assert key in figures, key
    assert figures["parity_ok"] is True and figures["eval_sdr"]["agree"] is True
    assert figures["train_speedup_thesis"] > 0 and figures["rtf_thesis_ours"] > 0
    assert figures["cases"]["train_preset_fast_memory"]["peak_rss_growth_mb"] >= 0
    pair = figures["cases"]["train_thesis_pair"]     # stock and ours took turns
    assert len(pair["steps_s_stock"]) == len(pair["steps_s_fast"]) >= 2
    assert figures["train_speedup_thesis"] == pair["step_s_stock"] / pair["step_s_fast"]
    pair16 = figures["cases"]["train_thesis_pair_bf16"]
    assert figures["train_speedup_thesis_bf16"] == pair16["step_s_stock"] / pair16["step_s_fast"]
    assert figures["rtf_thesis_ours_bf16"] > 0
    for name in ("stock", "fast", "fast_bf16"):     # rounds of fresh processes, medians
        infer = figures["cases"][f"infer_thesis_{name}"]
        assert len(infer["rtf_rounds"]) == 2 and infer["rtf"] == sum(infer["rtf_rounds"]) / 2
    # separate.py's default precision on this machine, and its ratio.
    default = "infer_speedup_thesis_bf16" if figures["separation_bf16"] else "infer_speedup_thesis"
    assert figures["separation_bf16"] == separate.use_bf16("auto", "cpu")
    assert figures["infer_speedup_thesis_separation"] == figures[default]


def test_benchmark_case_runs_in_a_fresh_process(conf, tmp_path):
    conf["model"].update(TINY_MODEL)
    result = benchmark.run_case_in_subprocess(dict(
        kind="parity", kwargs=model_kwargs(conf), seconds=0.25, threads=1, seed=0))
    assert result["ok"] is True and result["output_rel_error"] < 1e-4


def test_missing_preset_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit):
        benchmark.main(["--preset_conf", str(tmp_path / "absent.yml"), "--quick"])


def test_data_loading_is_timed_through_the_recipe_dataset(conf, tmp_path):
    import numpy as np
    import pandas as pd

    from utils.audio import write_wav

    sample_rate = conf["clips"]["sample_rate"]
    split_dir = tmp_path / "BSD-2mix"
    rows = []
    rng = np.random.default_rng(0)
    for k in range(6):
        sources = rng.standard_normal((2, sample_rate // 2)).astype(np.float32) * 0.1
        paths = {}
        for name, audio in (("mix", sources.sum(0)), ("s1", sources[0]), ("s2", sources[1])):
            paths[name] = f"tr/{name}/m{k}.wav"
            write_wav(split_dir / paths[name], audio, sample_rate)
        rows.append(dict(mixture_id=f"m{k}", mixture_path=paths["mix"], source_1_path=paths["s1"],
                         source_2_path=paths["s2"], length=sample_rate // 2))
    pd.DataFrame(rows).to_csv(split_dir / "tr.csv", index=False)
    conf["training"].update(batch_size=2, segment_s=0.25, num_workers=0)
    loading = benchmark.time_data_loading(conf, tmp_path, n_batches=2)
    assert loading["n_batches"] == 2 and loading["batch_s"] > 0


def _outputs_and_grads(model, mixture, sources, bf16: bool):
    from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        estimates = model(mixture)
    PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")(estimates, sources).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        inferred = model(mixture)
    return estimates.detach(), grads, inferred


@pytest.mark.parametrize("norm_type", ["gLN", "cLN"])
def test_bf16_autocast_runs_the_fast_path(conf, norm_type):
    # Under CPU bf16 autocast (--precision bf16-mixed) ours keeps its fast path, with the gLN
    # blocks' matrix products in bf16 and everything else (cLN blocks too) in float32.
    _, ours = perturbed_pair(kwargs_for(conf, norm_type=norm_type))
    mixture, sources = benchmark.random_batch(2, 2, SAMPLES, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours._mode(mixture) == "function"
    out32, grads32, _ = _outputs_and_grads(ours, mixture, sources, bf16=False)
    out16, grads16, inferred16 = _outputs_and_grads(ours, mixture, sources, bf16=True)
    assert out16.dtype == inferred16.dtype == torch.float32
    assert torch.equal(out16, inferred16)
    if norm_type == "cLN":
        assert relative(out16, out32) < 1e-5 and relative(grads16, grads32) < 1e-4
        return
    # bf16 operands (8 bits of mantissa): errors of a few 1e-3, but products did use them.
    assert 1e-5 < relative(out16, out32) < 3e-2
    assert relative(grads16, grads32) < 5e-2
