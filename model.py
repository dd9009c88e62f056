"""Conv-TasNet for bird-sound separation: construction from the recipe conf, optimizer, and
loading of a trained experiment's `best_model.pth` (asteroid's serialised format).

Encoder variants (conf `model.encoder`):
  linear  free (learned) filterbank, no activation, free decoder (asteroid's default)
  relu    free filterbank followed by a ReLU, free decoder
  pinv    free encoder filterbank; the decoder is its pseudo-inverse (no decoder weights)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from asteroid.engine.optimizers import make_optimizer

from fast_tasnet import DEPTHWISE_FORMS, FastConvTasNet
from utils.config import Conf, ConfError

ENCODER_VARIANTS = ("linear", "relu", "pinv")
# Normalisations that only look at the past; gLN/BN statistics span the whole utterance.
CAUSAL_NORMS = ("cLN", "cgLN")


class BirdConvTasNet(FastConvTasNet):
    """The recipe's Conv-TasNet: fast_tasnet's drop-in ConvTasNet (same arguments and state
    dict as asteroid's, serialised as "ConvTasNet" with `who_is_pinv` kept, so a pseudo-inverse
    decoder reloads as one, also through `asteroid.models.ConvTasNet.from_pretrained`).

    A pseudo-inverse decoder shares the encoder's filterbank, so its state dict has exactly the
    layout of a free decoder and would load into a plain ConvTasNet without complaint, then run
    with the wrong decoder: hence `who_is_pinv` in the model args.
    """

    @property
    def encoder_variant(self) -> str:
        """linear, relu or pinv (the conf's `model.encoder`)."""
        if self.decoder.is_pinv:
            return "pinv"
        return "relu" if self.encoder_activation == "relu" else "linear"


def model_kwargs(conf: Conf) -> dict[str, Any]:
    """Constructor arguments of asteroid's ConvTasNet for the conf's `model` section
    (the thesis' Table IV.1 symbols in comments)."""
    m = conf["model"]
    encoder = m["encoder"]
    if encoder not in ENCODER_VARIANTS:
        raise ConfError(f"--encoder {encoder!r}: expected one of {', '.join(ENCODER_VARIANTS)}")
    if m["causal"] and m["norm_type"] not in CAUSAL_NORMS:
        # asteroid would silently switch to cLN; the conf (and exp/<tag>/conf.yml) would then lie.
        raise ConfError(f"--causal true needs a causal normalisation ({' or '.join(CAUSAL_NORMS)}), "
                        f"got --norm_type {m['norm_type']}: pass --norm_type cLN")
    if m["kernel_size"] < 2:
        raise ConfError(f"--kernel_size {m['kernel_size']}: must be >= 2 (the stride is half of it)")
    return dict(
        n_src=m["n_src"],
        n_filters=m["n_filters"],            # N
        kernel_size=m["kernel_size"],        # L
        stride=m["kernel_size"] // 2,        # L/2 (asteroid's ConvTasNet default is a fixed 8)
        bn_chan=m["bn_chan"],                # B
        hid_chan=m["hid_chan"],              # H
        skip_chan=m["skip_chan"],            # Sc
        conv_kernel_size=m["conv_kernel_size"],  # P
        n_blocks=m["n_blocks"],              # X
        n_repeats=m["n_repeats"],            # R
        norm_type=m["norm_type"],
        causal=m["causal"],
        mask_act=m["mask_act"],
        fb_name="free",
        encoder_activation="relu" if encoder == "relu" else None,
        who_is_pinv="dec" if encoder == "pinv" else None,
        sample_rate=conf["clips"]["sample_rate"],
    )


IMPLEMENTATIONS = ("fast", "stock")


def make_model(conf: Conf) -> BirdConvTasNet:
    """The one place a separation model is built from a conf."""
    implementation = conf["model"]["implementation"]
    if implementation not in IMPLEMENTATIONS:
        raise ConfError(f"--implementation {implementation!r}: expected one of "
                        f"{', '.join(IMPLEMENTATIONS)}")
    model = BirdConvTasNet(**model_kwargs(conf))
    # Same weights and results either way; "stock" runs asteroid's own forward.
    model.impl = "auto" if implementation == "fast" else "stock"
    return model


# torch.compile's modes; those that capture CUDA graphs need each step marked as a new one.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ConfError(f"--compile_mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")


def compile_in_place(model: torch.nn.Module, mode: str = "default", depthwise: str = "shifted"
                     ) -> Callable[[], None]:
    """torch.compile `model` in place (Module.compile, so its state-dict keys stay asteroid's;
    torch.compile(model) would prefix them with "_orig_mod."). Returns what each training or
    validation step calls before the forward: with CUDA graphs, the mark of a new step (a graph
    replays into the same output buffers).

    Ours runs compiled on its plain-operator path (what it runs on GPUs anyway: the CPU path's
    autograd functions and C kernels break dynamo's graphs), with the depthwise convolution in
    the `depthwise` form (fast_tasnet.DEPTHWISE_FORMS): "shifted" sums of shifted copies are
    elementwise operators that the compiler fuses with the norms and PReLUs around them."""
    check_compile_mode(mode)
    if depthwise not in DEPTHWISE_FORMS:
        raise ValueError(f"depthwise form {depthwise!r}: expected one of {', '.join(DEPTHWISE_FORMS)}")
    if isinstance(model, FastConvTasNet) and model.impl != "stock":
        model.impl = "autograd"
        model.depthwise = depthwise
    model.compile(mode=mode)
    if mode in CUDA_GRAPH_MODES:
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


# torch's fused Adam/AdamW/SGD (CPU and CUDA) update every parameter in one kernel instead of
# a dozen small ops per tensor: measured 10.8 -> 2.2 ms per step for conf_cpu.yml's model and
# 27 -> 8.4 ms for conf.yml's, one CPU thread, torch 2.11.
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")


def make_recipe_optimizer(params, optimizer: str, lr: float, weight_decay: float,
                          fused: bool = True) -> torch.optim.Optimizer:
    """asteroid's `make_optimizer`, with torch's fused implementation where there is one
    (unless `fused` is False)."""
    fused = {"fused": True} if fused and optimizer.lower() in FUSED_OPTIMIZERS else {}
    return make_optimizer(params, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **fused)


def make_model_and_optimizer(conf: Conf, fused: bool = True
                             ) -> tuple[BirdConvTasNet, torch.optim.Optimizer]:
    """Model and its optimizer (conf `optim`: optimizer name, lr, weight_decay)."""
    model = make_model(conf)
    optim = conf["optim"]
    try:
        optimizer = make_recipe_optimizer(model.parameters(), optim["optimizer"], optim["lr"],
                                          optim["weight_decay"], fused=fused)
    except ValueError as err:
        raise ConfError(f"--optimizer {optim['optimizer']!r}: {err}") from None
    return model, optimizer


def load_best_model(exp_dir: str | Path) -> BirdConvTasNet:
    """The trained model of an experiment (`<exp_dir>/best_model.pth`), in eval mode, on CPU."""
    path = Path(exp_dir) / "best_model.pth"
    if not path.is_file():
        checkpoints = sorted((Path(exp_dir) / "checkpoints").glob("*.ckpt"))
        if checkpoints:   # trained, but stopped (killed, crashed) before writing it
            raise FileNotFoundError(
                f"{path} not found, but {path.parent / 'checkpoints'} holds "
                f"{len(checkpoints)} checkpoint(s): training did not finish; resume it (stage 3, "
                "the same run.sh command with --stage 3, or train.py with the same --exp_dir), "
                "which writes best_model.pth")
        raise FileNotFoundError(f"{path} not found: train first (stage 3, train.py)")
    model = BirdConvTasNet.from_pretrained(str(path))
    return model.eval()
