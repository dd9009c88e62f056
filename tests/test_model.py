"""Conv-TasNet construction from the conf, PIT loss, and the best_model.pth round trip."""
from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr
from asteroid.models import ConvTasNet

from conftest import TINY_MODEL
from model import encoder_variant, load_best_model, make_model, make_model_and_optimizer
from utils.config import ConfError, read_conf



@pytest.fixture
def tiny_conf(repo_root):
    conf = read_conf(repo_root / "conf.yml")
    conf["model"].update(TINY_MODEL)
    return conf


VARIANTS = list(itertools.product(["linear", "relu", "pinv"], ["sigmoid", "softmax"],
                                  ["gLN", "cLN"], [False, True]))


@pytest.mark.parametrize("implementation", ["fast", "stock"])
@pytest.mark.parametrize("encoder,mask_act,norm_type,causal", VARIANTS)
def test_every_variant_builds_and_separates(tiny_conf, encoder, mask_act, norm_type, causal,
                                            implementation):
    tiny_conf["model"].update(encoder=encoder, mask_act=mask_act, norm_type=norm_type, causal=causal,
                              implementation=implementation)
    if causal and norm_type == "gLN":
        # gLN normalises over the whole utterance: not causal. asteroid would silently swap in
        # cLN; the recipe refuses instead, so that conf.yml says what was trained.
        with pytest.raises(ConfError, match="--norm_type cLN"):
            make_model(tiny_conf)
        return
    model = make_model(tiny_conf).eval()
    assert encoder_variant(model) == encoder
    assert model.decoder.is_pinv == (encoder == "pinv")
    assert isinstance(model.enc_activation, torch.nn.ReLU) == (encoder == "relu")
    assert model.masker.causal == causal and model.masker.norm_type == norm_type
    assert model.masker.mask_act == mask_act
    assert model.encoder.stride == 8 and model.sample_rate == tiny_conf["clips"]["sample_rate"]
    mixture = torch.randn(2, 1000)
    with torch.no_grad():
        estimates = model(mixture)
    assert estimates.shape == (2, 2, 1000) and torch.isfinite(estimates).all()


def test_table_hyperparameters_reach_the_network(tiny_conf):
    tiny_conf["model"].update(n_src=3, n_filters=24, kernel_size=32, bn_chan=12, hid_chan=20,
                              skip_chan=10, conv_kernel_size=5, n_blocks=3, n_repeats=2)
    args = make_model(tiny_conf).get_model_args()
    assert {k: args[k] for k in ["n_src", "n_filters", "kernel_size", "stride", "bn_chan", "hid_chan",
                                 "skip_chan", "conv_kernel_size", "n_blocks", "n_repeats"]} == dict(
        n_src=3, n_filters=24, kernel_size=32, stride=16, bn_chan=12, hid_chan=20, skip_chan=10,
        conv_kernel_size=5, n_blocks=3, n_repeats=2)
    with torch.no_grad():
        assert make_model(tiny_conf)(torch.randn(800)).shape == (3, 800)


def test_bad_model_conf_is_a_clear_error(tiny_conf):
    tiny_conf["model"]["encoder"] = "stft"
    with pytest.raises(ConfError, match="--encoder 'stft'"):
        make_model(tiny_conf)


def test_optimizer_follows_conf(tiny_conf):
    tiny_conf["optim"].update(lr=3e-4, weight_decay=1e-5)
    model, optimizer = make_model_and_optimizer(tiny_conf)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 3e-4 and optimizer.param_groups[0]["weight_decay"] == 1e-5
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())
    assert optimizer.param_groups[0]["fused"] is True


def test_fused_optimizer_steps_like_the_plain_one(tiny_conf):
    """The fused Adam the recipe uses takes the same steps as asteroid's plain one."""
    torch.manual_seed(0)
    model, fused = make_model_and_optimizer(tiny_conf)
    plain_model = make_model(tiny_conf)
    plain_model.load_state_dict(model.state_dict())
    plain = torch.optim.Adam(plain_model.parameters(), lr=tiny_conf["optim"]["lr"])
    mixture = torch.randn(2, 800)
    for net, opt in ((model, fused), (plain_model, plain)):
        for _ in range(3):
            opt.zero_grad()
            net(mixture).pow(2).mean().backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_pit_sisnr_is_permutation_invariant():
    torch.manual_seed(0)
    loss_func = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
    targets = torch.randn(3, 3, 800)
    estimates = targets + 0.3 * torch.randn(3, 3, 800)
    loss = loss_func(estimates, targets)
    for perm in itertools.permutations(range(3)):
        assert torch.allclose(loss_func(estimates, targets[:, list(perm)]), loss, atol=1e-5)
    # ...while an unmatched assignment scores much worse: the loss does look at the order.
    fixed_order = pairwise_neg_sisdr(estimates, targets[:, [1, 2, 0]]).diagonal(dim1=1, dim2=2).mean()
    assert fixed_order > loss + 10


@pytest.mark.parametrize("implementation", ["fast", "stock"])
@pytest.mark.parametrize("encoder", ["linear", "relu", "pinv"])
def test_best_model_round_trip(tiny_conf, tmp_path, encoder, implementation):
    tiny_conf["model"].update(encoder=encoder, n_src=3, implementation=implementation)
    torch.manual_seed(1)
    model = make_model(tiny_conf).eval()
    package = model.serialize()
    package["infos"]["training_config"] = tiny_conf   # as train.py writes it
    torch.save(package, tmp_path / "best_model.pth")
    mixture = torch.randn(2, 1200)
    with torch.no_grad():
        expected = model(mixture)
        ours = load_best_model(tmp_path)
        # asteroid's own loader on the same file (no import of the recipe's classes needed).
        theirs = ConvTasNet.from_pretrained(str(tmp_path / "best_model.pth")).eval()
        assert type(ours) is type(model) and not ours.training
        # Each implementation loads the other's file, to the same separation.
        other = load_best_model(tmp_path, {"fast": "stock", "stock": "fast"}[implementation])
        assert type(other) is not type(model)
        for loaded in (ours, theirs, other):
            assert loaded.decoder.is_pinv == (encoder == "pinv")
        assert torch.equal(ours(mixture), expected)
        # asteroid's forward and the fast one differ only by float rounding.
        for loaded in (theirs, other):
            assert torch.allclose(loaded(mixture), expected, rtol=1e-4, atol=1e-6)
        if encoder == "pinv":
            # What the stored who_is_pinv prevents: the state dict of a pinv model also loads
            # into a free decoder, without error, and separates differently.
            args = {k: v for k, v in model.get_model_args().items() if k != "who_is_pinv"}
            free = ConvTasNet(**args).eval()
            free.load_state_dict(model.state_dict())
            assert not torch.allclose(free(mixture), expected)


def test_stock_is_asteroids_conv_tasnet_without_the_fast_package(repo_root):
    # In a fresh process: building, training and loading a stock model never import fast_tasnet.
    script = """
import sys, torch
from asteroid.models import ConvTasNet
import eval, model, separate, system, train
from utils.config import read_conf
conf = read_conf("conf.yml")
conf["model"].update(implementation="stock", n_filters=16, bn_chan=8, hid_chan=16, skip_chan=8,
                     n_blocks=2, n_repeats=1)
net = model.make_model(conf)
assert type(net) is model.BirdConvTasNet and type(net).__mro__[1] is ConvTasNet, type(net).__mro__
net(torch.randn(1, 800)).sum().backward()
model.compile_in_place(net)
assert "fast_tasnet" not in sys.modules, "the fast package was imported"
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_fast_is_the_fast_package(tiny_conf):
    from fast_tasnet import FastConvTasNet

    tiny_conf["model"]["implementation"] = "fast"
    assert type(make_model(tiny_conf)) is FastConvTasNet
    tiny_conf["model"]["implementation"] = "quick"
    with pytest.raises(ConfError, match="--implementation 'quick': expected one of fast, stock"):
        make_model(tiny_conf)


def test_load_best_model_without_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        load_best_model(tmp_path)


def test_compiled_model_keeps_asteroids_state_dict(tiny_conf):
    # train.py --compile true compiles in place (Module.compile), so checkpoints and
    # best_model.pth keep asteroid's keys (torch.compile(model) would prefix "_orig_mod.").
    model = make_model(tiny_conf)
    keys = list(model.state_dict())
    model.compile()
    assert list(model.state_dict()) == keys
    ConvTasNet(**model.get_model_args()).load_state_dict(model.state_dict(), strict=True)
