"""Stage 3 on a tiny BSD-2mix of synthetic 1-second mixtures: exp layout, resume, done-skip,
time budget, bad batches, and the CPU preset."""
from __future__ import annotations

import json
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from asteroid.models import ConvTasNet
from pytorch_lightning.callbacks import Timer

import system as system_module
import train as train_module
from conftest import TINY_MODEL, needs_cxx
from eval import main as eval_main
from model import load_best_model, make_model
from system import BadBatchWarning, BirdSystem, resolve_precision
from train import main, train
from utils.config import ConfError, read_conf, write_conf
from utils.training_callbacks import BudgetSchedule, ValidationReserve

SAMPLE_RATE = 8000
N_TRAIN, BATCH = 4, 2  # 2 training steps per epoch


def write_tiny_bsd(data_dir: Path, n_train: int = N_TRAIN, nan_mixtures: tuple[str, ...] = ()) -> None:
    """BSD-2mix/{tr,cv,tt} with the stage-2 csv columns: two chirped, gated tones per mixture."""
    root = data_dir / "BSD-2mix"
    rng = np.random.default_rng(0)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for split, n in (("tr", n_train), ("cv", 2), ("tt", 1)):
        rows = []
        for i in range(n):
            mixture_id = f"{split}{i:02d}"
            sources = [(0.3 * (np.sin(2 * np.pi * rng.uniform(2, 6) * t) > 0)
                        * np.sin(2 * np.pi * (rng.uniform(500, 3500) + 300 * t) * t)).astype(np.float32)
                       for _ in range(2)]
            mixture = np.sum(sources, axis=0).astype(np.float32)
            if mixture_id in nan_mixtures:
                mixture[100:200] = np.nan
            row = {"mixture_id": mixture_id, "mixture_path": f"{split}/mix/{mixture_id}.wav"}
            for folder, audio in [("mix", mixture), ("s1", sources[0]), ("s2", sources[1])]:
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                sf.write(root / split / folder / f"{mixture_id}.wav", audio, SAMPLE_RATE, subtype="FLOAT")
            for k in (1, 2):
                row[f"source_{k}_path"] = f"{split}/s{k}/{mixture_id}.wav"
                row[f"source_{k}_clip_id"] = f"XC{k}_{i}"
                row[f"source_{k}_recording_id"] = k
                row[f"source_{k}_species"] = f"Genus species{k}"
                row[f"source_{k}_gain"] = 1.0
                row[f"source_{k}_snr_db"] = 0.0
                row[f"source_{k}_offset"] = 0
            row["length"] = len(mixture)
            rows.append(row)
        pd.DataFrame(rows).to_csv(root / f"{split}.csv", index=False)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("data")
    write_tiny_bsd(data_dir)
    return data_dir


@pytest.fixture
def tiny_conf(repo_root):
    conf = read_conf(repo_root / "conf.yml")
    conf["model"].update(TINY_MODEL)
    conf["training"].update(epochs=1, batch_size=BATCH, num_workers=0, segment_s=1.0, save_top_k=2,
                            checkpoint_every_n_steps=1, max_minutes=0, accelerator="cpu", devices=1)
    return conf


def last_checkpoint(exp_dir: Path) -> dict:
    return torch.load(exp_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def best_model_infos(exp_dir: Path) -> dict:
    return torch.load(exp_dir / "best_model.pth", map_location="cpu", weights_only=True)["infos"]


def test_train_writes_exp_layout_resumes_and_skips_when_done(tiny_conf, tiny_data, tmp_path, capsys):
    exp_dir = tmp_path / "exp" / "tiny"
    best = train(tiny_conf, tiny_data, exp_dir)

    assert best == exp_dir / "best_model.pth" and best.is_file()
    assert read_conf(exp_dir / "conf.yml") == tiny_conf
    assert last_checkpoint(exp_dir)["global_step"] == N_TRAIN // BATCH
    best_k = json.loads((exp_dir / "best_k_models.json").read_text())
    assert best_k and all((exp_dir / path).is_file() and np.isfinite(v) for path, v in best_k.items())
    assert list((exp_dir / "logs" / "csv").glob("version_0/metrics.csv"))
    infos = best_model_infos(exp_dir)
    assert infos["training_config"] == tiny_conf and infos["epochs_trained"] == 1
    assert infos["best_checkpoint"] in best_k
    assert infos["best_val_sisnr_db"] == pytest.approx(-min(best_k.values()))
    # The best checkpoint's weights, in asteroid's format: both loaders agree.
    mixture = torch.randn(1, SAMPLE_RATE)
    with torch.no_grad():
        # asteroid's own loader reads it too (its forward differs from the fast one by rounding).
        assert torch.allclose(load_best_model(exp_dir)(mixture),
                              ConvTasNet.from_pretrained(str(best)).eval()(mixture),
                              rtol=1e-4, atol=1e-6)
    assert "train:" in capsys.readouterr().out  # the one-line summary

    # More epochs through the command line: resumes from last.ckpt instead of starting over.
    conf_path = tmp_path / "tiny.yml"
    write_conf(tiny_conf, conf_path)
    argv = ["--conf", str(conf_path), "--data_dir", str(tiny_data), "--exp_dir", str(exp_dir)]
    main(argv + ["--epochs", "2"])
    assert "resuming from" in capsys.readouterr().out
    assert last_checkpoint(exp_dir)["global_step"] == 2 * N_TRAIN // BATCH
    resumed = pd.read_csv(exp_dir / "logs" / "csv" / "version_1" / "metrics.csv")
    assert set(resumed["epoch"].dropna().astype(int)) == {1}  # only the new epoch was trained
    assert resumed["step"].min() >= N_TRAIN // BATCH - 1
    assert best_model_infos(exp_dir)["epochs_trained"] == 2

    # Same conf again: finished, nothing touched; also where only platform settings differ.
    mtime = (exp_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    main(argv + ["--epochs", "2"])
    assert "already trained" in capsys.readouterr().out
    main(argv + ["--epochs", "2", "--num_workers", "1", "--compile", "false",
                 "--checkpoint_every_n_steps", "5"])
    assert "already trained" in capsys.readouterr().out
    assert (exp_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == mtime

    # Settings that make it another experiment are refused rather than mixed in.
    with pytest.raises(ConfError, match="lr: 0.001 -> 0.0005"):
        train({**tiny_conf, "optim": {**tiny_conf["optim"], "lr": 5e-4}}, tiny_data, exp_dir)


def test_time_budget_stops_cleanly_and_carries_over(tiny_conf, tiny_data, tmp_path, capsys):
    exp_dir = tmp_path / "exp"
    tiny_conf["training"].update(epochs=3, max_minutes=1e-6)  # stops after the first step
    train(tiny_conf, tiny_data, exp_dir)
    infos = best_model_infos(exp_dir)
    assert infos["stop_reason"] == "time budget" and infos["global_step"] == 1
    elapsed = last_checkpoint(exp_dir)["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert elapsed > 0

    train(tiny_conf, tiny_data, exp_dir)
    assert "already trained" in capsys.readouterr().out

    # A larger budget resumes with the time already spent, not from zero.
    tiny_conf["training"]["max_minutes"] = 60
    train(tiny_conf, tiny_data, exp_dir)
    assert best_model_infos(exp_dir)["stop_reason"] == "max epochs"
    assert last_checkpoint(exp_dir)["callbacks"]["Timer"]["time_elapsed"]["train"] > elapsed


def test_time_budget_keeps_room_for_the_closing_validation(tiny_conf, tiny_data, tmp_path,
                                                            monkeypatch):
    # A validation pass as long as the budget: training stops after its first step.
    monkeypatch.setattr(ValidationReserve, "reserve_s", lambda self: 3600.0)
    tiny_conf["training"].update(epochs=3, max_minutes=60)
    exp_dir = tmp_path / "exp"
    train(tiny_conf, tiny_data, exp_dir)
    infos = best_model_infos(exp_dir)
    assert infos["stop_reason"] == "time budget" and infos["global_step"] == 1
    assert last_checkpoint(exp_dir)["callbacks"]["ValidationReserve"]["measured"]


class StandInTimer(Timer):
    """Lightning's Timer with a clock the test sets."""

    def __init__(self) -> None:
        super().__init__(duration=timedelta(minutes=1))
        self.elapsed = 0.0

    def time_elapsed(self, stage: str = "train") -> float:
        return self.elapsed


def test_validation_reserve_measures_passes_and_stops_training(monkeypatch, capsys):
    import utils.training_callbacks as callbacks

    now = [0.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: now[0]))
    timer = StandInTimer()
    trainer = SimpleNamespace(callbacks=[timer], strategy=SimpleNamespace(broadcast=lambda x: x),
                              is_global_zero=True, should_stop=False, sanity_checking=True,
                              num_val_batches=[10])
    reserve = ValidationReserve(max_minutes=1)

    def validate(batches: int, seconds: float) -> None:
        reserve.on_validation_start(trainer, None)
        for i in range(batches):
            now[0] += seconds / batches
            reserve.on_validation_batch_end(trainer, None, None, None, i)
        reserve.on_validation_end(trainer, None)

    def step_at(elapsed: float) -> bool:
        timer.elapsed = elapsed
        reserve.on_train_batch_end(trainer, None, None, None, 0)
        return trainer.should_stop

    validate(2, 2.0)                    # the sanity check: 1 s a batch, 10 batches in a pass
    assert reserve.reserve_s() == pytest.approx(10.0)
    trainer.sanity_checking = False
    validate(10, 6.0)                   # the first whole pass replaces the estimate
    assert reserve.reserve_s() == pytest.approx(6.0)
    validate(10, 4.0)                   # then the longest pass counts
    assert reserve.reserve_s() == pytest.approx(6.0)
    assert not step_at(53.9)
    assert step_at(54.0) and reserve.stopped
    assert "stopping 0.1 min before the 1-minute budget" in capsys.readouterr().out

    # The cosine ends when training does: 54 of the 60 s.
    schedule = BudgetSchedule("cosine", 1e-3, 0, 0.0, 1, reserve)
    trainer.max_epochs, trainer.num_training_batches, trainer.global_step = 100, 10, 5
    timer.elapsed = 27.0
    assert schedule.progress(trainer) == pytest.approx(0.5)

    restored = ValidationReserve(max_minutes=1)
    restored.load_state_dict(reserve.state_dict())
    assert restored.reserve_s() == pytest.approx(6.0) and restored.measured

    # A pass over half the budget is not reserved: said once, and training goes on.
    long = ValidationReserve(max_minutes=0.1)
    long.load_state_dict({"pass_s": 4.0, "measured": True})
    trainer.should_stop = False
    for elapsed in (1.0, 5.0):
        timer.elapsed = elapsed
        long.on_train_batch_end(trainer, None, None, None, 0)
    assert not trainer.should_stop and long.reserve_s() == 0.0
    assert capsys.readouterr().out.count("one validation pass takes about 0.1 min") == 1


class Killed(Exception):
    """Stands for a job killed in mid-epoch."""


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_run_killed_in_mid_epoch_resumes_with_the_rest_of_that_epoch(tiny_conf, tmp_path,
                                                                       monkeypatch, num_workers):
    tiny_conf["training"]["num_workers"] = num_workers
    data_dir = tmp_path / "data"
    write_tiny_bsd(data_dir, n_train=8)                    # 4 training steps per epoch
    train(tiny_conf, data_dir, tmp_path / "straight")
    # The same run killed during its third step (last.ckpt holds step 2), then run again.
    training_step = BirdSystem.training_step

    def killed_at_third_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise Killed
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(BirdSystem, "training_step", killed_at_third_step)
    with pytest.raises(Killed):
        train(tiny_conf, data_dir, tmp_path / "killed")
    assert last_checkpoint(tmp_path / "killed")["global_step"] == 2
    monkeypatch.setattr(BirdSystem, "training_step", training_step)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable")
        train(tiny_conf, data_dir, tmp_path / "killed")
    # Steps 3 and 4 trained on the epoch's last two batches, in the same windows: the weights
    # are those of the run that was never stopped.
    straight = last_checkpoint(tmp_path / "straight")
    resumed = last_checkpoint(tmp_path / "killed")
    assert resumed["global_step"] == straight["global_step"] == 4
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in straight["state_dict"].items())


# adam: fused, skips the step on the device (no host sync per step); rmsprop: checked on the host.
@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_nan_batch_is_skipped_and_reported(tiny_conf, tmp_path, optimizer):
    data_dir = tmp_path / "data"
    write_tiny_bsd(data_dir, nan_mixtures=("tr01",))
    tiny_conf["training"]["batch_size"] = 1
    tiny_conf["optim"]["optimizer"] = optimizer
    with pytest.warns(BadBatchWarning, match=r"batch \d+ \(mixtures tr01\): batch skipped"):
        train(tiny_conf, data_dir, tmp_path / "exp")
    infos = best_model_infos(tmp_path / "exp")
    assert infos["bad_batches_skipped"] == 1 and np.isfinite(infos["best_val_loss"])
    # Trained on, one NaN batch would have made every weight NaN (through the gradient clip).
    assert all(torch.isfinite(p).all() for p in load_best_model(tmp_path / "exp").parameters())


def test_bad_batches_in_a_row_stop_training(tiny_conf, tmp_path):
    data_dir = tmp_path / "data"
    write_tiny_bsd(data_dir, nan_mixtures=tuple(f"tr{i:02d}" for i in range(N_TRAIN)))
    tiny_conf["training"]["max_bad_batches"] = 2
    with pytest.warns(BadBatchWarning), pytest.raises(RuntimeError, match="2 training batches in a row"):
        train(tiny_conf, data_dir, tmp_path / "exp")
    assert not (tmp_path / "exp" / "best_model.pth").exists()


def test_cpu_preset_has_the_keys_of_conf_yml(repo_root):
    conf, cpu = read_conf(repo_root / "conf.yml"), read_conf(repo_root / "conf_cpu.yml")
    assert {s: sorted(v) for s, v in cpu.items()} == {s: sorted(v) for s, v in conf.items()}
    # The presets share one data set: the sections that define it are equal.
    assert all(cpu[s] == conf[s] for s in ("common", "download", "clips", "mixtures"))
    assert sum(p.numel() for p in make_model(cpu).parameters()) < \
        sum(p.numel() for p in make_model(conf).parameters())


def test_precision_auto_is_float32_without_a_gpu():
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") == "32-true"


def test_compile_without_a_gpu_is_ignored_with_a_warning(tiny_conf, tiny_data, tmp_path):
    tiny_conf["training"].update(compile=True, accelerator="cpu")
    with pytest.warns(UserWarning, match="--compile true: ignored"):
        train(tiny_conf, tiny_data, tmp_path / "exp")
    assert (tmp_path / "exp" / "best_model.pth").is_file()


@needs_cxx
def test_compile_with_cuda_graphs_marks_each_step_and_keeps_asteroids_checkpoints(
        tiny_conf, tiny_data, tmp_path, monkeypatch, shifted_depthwise_only):
    # What --compile true runs on a GPU, here on CPU (where mode "reduce-overhead" compiles
    # without CUDA graphs): the model compiled in place with the shifted depthwise form, each
    # training and validation step marked as a new graph step.
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(system_module, "trains_on_cuda", lambda accelerator: True)
    tiny_conf["training"].update(compile=True, compile_mode="reduce-overhead", precision="32-true")
    best = train(tiny_conf, tiny_data, tmp_path / "exp")
    # 2 training steps, the sanity check's validation batch and the epoch's.
    assert len(marks) == N_TRAIN // BATCH + 2
    ConvTasNet.from_pretrained(str(best))   # asteroid's keys, no "_orig_mod." prefix


def test_unknown_compile_settings_are_refused(tiny_conf, tiny_data, tmp_path):
    tiny_conf["training"].update(compile=True, compile_mode="fastest")
    with pytest.raises(ConfError, match="--compile_mode 'fastest': expected one of default"):
        train(tiny_conf, tiny_data, tmp_path / "exp")
    tiny_conf["training"].update(compile="sometimes", compile_mode="default")
    with pytest.raises(ConfError, match="--compile 'sometimes': expected one of auto, true, false"):
        train(tiny_conf, tiny_data, tmp_path / "exp")


@pytest.mark.parametrize("setting, on_cuda, world_size, compiled", [
    ("auto", True, 1, True), ("auto", True, 2, False), ("auto", False, 1, False),
    ("true", True, 2, True), (True, True, 1, True), ("false", True, 1, False),
    (False, True, 1, False)])
def test_compile_setting_decides_where_the_model_is_compiled(setting, on_cuda, world_size, compiled,
                                                             tiny_conf, monkeypatch):
    calls = []
    monkeypatch.setattr(system_module, "trains_on_cuda", lambda accelerator: on_cuda)
    monkeypatch.setattr(system_module, "compile_in_place",
                        lambda model, mode: calls.append(mode) or (lambda: None))
    with warnings.catch_warnings(), torch._dynamo.config.patch(suppress_errors=False):
        warnings.simplefilter("error")   # no "ignored" warning unless true was asked for on CPU
        hook = system_module.compile_for_training(make_model(tiny_conf), setting, "auto", world_size, "default")
        # Only "auto" falls back to eager training when the compiler fails.
        assert torch._dynamo.config.suppress_errors == (compiled and setting == "auto")
    assert calls == (["default"] if compiled else []) and (hook is not None) == compiled


def test_auto_compile_falls_back_to_eager_training_when_the_compiler_fails(
        tiny_conf, tiny_data, tmp_path, monkeypatch, fresh_dynamo):
    # As on a GPU that Triton cannot build for: the backend raises at the first forward.
    import torch._inductor.compile_fx as inductor

    attempts = []

    def failing_backend(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("Found no GPU that Triton can build for")

    monkeypatch.setattr(inductor, "compile_fx", failing_backend)
    monkeypatch.setattr(system_module, "trains_on_cuda", lambda accelerator: True)
    tiny_conf["training"].update(compile="auto", precision="32-true")
    with torch._dynamo.config.patch(suppress_errors=False):
        best = train(tiny_conf, tiny_data, tmp_path / "exp")
    assert attempts   # compilation was tried, failed, and training went on eagerly
    assert last_checkpoint(tmp_path / "exp")["global_step"] == N_TRAIN // BATCH
    ConvTasNet.from_pretrained(str(best))


def test_run_command_records_accepted_runs_only_and_eval_says_resume(tiny_conf, tiny_data,
                                                                     tmp_path, monkeypatch):
    """run.sh appended its command line before train.py ran, so a refused resume was recorded;
    eval.py on an unfinished experiment said "train first" where resuming is what is needed."""
    exp_dir = tmp_path / "exp"
    conf_path = tmp_path / "tiny.yml"
    write_conf(tiny_conf, conf_path)
    argv = ["--conf", str(conf_path), "--data_dir", str(tiny_data), "--exp_dir", str(exp_dir)]
    # A run killed before best_model.pth was written: checkpoints, no model.
    monkeypatch.setattr(train_module, "_write_results",
                        lambda *args: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        main(argv + ["--run_command", "./run.sh --stage 3 --tag first"])
    assert list((exp_dir / "checkpoints").glob("*.ckpt"))
    with pytest.raises(FileNotFoundError, match="holds .* checkpoint.*resume it \\(stage 3"):
        load_best_model(exp_dir)
    with pytest.raises(SystemExit, match="training did not finish; resume it"):
        eval_main(["--data_dir", str(tiny_data), "--exp_dir", str(exp_dir)])
    monkeypatch.undo()

    with pytest.raises(ConfError, match="other settings"):   # refused: not recorded
        main(argv + ["--lr", "0.0005", "--run_command", "./run.sh --lr 0.0005"])
    main(argv)   # resumed and finished: recorded, as train.py's own command by default
    main(argv)   # nothing to do: not recorded
    lines = (exp_dir / "run_command.txt").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "./run.sh --stage 3 --tag first", "train.py " + " ".join(argv)]
    with pytest.raises(FileNotFoundError, match="train first"):
        load_best_model(tmp_path / "never_trained")


def test_ddp_on_two_cpu_processes_trains_checkpoints_resumes_and_evaluates(tiny_conf, tiny_data,
                                                                           tmp_path, repo_root):
    """Lightning DDP (gloo) with `--accelerator cpu --devices 2`: what several GPUs or nodes run,
    on one machine. train.py is a subprocess: Lightning's DDP launcher starts the second
    process by running the same command again."""
    import os
    import subprocess
    import sys

    tiny_conf["training"].update(strategy="ddp", devices=2, num_threads=1, num_nodes=1)
    conf_path = tmp_path / "ddp.yml"
    write_conf(tiny_conf, conf_path)
    exp_dir = tmp_path / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, *args], cwd=repo_root, env=env, timeout=240,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out

    argv = ["train.py", "--conf", str(conf_path), "--data_dir", str(tiny_data),
            "--exp_dir", str(exp_dir)]
    run(*argv)
    # Two processes of two mixtures each: one step per epoch.
    assert last_checkpoint(exp_dir)["global_step"] == 1
    assert best_model_infos(exp_dir)["epochs_trained"] == 1
    out = run(*argv, "--epochs", "2")
    assert "resuming from" in out.stdout
    assert last_checkpoint(exp_dir)["global_step"] == 2
    assert best_model_infos(exp_dir)["epochs_trained"] == 2
    assert len((exp_dir / "run_command.txt").read_text().splitlines()) == 2  # rank 0 only
    eval_main(["--data_dir", str(tiny_data), "--exp_dir", str(exp_dir), "--oracles", "false",
               "--n_save_examples", "0"])
    metrics = json.loads((exp_dir / "eval" / "final_metrics.json").read_text())
    assert metrics["n_utterances"] == 1 and metrics["checkpoint"] == str(exp_dir / "best_model.pth")


def test_num_nodes_reaches_the_trainer(tiny_conf, tmp_path):
    tiny_conf["training"].update(strategy="ddp", devices=2, num_nodes=3)
    trainer, _, _ = train_module._make_trainer(tiny_conf, tmp_path, 2, "32-true")
    assert (trainer.num_nodes, trainer.num_devices) == (3, 2)
