"""Stage 3: train Conv-TasNet on BSD-{n_src}mix with PIT SI-SNR (asteroid System + Lightning).

Experiment directory layout (`exp/<tag>/`):
  conf.yml                resolved conf of the latest run
  checkpoints/            last.ckpt (every `checkpoint_every_n_steps` steps and at each epoch end)
                          and the `save_top_k` best checkpoints by val_loss
  best_k_models.json      {checkpoint path relative to exp_dir: val_loss}
  best_model.pth          best checkpoint's model, asteroid format (model.serialize() + infos)
  logs/csv, logs/tb       CSVLogger and TensorBoard logs, one version_N per (re)run

Rerunning with the same exp_dir resumes from checkpoints/last.ckpt. A rerun whose conf and data
dir match a finished run says so and returns at once. `max_minutes` is a budget on the TOTAL
training time of the experiment: Lightning's Timer stores the time elapsed in each checkpoint and a
resumed run continues from it, so a run killed and resumed does not get a fresh budget (the time
between the last checkpoint and the kill is not counted, as that work is redone). The budget
holds the validations too: training stops early enough for the closing one to end within it
(utils/training_callbacks.py: ValidationReserve). To train longer
after the budget ran out, rerun with a larger --max_minutes. As in Lightning, an epoch cut short
by the budget counts as an epoch: a resumed run goes on with the next one. A run killed in
mid-epoch resumes with the rest of that epoch, the same batches in the same windows
(local/bsd_dataset.py: ShuffledEpochs, ResumableLoader), unless it trains on several processes.
"""
from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint,
                                         TQDMProgressBar, Timer)
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader

from local.bsd_dataset import ResumableLoader
from local.data_layouts import DataLayoutError, open_split
from local.dynamic_mixing import DynamicMixDataset, FixedDraws
from local.targets import check_targets, make_loss
from local.mixtures import BALANCE, MixtureError
from model import make_model_and_optimizer
from system import BirdSystem, compile_for_training, resolve_precision, trains_on_cuda
from utils.allocator import keep_freed_memory
from utils.atomic import atomic_path, atomic_write_text
from utils.config import Conf, ConfError, parse_stage_args, read_conf, write_conf
from utils.stage_marker import clear_done, is_done, mark_done
from utils.training_callbacks import (LR_SCHEDULES, BudgetSchedule, ExpectedTime, LearningCurve,
                                      TrainingClock, ValidationReserve, find_callback)


def train(conf: Conf, data_dir: str | Path, exp_dir: str | Path,
          run_command: str | None = None) -> Path:
    """Train (or resume training) and return the path of best_model.pth. `run_command` (the
    command line that asked for this run) is added to run_command.txt once the run is
    accepted: not for a refused resume, nor for a finished run that has nothing to do."""
    started = time.time()
    exp_dir = Path(exp_dir)
    last_ckpt = (exp_dir / "checkpoints" / "last.ckpt").resolve()
    best_model_path = exp_dir / "best_model.pth"
    t = conf["training"]
    params = _training_params(conf, data_dir)

    if is_done(exp_dir, "train", params) and best_model_path.is_file():
        infos = torch.load(best_model_path, map_location="cpu", weights_only=True)["infos"]
        print(f"train: {exp_dir} already trained with this conf and data ({_summary(infos)}): "
              "nothing to do")
        return best_model_path
    if last_ckpt.is_file() and (exp_dir / "conf.yml").is_file():
        _check_resumable(read_conf(exp_dir / "conf.yml"), conf, exp_dir)
    if rank_zero_only.rank == 0:
        clear_done(exp_dir, "train")
        write_conf(conf, exp_dir / "conf.yml")
        if run_command is not None:
            append_run_command(exp_dir, run_command)

    if t["num_threads"] > 0:
        torch.set_num_threads(t["num_threads"])
    # Steps reuse freed activations instead of page-faulting fresh ones (utils/allocator.py).
    keep_freed_memory()
    pl.seed_everything(conf["common"]["seed"], workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 on Ampere and later
    precision = resolve_precision(t["precision"], t["accelerator"])
    # Lightning refuses to clip the gradients of a fused optimizer under fp16's GradScaler.
    model, optimizer = make_model_and_optimizer(conf, fused=not precision.startswith("16"))
    train_loader, val_loader = make_loaders(conf, data_dir)
    reserve = ValidationReserve(t["max_minutes"])
    scheduler, schedule_callbacks = make_lr_schedule(conf, optimizer, reserve)
    clock = TrainingClock()
    callbacks = [clock, LearningCurve(exp_dir, clock), reserve, *schedule_callbacks,
                 ExpectedTime(t["max_minutes"], CPU_PRESET_HINT)]
    trainer, best_ckpts, early_stop = _make_trainer(conf, exp_dir, len(train_loader), precision,
                                                    callbacks)
    if trainer.world_size > 1:   # known only now: Lightning's DistributedSampler shards the data
        train_loader, val_loader = make_loaders(conf, data_dir, resumable=False)
    new_step = compile_for_training(model, t["compile"], t["accelerator"], trainer.world_size, t["compile_mode"])
    system = BirdSystem(model=model, optimizer=optimizer,
                        loss_func=make_loss(conf),
                        train_loader=train_loader, val_loader=val_loader, scheduler=scheduler,
                        config=conf, max_bad_batches=t["max_bad_batches"], new_step=new_step)
    resume_from = str(last_ckpt) if last_ckpt.is_file() else None
    if resume_from and trainer.is_global_zero:
        print(f"train: resuming from {last_ckpt}")
    trainer.fit(system, ckpt_path=resume_from, weights_only=True)

    if trainer.is_global_zero:
        infos = _write_results(system, trainer, best_ckpts, early_stop, conf, data_dir, exp_dir)
        mark_done(exp_dir, "train", params)
        print(f"train: {exp_dir}: {_summary(infos)}, best checkpoint {infos['best_checkpoint']}, "
              f"{(time.time() - started) / 60:.1f} min this run -> {best_model_path}")
    return best_model_path


def main(argv: list[str] | None = None) -> Path:
    def add_arguments(parser):
        parser.add_argument("--data_dir", default="data", help="data directory (holds BSD-{n}mix/), "
                            "or a LibriMix or wsj0-2mix tree (local/data_layouts.py)")
        parser.add_argument("--exp_dir", required=True, help="experiment directory, e.g. exp/tag")
        parser.add_argument("--run_command", default=None,
                            help="command line recorded in <exp_dir>/run_command.txt when the "
                                 "run is accepted (default: this train.py command)")

    args, conf = parse_stage_args("Stage 3: train Conv-TasNet.", argv, add_arguments)
    command = args.run_command or shlex.join(
        ["train.py", *(sys.argv[1:] if argv is None else argv)])
    return train(conf, args.data_dir, args.exp_dir, run_command=command)


# ---- What train() calls ----

def append_run_command(exp_dir: Path, command: str) -> None:
    """Add `<date> <command>` to `<exp_dir>/run_command.txt` (rewritten atomically)."""
    path = exp_dir / "run_command.txt"
    before = path.read_text() if path.is_file() else ""
    atomic_write_text(path, before + f"{time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")


# Keys that may differ between a run and its resumption: how long and on what hardware to train.
# Any other difference means a different experiment and is refused.
RESUMABLE_KEYS = {"implementation", "epochs", "max_minutes", "early_stop", "patience", "num_workers", "num_threads",
                  "accelerator", "devices", "num_nodes", "strategy", "precision", "save_top_k",
                  "checkpoint_every_n_steps", "max_bad_batches", "compile", "compile_mode"}
# Of those, the ones that say where and how a run trains, not what it learns or for how long: a
# finished run stays finished when only they change (another machine, more workers, compiled).
PLATFORM_KEYS = RESUMABLE_KEYS - {"epochs", "max_minutes", "early_stop", "patience"}
# The conf sections this stage reads (besides common.seed and clips.sample_rate).
TRAINING_SECTIONS = ("model", "training", "optim")
PROGRESS_REFRESH_STEPS_GPU = 20
# Printed when a CPU run would take hours (utils/training_callbacks.ExpectedTime).
CPU_PRESET_HINT = ("Without a GPU, conf_cpu.yml is the 30-minute preset: ./run.sh --stage 3 "
                   "--conf conf_cpu.yml (stop this run with Ctrl-C; rerunning it resumes)")


class SaveLastOnTrainEnd(Callback):
    """Write last.ckpt when fit ends (also after a time-budget stop in mid-epoch), so a rerun
    with a larger budget resumes from where this one stopped."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(str(self.path), weights_only=False)


def _training_settings(conf: Conf) -> dict[str, Any]:
    """Every conf value this stage reads, flat."""
    settings = {"seed": conf["common"]["seed"], "sample_rate": conf["clips"]["sample_rate"]}
    for section in TRAINING_SECTIONS:
        settings.update(conf[section])
    return settings


def _training_params(conf: Conf, data_dir: str | Path) -> dict[str, Any]:
    """What a finished run is identified by (its done-marker): its data and settings, less the
    platform ones."""
    settings = {k: v for k, v in _training_settings(conf).items() if k not in PLATFORM_KEYS}
    return {"data_dir": str(Path(data_dir).resolve()), **settings}


def _check_resumable(old_conf: Conf, conf: Conf, exp_dir: Path) -> None:
    """Refuse to resume an experiment under settings that would make it a different one."""
    old, new = _training_settings(old_conf), _training_settings(conf)
    changed = [f"{key}: {old[key]!r} -> {new.get(key)!r}" for key in old
               if key not in RESUMABLE_KEYS and old[key] != new.get(key)]
    if changed:
        raise ConfError(f"{exp_dir} holds a run with other settings ({'; '.join(changed)}); "
                        "use another --exp_dir/--tag, or delete it to start over")


def _loader_settings(conf: Conf) -> dict[str, Any]:
    t = conf["training"]
    return dict(batch_size=t["batch_size"], num_workers=t["num_workers"],
                pin_memory=torch.cuda.is_available(), persistent_workers=t["num_workers"] > 0)


def _open_checked(conf: Conf, data_dir: str | Path, split: str, **dataset_kwargs: Any):
    n_src = conf["model"]["n_src"]
    dataset = open_split(data_dir, n_src, split, conf["clips"]["sample_rate"],
                         segment_s=conf["training"]["segment_s"],
                         min_source_share=conf["training"]["min_source_share"], **dataset_kwargs)
    if dataset.n_src != n_src:
        raise ConfError(f"{dataset.csv_path} has {dataset.n_src} sources, --n_src is {n_src}")
    return dataset


def make_train_loader(conf: Conf, data_dir: str | Path, resumable: bool = True) -> DataLoader:
    """The training loader.  With `resumable`, the order is `ShuffledEpochs` through a
    `ResumableLoader`: a run resumed in mid-epoch goes on with that epoch's remaining batches.
    Without it (several processes: Lightning shards the data with its DistributedSampler), a
    plain shuffle."""
    train_set = _open_checked(conf, data_dir, "tr", return_id=True)
    if conf["training"]["speed_perturb"] and not conf["training"]["dynamic_mixing"]:
        raise ConfError("--speed_perturb needs --dynamic_mixing true: the stored tr mixtures "
                        "are fixed; dynamic mixing draws (and resamples) the clips anew")
    if conf["training"]["dm_balance"] not in BALANCE:
        raise ConfError(f"--dm_balance {conf['training']['dm_balance']!r}: expected one of "
                        f"{', '.join(BALANCE)}")
    if conf["training"]["dm_balance"] != "clip" and not conf["training"]["dynamic_mixing"]:
        raise ConfError("--dm_balance needs --dynamic_mixing true: the stored tr mixtures are "
                        "fixed; dynamic mixing draws the clips anew")
    if conf["training"]["dynamic_mixing"]:
        # As many mixtures a pass as BSD-{n}mix/tr holds, so epochs (validation, checkpoints,
        # the schedule) come at the same pace; drawn anew from the tr clips each epoch.
        t = conf["training"]
        train_set = DynamicMixDataset(data_dir, conf["model"]["n_src"], conf, t["segment_s"],
                                      n_items=len(train_set), return_id=True,
                                      min_source_share=t["min_source_share"],
                                      targets=check_targets(conf),
                                      speed_perturb=t["speed_perturb"],
                                      balance=t["dm_balance"])
    batch_size = conf["training"]["batch_size"]
    if len(train_set) < batch_size:
        raise ValueError(f"{train_set.csv_path}: {len(train_set)} mixtures, fewer than one batch "
                         f"(--batch_size {batch_size})")
    settings = _loader_settings(conf)
    if resumable:
        return ResumableLoader(train_set, seed=conf["common"]["seed"], **settings)
    return DataLoader(train_set, shuffle=True, drop_last=True, **settings)


def make_loaders(conf: Conf, data_dir: str | Path, resumable: bool = True
                  ) -> tuple[DataLoader, DataLoader]:
    """(training, validation) loaders (see make_train_loader)."""
    train_loader = make_train_loader(conf, data_dir, resumable)
    # Fixed windows, so that val_loss moves only with the model.
    val_set = _open_checked(conf, data_dir, "cv", random_segments=False)
    if check_targets(conf) != "recorded":
        # The stored references are the recorded clips: fixed draws from the cv clips instead.
        t = conf["training"]
        val_set = FixedDraws(DynamicMixDataset(data_dir, conf["model"]["n_src"], conf,
                                               t["segment_s"], n_items=len(val_set), split="cv",
                                               min_source_share=t["min_source_share"],
                                               targets=t["targets"]), conf["common"]["seed"])
    val_loader = DataLoader(val_set, shuffle=False, drop_last=False, **_loader_settings(conf))
    return train_loader, val_loader


def _make_trainer(conf: Conf, exp_dir: Path, n_train_batches: int, precision: str,
                  extra_callbacks: Sequence[Callback] = ()
                  ) -> tuple[pl.Trainer, ModelCheckpoint, EarlyStopping | None]:
    """Lightning Trainer with the recipe's checkpoints, early stopping, time budget and loggers."""
    t, ckpt_dir = conf["training"], (exp_dir / "checkpoints").resolve()
    # Two writers of last.ckpt: the top-k callback after each validation, the step callback
    # every few steps (a killed run loses at most that many). No version counter, so both
    # overwrite the one last.ckpt instead of creating last-v1.ckpt.
    best_ckpts = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}-{step}", monitor="val_loss",
                                 mode="min", save_top_k=t["save_top_k"], save_last=True,
                                 enable_version_counter=False)
    step_ckpts = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True,
                                 every_n_train_steps=t["checkpoint_every_n_steps"],
                                 enable_version_counter=False)
    # The progress bar reads the loss back from the GPU at each refresh: not every step there.
    refresh = PROGRESS_REFRESH_STEPS_GPU if trains_on_cuda(t["accelerator"]) else 1
    callbacks: list[Callback] = [best_ckpts, step_ckpts, SaveLastOnTrainEnd(ckpt_dir / "last.ckpt"),
                                 LearningRateMonitor(logging_interval="epoch"),
                                 TQDMProgressBar(refresh_rate=refresh), *extra_callbacks]
    early_stop = None
    if t["early_stop"]:
        early_stop = EarlyStopping(monitor="val_loss", mode="min", patience=t["patience"], verbose=True)
        callbacks.append(early_stop)
    loggers: list[Any] = [CSVLogger(exp_dir / "logs", name="csv")]
    if importlib.util.find_spec("tensorboard") is not None:  # TensorBoardLogger needs it
        loggers.append(TensorBoardLogger(exp_dir / "logs", name="tb", default_hp_metric=False))
    trainer = pl.Trainer(
        max_epochs=t["epochs"],
        max_time=timedelta(minutes=t["max_minutes"]) if t["max_minutes"] > 0 else None,
        accelerator=t["accelerator"], devices=t["devices"], num_nodes=t["num_nodes"],
        strategy=t["strategy"],
        precision=precision, gradient_clip_val=conf["optim"]["gradient_clip"],
        callbacks=callbacks, logger=loggers, default_root_dir=exp_dir,
        log_every_n_steps=max(1, min(50, n_train_batches)),
    )
    return trainer, best_ckpts, early_stop


def make_lr_schedule(conf: Conf, optimizer: torch.optim.Optimizer,
                     reserve: ValidationReserve | None = None
                     ) -> tuple[ReduceLROnPlateau | None, list[Callback]]:
    """The conf's learning-rate schedule: (asteroid System's epoch scheduler, per-step
    callbacks). "plateau" (the thesis'): halved after `lr_halve_patience` epochs without a
    better val_loss. "cosine": warm-up, then a cosine down to `lr_final_fraction` of `lr` at
    the end of the budget (epochs or max_minutes, whichever ends first; `reserve`: the time kept
    for the closing validation). "constant": warm-up, then `lr`."""
    optim, t = conf["optim"], conf["training"]
    if optim["lr_schedule"] not in LR_SCHEDULES:
        raise ConfError(f"--lr_schedule {optim['lr_schedule']!r}: expected one of "
                        f"{', '.join(LR_SCHEDULES)}")
    if optim["warmup_steps"] < 0 or not 0 <= optim["lr_final_fraction"] <= 1:
        raise ConfError("--warmup_steps must be >= 0 and --lr_final_fraction in [0, 1]")
    if optim["lr_schedule"] == "plateau":
        plateau = ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                    patience=optim["lr_halve_patience"])
        return plateau, []
    return None, [BudgetSchedule(optim["lr_schedule"], optim["lr"], optim["warmup_steps"],
                                 optim["lr_final_fraction"], t["max_minutes"], reserve)]


def _stop_reason(trainer: pl.Trainer, early_stop: EarlyStopping | None) -> str:
    timer, reserve = find_callback(trainer, Timer), find_callback(trainer, ValidationReserve)
    if early_stop is not None and early_stop.stopped_epoch > 0:
        return "early stop"
    if reserve is not None and reserve.stopped:
        return "time budget"
    if timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        return "time budget"
    return "max epochs"


def _write_results(system: BirdSystem, trainer: pl.Trainer, best_ckpts: ModelCheckpoint,
                   early_stop: EarlyStopping | None, conf: Conf, data_dir: str | Path,
                   exp_dir: Path) -> dict[str, Any]:
    """best_k_models.json, and best_model.pth: the best checkpoint's model in asteroid's format
    with the training infos. Returns the infos."""
    root = exp_dir.resolve()
    best_k = {str(Path(p).relative_to(root)): float(v) for p, v in best_ckpts.best_k_models.items()}
    atomic_write_text(exp_dir / "best_k_models.json", json.dumps(best_k, indent=1) + "\n")

    model = system.model.cpu()
    if best_ckpts.best_model_path:
        state = torch.load(best_ckpts.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    else:
        warnings.warn("no validation epoch finished: best_model.pth holds the last weights")
    best_loss = None if best_ckpts.best_model_score is None else float(best_ckpts.best_model_score)
    infos = dict(training_config=conf, data_dir=str(data_dir),
                 stop_reason=_stop_reason(trainer, early_stop),
                 epochs_trained=int(trainer.current_epoch), global_step=int(trainer.global_step),
                 best_checkpoint=(str(Path(best_ckpts.best_model_path).relative_to(root))
                                  if best_ckpts.best_model_path else None),
                 best_val_loss=best_loss, best_val_sisnr_db=None if best_loss is None else -best_loss,
                 bad_batches_skipped=system.bad_batches_total)
    package = model.serialize()
    package["infos"].update(infos)
    with atomic_path(exp_dir / "best_model.pth") as tmp:
        torch.save(package, tmp)
    return infos


def _summary(infos: dict[str, Any]) -> str:
    sisnr = infos.get("best_val_sisnr_db")
    return (f"{infos.get('epochs_trained')} epochs ({infos.get('stop_reason')}), best val SI-SNR "
            f"{'n/a' if sisnr is None else f'{sisnr:.2f} dB'}")


if __name__ == "__main__":
    try:
        main()
    except (ConfError, FileNotFoundError, DataLayoutError, MixtureError) as err:
        sys.exit(f"train.py: {err}")
