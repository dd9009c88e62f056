"""The recipe's Lightning System and how training is set up for its hardware.

`BirdSystem` is asteroid's `System` that skips a batch whose loss is not finite instead of
training on it (and stops after `max_bad_batches` in a row). `resolve_precision` and
`compile_for_training` turn the conf's `precision` and `compile` settings ("auto" included) into
what Lightning and torch.compile are given. train.py builds the rest: data, model, Trainer and
best_model.pth.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from asteroid.engine import System
from asteroid.utils import flatten_dict

from model import check_compile_mode, compile_in_place
from utils.config import auto_setting

# Training steps between two checks of the losses for NaN/inf when the optimizer skips bad
# steps on the device itself (BirdSystem): one host sync per this many steps, not per step.
BAD_BATCH_CHECK_EVERY = 50


class BadBatchWarning(UserWarning):
    """A training batch gave a non-finite loss and was skipped."""


class BirdSystem(System):
    """asteroid's System with mixture ids in training batches, non-finite losses skipped instead
    of trained on, the loss in the progress bar, and the validation loss synced across GPUs.

    With a fused optimizer (the recipe's Adam, AdamW, SGD; model.py) a step whose gradients are
    not finite is skipped on the device: the optimizer reads a `found_inf` flag set from the
    gradient norm (configure_gradient_clipping), so no step waits for the GPU to hand the loss
    to the host. The losses are read back every BAD_BATCH_CHECK_EVERY steps, at each epoch
    end and when training ends, to report skipped batches and stop after `max_bad_batches` in a row. Other
    optimizers (and 16-mixed, whose GradScaler owns `found_inf`) check each loss on the host
    and skip backward and step."""

    def __init__(self, *args: Any, max_bad_batches: int,
                 new_step: Optional[Callable[[], None]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Called before each forward: a compiled model's mark of a new step (model.compile_in_place).
        self.new_step = new_step or (lambda: None)
        self.max_bad_batches = max_bad_batches
        self.bad_batches_in_a_row = 0
        self.bad_batches_total = 0
        # (loss on the device, mixture ids, epoch, batch index) of steps not yet checked.
        self._unchecked: list[tuple[torch.Tensor, list[str], int, int]] = []

    @staticmethod
    def config_to_hparams(dic: dict[str, Any]) -> dict[str, Any]:
        # asteroid turns lists into tensors, which fails on lists of strings (e.g. groups: [birds]);
        # logged hparams only need to be readable, so lists become their text.
        return {k: str(v) if v is None or isinstance(v, (list, tuple)) else v
                for k, v in flatten_dict(dic).items()}

    def _skips_on_device(self) -> bool:
        # Under fp16 ("16-mixed", whose GradScaler sets `found_inf` itself) train() builds a
        # non-fused optimizer.
        return bool(self.optimizer.defaults.get("fused"))

    def training_step(self, batch, batch_idx):
        mixture, sources, mixture_ids = batch
        self.new_step()
        # float32 loss also under bf16 autocast (the decoder's output is bf16 there).
        loss = self.loss_func(self(mixture).float(), sources)
        if self._skips_on_device():
            self._unchecked.append((loss.detach(), list(mixture_ids), self.current_epoch, batch_idx))
            self.log("loss", loss, prog_bar=True, logger=True)
            return loss
        # Every process must take the same decision, or DDP's gradient all-reduce would hang.
        bad = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        self._note_batch(not bad, loss.item() if bad else 0.0, list(mixture_ids),
                         self.current_epoch, batch_idx)
        if bad:
            return None  # Lightning skips backward and the optimizer step
        self.log("loss", loss, prog_bar=True, logger=True)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        if not self._skips_on_device():
            return super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                       gradient_clip_algorithm)
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            total_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            total_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.parameters() if p.grad is not None])
        # NaN/inf anywhere makes the norm non-finite; the fused step then leaves the weights,
        # its moments and its step count as they were. (DDP: gradients are all-reduced, so
        # every process sees the same norm.)
        getattr(optimizer, "optimizer", optimizer).found_inf = (~torch.isfinite(total_norm)).float()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if len(self._unchecked) >= BAD_BATCH_CHECK_EVERY:
            self._check_losses()

    def on_train_epoch_end(self) -> None:
        self._check_losses()
        super().on_train_epoch_end()

    def on_train_end(self) -> None:
        self._check_losses()   # e.g. after a time-budget stop in mid-epoch
        super().on_train_end()

    def _check_losses(self) -> None:
        """Read the unchecked losses back (one sync) and account for the non-finite ones."""
        if not self._unchecked:
            return
        losses = torch.stack([loss for loss, *_ in self._unchecked]).float()
        # A batch counts as bad on every process when it is bad on one (same decisions).
        bad = self.trainer.strategy.reduce((~torch.isfinite(losses)).float(), reduce_op="sum")
        for (loss, ids, epoch, batch_idx), value, is_bad in zip(
                self._unchecked, losses.tolist(), (bad > 0).tolist()):
            self._note_batch(not is_bad, value, ids, epoch, batch_idx)
        self._unchecked.clear()

    def _note_batch(self, finite: bool, loss_value: float, mixture_ids: list[str], epoch: int,
                    batch_idx: int) -> None:
        """Count a batch's outcome; warn for a skipped one; stop after too many in a row."""
        if finite:
            self.bad_batches_in_a_row = 0
            return
        self.bad_batches_in_a_row += 1
        self.bad_batches_total += 1
        warnings.warn(f"non-finite training loss ({loss_value}) at epoch {epoch}, "
                      f"batch {batch_idx} (mixtures {', '.join(mixture_ids)}): batch skipped",
                      BadBatchWarning, stacklevel=1)
        if self.bad_batches_in_a_row >= self.max_bad_batches:
            raise RuntimeError(f"{self.bad_batches_in_a_row} training batches in a row had a "
                               "non-finite loss: the data contain NaN/inf or training diverged "
                               "(try a lower --lr); see the warnings above for mixture ids")

    def validation_step(self, batch, batch_idx):
        mixture, sources = batch
        self.new_step()
        loss = self.loss_func(self(mixture).float(), sources)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)


def trains_on_cuda(accelerator: str) -> bool:
    """Whether Lightning's `accelerator` setting trains on a CUDA GPU here."""
    return torch.cuda.is_available() and str(accelerator).lower() in ("auto", "gpu", "cuda")


def resolve_precision(precision: str, accelerator: str) -> str:
    """The conf's precision for Lightning: "auto" is bf16-mixed on a CUDA GPU that has bf16 (see
    tools/benchmark_gpu.py), else 32-true (on CPU, bf16 autocast made training steps slower)."""
    if precision != "auto":
        return precision
    cuda_bf16 = trains_on_cuda(accelerator) and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if cuda_bf16 else "32-true"


def compile_for_training(model: torch.nn.Module, setting: Any, accelerator: str, world_size: int,
                         mode: str) -> Optional[Callable[[], None]]:
    """torch.compile the model in place (model.compile_in_place) as the conf's `compile` says:
    "auto" on one CUDA GPU, "true" on CUDA, never on CPU. Returns the per-step hook (see
    BirdSystem), or None where the model stays eager."""
    setting = auto_setting("--compile", setting)
    check_compile_mode(mode)
    on_cuda = trains_on_cuda(accelerator)
    if setting == "true" and not on_cuda:
        warnings.warn("--compile true: ignored, training is not on a CUDA GPU (on CPU the model "
                      "runs its own C kernels, which torch.compile cannot trace)")
    if setting == "false" or not on_cuda or (setting == "auto" and world_size > 1):
        return None
    if setting == "auto":
        # A GPU that torch's compiler cannot build for (Triton needs compute capability 7.0 or
        # later) trains eagerly after dynamo's warning instead of failing the run.
        import torch._dynamo   # torch imports it lazily

        torch._dynamo.config.suppress_errors = True
    return compile_in_place(model, mode)
