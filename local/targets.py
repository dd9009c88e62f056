"""What the separator is trained to output (conf `training.targets`).

The mixture is always the real sum of the recorded clips (each bird with the background of its
own recording). The references are:

  recorded    the recorded clips (the thesis' targets);
  denoised    the same clips without their background (stage 1's clips/clean/, written with
              `clips.denoise`), at the same gains and offsets;
  background  the n_src denoised clips, then one more source: the sum of the backgrounds
              (mixture minus the denoised clips), so that the references still add up to the
              mixture. The model has n_src + 1 outputs, the last one the background.

Only dynamic mixing (local/dynamic_mixing.py) draws references from the clips; the stored
BSD-{n}mix references are the recorded clips, so the other targets need it.
"""
from __future__ import annotations

import torch
from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr, singlesrc_neg_sisdr

from utils.config import Conf, ConfError

TARGETS = ("recorded", "denoised", "background")


def check_targets(conf: Conf) -> str:
    """The conf's `training.targets`, checked against what it needs (ConfError otherwise)."""
    targets = conf["training"]["targets"]
    if targets not in TARGETS:
        raise ConfError(f"--targets {targets!r}: expected one of {', '.join(TARGETS)}")
    if targets != "recorded" and not conf["training"]["dynamic_mixing"]:
        raise ConfError(f"--targets {targets} needs --dynamic_mixing true: the stored "
                        "BSD-{n}mix references are the recorded clips; dynamic mixing draws "
                        "the denoised ones from stage 1's clips/clean/")
    if targets != "recorded" and not conf["clips"]["denoise"]:
        raise ConfError(f"--targets {targets} needs --denoise true (stage 1's denoised clips)")
    return targets


def n_outputs(conf: Conf) -> int:
    """Number of the model's outputs: the birds (`model.n_src`), plus the background source
    with `training.targets: background`."""
    return conf["model"]["n_src"] + (1 if check_targets(conf) == "background" else 0)


class BirdsAndBackgroundLoss(torch.nn.Module):
    """Negative SI-SNR of a model whose last output is the background: permutation-invariant
    over the bird outputs (all but the last), the background scored against the last reference
    in place; the mean over all sources, as asteroid's PIT loss averages over its sources."""

    def __init__(self):
        super().__init__()
        self.birds = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")

    def forward(self, est: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if est.shape != targets.shape or est.shape[1] < 3:
            raise ValueError(f"expected estimates and references of the same shape (batch, "
                             f"birds + background, time) with at least 2 birds, got "
                             f"{tuple(est.shape)} and {tuple(targets.shape)}")
        n_birds = est.shape[1] - 1
        birds = self.birds(est[:, :n_birds], targets[:, :n_birds])
        background = singlesrc_neg_sisdr(est[:, -1], targets[:, -1]).mean()
        return (n_birds * birds + background) / (n_birds + 1)


def make_loss(conf: Conf) -> torch.nn.Module:
    """The training loss for the conf's targets."""
    if check_targets(conf) == "background":
        return BirdsAndBackgroundLoss()
    return PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
