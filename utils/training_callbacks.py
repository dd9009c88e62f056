"""Lightning callbacks of the recipe's training loop that are not asteroid's: the learning
curve written to the experiment, the learning-rate schedules other than plateau halving, and
the time budget's reserve for the validation that closes a run.

They keep their state in Lightning's checkpoints (`state_dict`), so a resumed run continues
the same curve and the same schedule."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, Timer

from utils.atomic import atomic_path

CURVE_COLUMNS = ["epoch", "step", "train_minutes", "val_si_snr_db", "lr"]
LR_SCHEDULES = ("plateau", "cosine", "constant")
CallbackT = TypeVar("CallbackT", bound=Callback)


def find_callback(trainer: pl.Trainer, kind: type[CallbackT]) -> CallbackT | None:
    """The trainer's first callback of this kind (Lightning's Timer, ...), or None."""
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


class TrainingClock(Callback):
    """Minutes spent in training steps and validation by this experiment, resumes included
    (the time between the last checkpoint and a kill is not counted: that work is redone)."""

    def __init__(self) -> None:
        self.minutes_before = 0.0        # restored from the checkpoint
        self._started: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()

    def minutes(self) -> float:
        running = 0.0 if self._started is None else (time.monotonic() - self._started) / 60
        return self.minutes_before + running

    def state_dict(self) -> dict[str, Any]:
        return {"minutes": self.minutes()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.minutes_before = float(state["minutes"])


class LearningCurve(Callback):
    """After each validation: epoch, step, training minutes, validation SI-SNR (dB) and the
    learning rate, appended to `<exp_dir>/learning_curve.csv` and drawn in
    `learning_curve.png` (against steps and against minutes)."""

    def __init__(self, exp_dir: str | Path, clock: TrainingClock):
        self.csv_path = Path(exp_dir) / "learning_curve.csv"
        self.png_path = Path(exp_dir) / "learning_curve.png"
        self.clock = clock
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        val_loss = trainer.callback_metrics.get("val_loss")
        if val_loss is None:
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        self.rows.append({"epoch": int(trainer.current_epoch), "step": int(trainer.global_step),
                          "train_minutes": round(self.clock.minutes(), 3),
                          "val_si_snr_db": round(-float(val_loss), 4), "lr": float(lr)})
        self.write()

    def write(self) -> None:
        frame = pd.DataFrame(self.rows, columns=CURVE_COLUMNS)
        with atomic_path(self.csv_path) as tmp:
            frame.to_csv(tmp, index=False)
        save_curve_figure(self.png_path, {"": frame})

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])


def save_curve_figure(path: str | Path, curves: dict[str, pd.DataFrame]) -> None:
    """PNG of validation SI-SNR against steps (left) and training minutes (right), one line
    per curve (label -> learning_curve.csv table)."""
    from matplotlib.figure import Figure  # Agg canvas; no pyplot state, no display needed

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    by_step, by_minute = fig.subplots(1, 2, sharey=True)
    for label, frame in curves.items():
        by_step.plot(frame["step"], frame["val_si_snr_db"], marker=".", label=label or None)
        by_minute.plot(frame["train_minutes"], frame["val_si_snr_db"], marker=".",
                       label=label or None)
    by_step.set_xlabel("training step")
    by_minute.set_xlabel("training minutes")
    by_step.set_ylabel("validation SI-SNR (dB)")
    for ax in (by_step, by_minute):
        ax.grid(alpha=0.3)
    if any(curves):
        by_minute.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def schedule_factor(schedule: str, progress: float, step: int, warmup_steps: int,
                    final_fraction: float) -> float:
    """Multiplier of the base learning rate: a linear warm-up over `warmup_steps`, then
    constant or a cosine from 1 down to `final_fraction` at `progress` 1 (the end of the
    budget)."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "cosine":
        p = min(max(progress, 0.0), 1.0)
        return warmup * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * p)))
    return warmup


class ValidationReserve(Callback):
    """With a time budget (`max_minutes`), stop training early enough that the validation which
    closes the run ends within the budget.

    Lightning's Timer looks at the clock only between training steps, and a run it stops in
    mid-epoch still validates that epoch: the run then ends one validation pass after its
    budget, which for a large model on a CPU can take longer than the budget itself. This
    callback keeps the time of the longest validation pass so far (before the first, the
    sanity check's pace times the validation batches) and stops training once the time used
    plus that pass reaches the budget. A pass longer than half the budget is not reserved
    (training would hardly start): it is said once, and the run ends that long after its
    budget."""

    def __init__(self, max_minutes: float):
        self.budget_s = 60.0 * max_minutes
        self.pass_s = 0.0                 # longest validation pass (restored on resume)
        self.measured = False             # pass_s is a whole pass, not the sanity estimate
        self.stopped = False              # this callback ended training
        self._started: float | None = None
        self._batches = 0
        self._warned = False

    def reserve_s(self) -> float:
        """Seconds of the budget kept for the closing validation."""
        return self.pass_s if self.pass_s < self.budget_s / 2 else 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started, self._batches = time.monotonic(), 0

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._batches += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started is None or self._batches == 0:    # no pass ran (no cv batches)
            return
        took = time.monotonic() - self._started
        if trainer.sanity_checking:       # a few batches: scale up to a whole pass
            if not self.measured:
                self.pass_s = took / self._batches * sum(trainer.num_val_batches)
            return
        # The first whole pass replaces the sanity check's estimate.
        self.pass_s = max(self.pass_s, took) if self.measured else took
        self.measured = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.budget_s <= 0:
            return
        too_long = self.pass_s > 0 and self.reserve_s() == 0.0
        if too_long and not self._warned and trainer.is_global_zero:
            self._warned = True
            print(f"train: one validation pass takes about {self.pass_s / 60:.1f} min, over half "
                  f"the {self.budget_s / 60:g}-minute budget; the run ends about that long after "
                  f"it (a larger --max_minutes leaves room for it)", flush=True)
        timer = find_callback(trainer, Timer)
        if timer is None or self.stopped:
            return
        reserve = self.reserve_s()
        due = reserve > 0 and timer.time_elapsed("train") + reserve >= self.budget_s
        # Rank 0 decides for all processes, as Lightning's Timer does.
        if trainer.strategy.broadcast(due):
            trainer.should_stop = self.stopped = True
            if trainer.is_global_zero:
                print(f"train: stopping {reserve / 60:.1f} min before the "
                      f"{self.budget_s / 60:g}-minute budget, the time of the closing "
                      f"validation", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"pass_s": self.pass_s, "measured": self.measured}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pass_s, self.measured = float(state["pass_s"]), bool(state["measured"])


class BudgetSchedule(Callback):
    """Warm-up and cosine decay over the training budget, set before every step.

    Progress is the larger of steps done / (epochs x steps per epoch) and, with a time budget,
    minutes used / `max_minutes` (Lightning's Timer, restored on resume), less the time that
    `reserve` keeps for the closing validation: the decay ends when the budget that ends first
    does, on any machine."""

    def __init__(self, schedule: str, base_lr: float, warmup_steps: int, final_fraction: float,
                 max_minutes: float, reserve: ValidationReserve | None = None):
        if schedule not in LR_SCHEDULES or schedule == "plateau":
            raise ValueError(f"BudgetSchedule: schedule {schedule!r} is not a per-step one")
        self.schedule, self.base_lr = schedule, base_lr
        self.warmup_steps, self.final_fraction = warmup_steps, final_fraction
        self.max_minutes, self.reserve = max_minutes, reserve

    def progress(self, trainer: pl.Trainer) -> float:
        steps = trainer.max_epochs * trainer.num_training_batches
        progress = trainer.global_step / steps if steps and math.isfinite(steps) else 0.0
        timer = find_callback(trainer, Timer)
        if timer is not None and self.max_minutes > 0:
            reserve_s = self.reserve.reserve_s() if self.reserve is not None else 0.0
            train_s = 60 * self.max_minutes - reserve_s
            progress = max(progress, timer.time_elapsed("train") / train_s)
        return progress

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        factor = schedule_factor(self.schedule, self.progress(trainer), trainer.global_step,
                                 self.warmup_steps, self.final_fraction)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.base_lr * factor


class ExpectedTime(Callback):
    """After the first `after_steps` steps of a run, print what the rest of its epochs will
    take at the measured pace (validation not counted), and, where that is over an hour on a
    CPU with no shorter time budget, `cpu_hint` (how to choose the 30-minute CPU preset)."""

    def __init__(self, max_minutes: float, cpu_hint: str, after_steps: int = 20):
        self.max_minutes, self.cpu_hint, self.after_steps = max_minutes, cpu_hint, after_steps
        self._first: tuple[float, int] | None = None   # (time, step) after the warm-up step
        self._done = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._done or not trainer.is_global_zero:
            return
        if self._first is None:
            self._first = (time.monotonic(), trainer.global_step)
            return
        started, first_step = self._first
        steps = trainer.global_step - first_step
        if steps < self.after_steps:
            return
        self._done = True
        step_s = (time.monotonic() - started) / steps
        remaining = trainer.max_epochs * trainer.num_training_batches - trainer.global_step
        hours = remaining * step_s / 3600
        message = (f"train: {step_s:.2f} s per step here: the remaining {remaining} steps of "
                   f"{trainer.max_epochs} epochs take about {hours:.1f} h, validation not counted")
        if self.max_minutes > 0:
            message += f"; the time budget stops training after {self.max_minutes:g} min in all"
        budget_h = self.max_minutes / 60 if self.max_minutes > 0 else float("inf")
        if pl_module.device.type == "cpu" and min(hours, budget_h) > 1:
            message += f". {self.cpu_hint}"
        print(message, flush=True)
