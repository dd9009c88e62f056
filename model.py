"""Conv-TasNet for bird-sound separation: construction from the recipe conf, optimizer, and
loading of a trained experiment's `best_model.pth` (asteroid's serialised format).

Encoder variants (conf `model.encoder`):
  linear  free (learned) filterbank, no activation, free decoder (asteroid's default)
  relu    free filterbank followed by a ReLU, free decoder
  pinv    free encoder filterbank; the decoder is its pseudo-inverse (no decoder weights)

Implementations (conf `model.implementation`):
  stock   asteroid's own ConvTasNet (BirdConvTasNet below adds only what pinv needs to reload)
  fast    fast_tasnet.FastConvTasNet: the same arguments, parameters and state dict with a
          faster forward and backward pass (fast_tasnet/). Imported only for this setting.
Either writes a `best_model.pth` that asteroid's `ConvTasNet.from_pretrained` loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from asteroid.engine.optimizers import make_optimizer
from asteroid.models import ConvTasNet
from asteroid.utils.hub_utils import cached_download

from local.targets import n_outputs
from utils.config import Conf, ConfError

ENCODER_VARIANTS = ("linear", "relu", "pinv")
IMPLEMENTATIONS = ("fast", "stock")
# Normalisations that only look at the past; gLN/BN statistics span the whole utterance.
CAUSAL_NORMS = ("cLN", "cgLN")


class BirdConvTasNet(ConvTasNet):
    """asteroid's ConvTasNet that keeps `who_is_pinv` in its model args and serialises as
    "ConvTasNet", so that a pseudo-inverse decoder reloads as one, also through
    `asteroid.models.ConvTasNet.from_pretrained`.

    A pseudo-inverse decoder shares the encoder's filterbank, so its state dict has exactly the
    layout of a free decoder and would load into a plain ConvTasNet without complaint, then run
    with the wrong decoder: hence `who_is_pinv` in the model args (asteroid's `make_enc_dec`
    takes it; asteroid's `get_model_args` leaves it out).
    """

    def get_model_args(self) -> dict[str, Any]:
        args = super().get_model_args()
        pinv = "dec" if self.decoder.is_pinv else "enc" if self.encoder.is_pinv else None
        if pinv:
            args["who_is_pinv"] = pinv
        return args

    def serialize(self) -> dict[str, Any]:
        package = super().serialize()
        package["model_name"] = "ConvTasNet"   # asteroid's name: every asteroid tool loads it
        # asteroid stores torch.__version__ as a TorchVersion, which torch.load refuses to
        # unpickle with weights_only=True (its default): plain strings instead.
        versions = package["infos"]["software_versions"]
        package["infos"]["software_versions"] = {k: str(v) for k, v in versions.items()}
        return package

    @classmethod
    def from_pretrained(cls, pretrained_model_conf_or_path, *args, **kwargs) -> "BirdConvTasNet":
        """A serialised ConvTasNet (the recipe's or asteroid's) as a BirdConvTasNet (asteroid's
        own `from_pretrained` would build a ConvTasNet from the name "ConvTasNet")."""
        package = pretrained_model_conf_or_path
        if not isinstance(package, dict):
            package = read_package(cached_download(str(package)))
        if package.get("model_name") != "ConvTasNet" or not {"model_args", "state_dict"} <= set(package):
            raise ValueError("expected a serialised asteroid ConvTasNet (model_name, model_args, "
                             f"state_dict), got keys {sorted(package)} with model_name "
                             f"{package.get('model_name')!r}")
        model = cls(*args, **{**package["model_args"], **kwargs})
        model.load_state_dict(package["state_dict"])
        return model


def fast_package():
    """The fast implementation (fast_tasnet/), imported only when a conf asks for it."""
    import fast_tasnet   # the recipe's one import of the fast package

    return fast_tasnet


def model_class(implementation: str) -> type[ConvTasNet]:
    """The class an `implementation` (conf `model.implementation`) builds."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfError(f"--implementation {implementation!r}: expected one of "
                        f"{', '.join(IMPLEMENTATIONS)}")
    return BirdConvTasNet if implementation == "stock" else fast_package().FastConvTasNet


def is_fast(model: torch.nn.Module) -> bool:
    """Whether `model` runs the fast implementation (only FastConvTasNet has an `impl`)."""
    return getattr(model, "impl", "stock") != "stock"


def encoder_variant(model: ConvTasNet) -> str:
    """linear, relu or pinv (the conf's `model.encoder`) of a built model."""
    if model.decoder.is_pinv:
        return "pinv"
    return "relu" if model.encoder_activation == "relu" else "linear"


def model_kwargs(conf: Conf) -> dict[str, Any]:
    """Constructor arguments of asteroid's ConvTasNet for the conf's `model` section
    (the thesis' Table IV.1 symbols in comments). Its outputs are `model.n_src` birds, plus
    one for the background with `training.targets: background` (local/targets.py)."""
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
        n_src=n_outputs(conf),               # C (birds), + 1 with a background output
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


def make_model(conf: Conf) -> ConvTasNet:
    """The one place a separation model is built from a conf."""
    return model_class(conf["model"]["implementation"])(**model_kwargs(conf))


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

    The fast model runs compiled on its plain-operator path (what it runs on GPUs anyway: the
    CPU path's autograd functions and C kernels break dynamo's graphs), with the depthwise
    convolution in the `depthwise` form (fast_tasnet.DEPTHWISE_FORMS): "shifted" sums of shifted
    copies are elementwise operators that the compiler fuses with the norms and PReLUs around
    them. A stock model compiles as it is."""
    check_compile_mode(mode)
    if is_fast(model):
        forms = fast_package().DEPTHWISE_FORMS
        if depthwise not in forms:
            raise ValueError(f"depthwise form {depthwise!r}: expected one of {', '.join(forms)}")
        model.impl = "autograd"
        model.depthwise = depthwise
    model.compile(mode=mode)
    if mode in CUDA_GRAPH_MODES:
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


# torch's fused Adam/AdamW/SGD (CPU and CUDA) update every parameter in one kernel instead of
# a dozen small ops per tensor, several times faster (RESULTS.md, Speed).
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")


def make_recipe_optimizer(params, optimizer: str, lr: float, weight_decay: float,
                          fused: bool = True) -> torch.optim.Optimizer:
    """asteroid's `make_optimizer`, with torch's fused implementation where there is one
    (unless `fused` is False)."""
    fused = {"fused": True} if fused and optimizer.lower() in FUSED_OPTIMIZERS else {}
    return make_optimizer(params, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **fused)


def make_model_and_optimizer(conf: Conf, fused: bool = True
                             ) -> tuple[ConvTasNet, torch.optim.Optimizer]:
    """Model and its optimizer (conf `optim`: optimizer name, lr, weight_decay)."""
    model = make_model(conf)
    optim = conf["optim"]
    try:
        optimizer = make_recipe_optimizer(model.parameters(), optim["optimizer"], optim["lr"],
                                          optim["weight_decay"], fused=fused)
    except ValueError as err:
        raise ConfError(f"--optimizer {optim['optimizer']!r}: {err}") from None
    return model, optimizer


def read_package(path: str | Path) -> dict[str, Any]:
    """A serialised model file (asteroid's format) through torch's safe `weights_only`
    unpickler. asteroid's own `serialize()` stores torch.__version__ as a TorchVersion (a str
    subclass), which that unpickler refuses by default: allowed here, so that files written by
    asteroid itself load too."""
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_best_model(exp_dir: str | Path, implementation: str | None = None) -> ConvTasNet:
    """The trained model of an experiment (`<exp_dir>/best_model.pth`), in eval mode, on CPU,
    in `implementation` (default: the one it was trained with, fast for files that do not say).
    Its `background_output` says whether its last output is the background track."""
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
    package = read_package(path)
    trained = package.get("infos", {}).get("training_config", {})
    if implementation is None:
        implementation = trained.get("model", {}).get("implementation", "fast")
    model = model_class(implementation).from_pretrained(package).eval()
    # Trained with `training.targets: background`: the last output is the background, the
    # others the birds (local/targets.py).
    model.background_output = trained.get("training", {}).get("targets") == "background"
    return model
