"""Benchmark: asteroid's ConvTasNet against fast_tasnet.FastConvTasNet on this machine.

    python -m tools.benchmark [--json PATH] [--quick] [--data_dir DIR] [--threads N]
                              [--sdr_mixtures N] [--infer_rounds N] [--conf conf.yml]
                              [--preset_conf conf_cpu.yml] [--key value ...]

In one run, on the same inputs and the same weights:
  * training step (forward, PIT SI-SDR loss, backward, Adam step: torch's default Adam for
    stock as in asteroid's recipes, this recipe's fused Adam for ours) of the thesis config (the
    `model` section of --conf) and of the CPU preset (--preset_conf), each at its own training
    batch (`batch_size` x `segment_s`) and torch thread count (`num_threads`, 0 = all cores;
    --threads overrides both), stock and ours taking turns step by step in one process:
    medians of at least 3 steps each and 5 s in all, after two full-size warm-up steps each;
  * inference real-time factor (seconds of compute per second of audio) on a 60 s mixture,
    each model in a fresh process, three rounds taking turns, medians;
  * ours under bf16 autocast (--precision bf16-mixed: bf16 matrix products in the gLN blocks)
    against stock in float32: a training pair of its own per config, and inference;
  * peak memory: growth of the peak resident set size of a fresh process per model (one
    warm-up and one timed training step; the inference cases);
  * parity: stock weights loaded (strict) into ours, float32 outputs within 1e-4 and
    gradients within 1e-3 (relative), float64 equal to 1e-8, thesis config and preset;
  * evaluation scoring (SI-SNR, permutations, BSS Eval SDR of the input, a model-like
    estimate and the 3 oracle masks per mixture, as eval.py scores): the conf's sdr_backend
    and fast_bss_eval against mir_eval's bss_eval_sources, on BSD-2mix test (all of it, or
    --sdr_mixtures; synthetic mixtures without --data_dir): time, and agreement within 0.05 dB;
  * with --data_dir: time to fetch one training batch through BSDDataset + DataLoader, against
    a training step;
  * for reference (not with --quick): stock once more under glibc's malloc defaults, as
    asteroid runs out of the box (training steps and inference); the training pairs with
    OpenMP threads that spin briefly instead of sleeping (GOMP_SPINCOUNT=10000), and the
    preset's pair on one thread when it runs more.
GPU training (throughput, bf16, torch.compile, SI-SNR after equal steps): tools/benchmark_gpu.py.
Ratios are stock / ours, so above 1 means ours is faster.  Timings on a machine shared with
other work are noisy, and this machine's speed drifted by several percent from minute to
minute: stock and ours alternate, and the figures are medians.  Each case runs in a fresh
process with OMP_WAIT_POLICY=PASSIVE unless the environment sets it (see below),
and with the recipe's malloc settings (utils/allocator.py), stock and ours alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from utils.allocator import keep_freed_memory
from utils.config import Conf, ConfError, parse_stage_args, read_conf

# Acceptance thresholds of the parity check (relative errors).
OUTPUT_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-3
SDR_TOLERANCE_DB = 0.05
INFERENCE_SECONDS = 60.0
# Evaluation scoring (SDR backends): mixtures with --quick; synthetic stand-ins for BSD-2mix
# test (as long as its mixtures on average) when --data_dir has none.
QUICK_SDR_MIXTURES = 3
SYNTHETIC_SDR_MIXTURES = 20
SYNTHETIC_SDR_SECONDS = 4.4
# OpenMP threads that wait sleep instead of spinning (unless the caller's environment says
# otherwise): on a machine shared with other work, spinning barriers stall every torch op for
# a whole scheduler slice whenever one of the threads is descheduled (much slower training
# steps on a busy machine, stock and ours alike; RESULTS.md).
OMP_WAIT_POLICY = "PASSIVE"
# Timed training steps last at least this long in all (the preset's steps are short and
# the median of only three of them moved from run to run).
MIN_TIMED_S = 5.0
QUICK_INFERENCE_SECONDS = 10.0
# Inference: rounds of fresh processes (stock, ours, ours in bf16) taking turns.
INFERENCE_ROUNDS = 3


# ----------------------------------------------------------------------------------------------
# Models and inputs.
# ----------------------------------------------------------------------------------------------
def model_kwargs_of(conf: Conf) -> dict[str, Any]:
    """ConvTasNet constructor arguments of a conf's model section (the recipe's mapping)."""
    from model import model_kwargs

    return model_kwargs(conf)


def build_model(kwargs: dict[str, Any], impl: str) -> torch.nn.Module:
    """'stock' (asteroid's ConvTasNet) or 'fast' (FastConvTasNet), same initialisation."""
    from asteroid.models import ConvTasNet

    from fast_tasnet import FastConvTasNet

    cls = {"stock": ConvTasNet, "fast": FastConvTasNet}[impl]
    return cls(**kwargs)


def random_batch(n_src: int, batch: int, samples: int, seed: int):
    """Mixture and sources: bird-like chirps in noise, the same for every implementation."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 8000.0
    sources = []
    for _ in range(batch * n_src):
        f0 = 1000 + 2000 * torch.rand(1, generator=gen)
        sweep = 500 * torch.randn(1, generator=gen)
        env = (torch.sin(2 * torch.pi * (0.5 + torch.rand(1, generator=gen)) * t) > 0).float()
        chirp = torch.sin(2 * torch.pi * (f0 + sweep * t) * t) * env
        sources.append(chirp + 0.05 * torch.randn(samples, generator=gen))
    sources = torch.stack(sources).view(batch, n_src, samples)
    return sources.sum(1), sources


def _peak_rss_mb() -> float:
    """Peak resident set size of this process (MB; Linux reports kB), NaN where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------
# Cases, each run in a fresh process (clean peak-memory figures, no shared allocator state).
# ----------------------------------------------------------------------------------------------
def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(case["threads"])
    # The recipe's process settings, for stock and ours alike (unless the case asks for
    # glibc's defaults: stock as asteroid runs out of the box).
    if case.get("keep_freed_memory", True):
        keep_freed_memory()
    torch.manual_seed(case["seed"])
    if case["kind"] == "parity":
        return check_parity(case["kwargs"], seconds=case["seconds"], seed=case["seed"])
    if case["kind"] == "sdr":
        return compare_sdr_backends(case["data_dir"], case["n_mixtures"], case["sample_rate"],
                                    case["oracle_win_ms"], case["oracle_hop_ms"],
                                    case["backend"], case["seed"])
    if case["kind"] == "train_pair":
        return _train_pair_case(case)
    kwargs, impl = case["kwargs"], case["impl"]
    device = torch.device(case.get("device", "cpu"))
    model = build_model(kwargs, impl).to(device)
    samples = int(round(case["seconds"] * kwargs["sample_rate"]))
    if case["kind"] == "train":
        return _train_case(model, case, samples, device)
    return _infer_case(model, case, samples)


def optimizer_for(impl: str, params, lr: float) -> torch.optim.Optimizer:
    """Adam as each side trains: torch's default for stock (asteroid's recipes), the recipe's
    fused one for ours (model.py)."""
    if impl == "stock":
        return torch.optim.Adam(params, lr=lr)
    from model import make_recipe_optimizer

    return make_recipe_optimizer(params, "adam", lr, 0.0)


def _training_step(model, impl: str, case, samples, device, bf16: bool = False
                   ) -> Callable[[], None]:
    """One training step (forward, PIT loss, backward, optimizer) of `model` on the case's
    batch, as a closure; `bf16`: forward under bf16 autocast."""
    from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr

    loss_func = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
    optimizer = optimizer_for(impl, model.parameters(), case["lr"])
    mixture, sources = random_batch(case["kwargs"]["n_src"], case["batch"], samples, case["seed"])
    mixture, sources = mixture.to(device), sources.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            estimates = model(mixture)
        loss = loss_func(estimates.float(), sources)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def _timed_steps(steps: dict[str, Callable[[], None]], case) -> dict[str, list[float]]:
    """Step times of each closure, taking turns: `warmup` untimed steps each, then at least
    `steps` timed steps each and `min_seconds` seconds in all (capped at 200 turns)."""
    # Warm-up at full size: one-off initialisations (optimizer state, thread pools, kernels)
    # and the allocator's growth to its steady state (after a warm-up on a short batch, the
    # first full-size steps were slower than the following ones, which is not what a training
    # run sees).
    for _ in range(case["warmup"]):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    total = 0.0
    while (len(times[next(iter(steps))]) < case["steps"]
           or (total < case.get("min_seconds", 0) and len(times[next(iter(steps))]) < 200)):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
            total += times[name][-1]
    return times


def _train_case(model, case, samples, device) -> dict[str, Any]:
    rss_before = _peak_rss_mb()
    times = _timed_steps({"one": _training_step(model, case["impl"], case, samples, device)},
                         case)["one"]
    step_s = statistics.median(times)
    return dict(step_s=step_s, steps_s=times, samples_per_s=case["batch"] / step_s,
                peak_rss_growth_mb=_peak_rss_mb() - rss_before,
                batch=case["batch"], seconds=case["seconds"], threads=case["threads"])


def _train_pair_case(case) -> dict[str, Any]:
    """Stock and ours (same initial weights) in one process, taking turns step by step: the
    machine's speed drifts by several percent over minutes, and turns cancel the drift.
    With `bf16` in the case, ours runs under bf16 autocast (still named `fast`).  Two models
    only: with a third taking turns, ours' preset step was slower."""
    samples = int(round(case["seconds"] * case["kwargs"]["sample_rate"]))
    stock = build_model(case["kwargs"], "stock")
    ours = build_model(case["kwargs"], "fast")
    ours.load_state_dict(stock.state_dict(), strict=True)
    device = torch.device("cpu")
    times = _timed_steps({
        "stock": _training_step(stock, "stock", case, samples, device),
        "fast": _training_step(ours, "fast", case, samples, device, bf16=case.get("bf16", False)),
    }, case)
    return {f"{key}_{impl}": value for impl, steps in times.items()
            for key, value in (("step_s", statistics.median(steps)), ("steps_s", steps))}


def _infer_case(model, case, samples) -> dict[str, Any]:
    model.eval()
    mixture, _ = random_batch(case["kwargs"]["n_src"], 1, samples, case["seed"])
    warm, _ = random_batch(case["kwargs"]["n_src"], 1, min(samples, 5 * case["kwargs"]["sample_rate"]),
                     case["seed"])
    rss_before = _peak_rss_mb()
    times = []
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.get("bf16", False))
    with torch.inference_mode(), bf16:
        model(warm)
        for _ in range(case["reps"]):
            start = time.perf_counter()
            model(mixture)
            times.append(time.perf_counter() - start)
    elapsed = statistics.median(times)
    return dict(rtf=elapsed / case["seconds"], times_s=times, seconds=case["seconds"],
                peak_rss_growth_mb=_peak_rss_mb() - rss_before, threads=case["threads"])


def run_case_in_subprocess(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in a fresh Python process (`-m tools.benchmark --run_case JSON`)."""
    repo_root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo_root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    for key, value in case.get("env", {}).items():     # the case's own settings (None: unset)
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run([sys.executable, "-m", "tools.benchmark", "--run_case", json.dumps(case)],
                          cwd=repo_root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {case['kind']}/{case.get('impl', '')} failed:\n"
                           f"{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Parity, BSS Eval, data loading.
# ----------------------------------------------------------------------------------------------
def _relative_error(value: Optional[torch.Tensor], reference: Optional[torch.Tensor]) -> float:
    """||value - reference|| / ||reference|| (0 when both are missing or zero)."""
    if value is None or reference is None:
        other = value if reference is None else reference
        return 0.0 if other is None or not bool(other.abs().max() > 0) else float("inf")
    ref_norm = float(reference.double().norm())
    diff = float((value.double() - reference.double()).norm())
    return diff / ref_norm if ref_norm > 0 else diff


def _forward_backward(model, mixture, sources):
    from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr

    model.zero_grad(set_to_none=True)
    estimates = model(mixture)
    PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")(estimates, sources).backward()
    return estimates.detach(), {n: p.grad for n, p in model.named_parameters()}


def check_parity(kwargs: dict[str, Any], seconds: float = 0.5, batch: int = 2,
                 seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Stock weights loaded (strict) into ours; same inputs; PIT SI-SDR loss.

    float32 (what training runs): outputs within OUTPUT_TOLERANCE (max error / max value),
    gradients within GRADIENT_TOLERANCE (norm of the difference of all gradients / norm of all
    gradients).  Per-parameter errors are reported but not judged: a PReLU input within
    rounding of 0 takes the other slope in another summation order, which moves a small
    gradient (a PReLU slope's) by up to 1e-2 - asteroid against itself on 1 and 2 threads
    does that too.  float64: the same math, every gradient within 1e-8.  On a GPU (`device`)
    with TF32 off; the float64 check then covers the path ours runs there (plain autograd)."""
    with _strict_float32(device):
        return _check_parity(kwargs, seconds, batch, seed, torch.device(device))


@contextmanager
def _strict_float32(device: str):
    """TF32 off on CUDA (its 10-bit mantissa is no float32 reference); nothing on CPU."""
    if not device.startswith("cuda"):
        yield
        return
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


def _check_parity(kwargs, seconds, batch, seed, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(seed)
    stock = build_model(kwargs, "stock").to(device)
    ours = build_model(kwargs, "fast").to(device)
    ours.load_state_dict(stock.state_dict(), strict=True)
    mixture, sources = random_batch(kwargs["n_src"], batch, int(seconds * kwargs["sample_rate"]), seed)
    mixture, sources = mixture.to(device), sources.to(device)
    out_stock, grads_stock = _forward_backward(stock, mixture, sources)
    out_ours, grads_ours = _forward_backward(ours, mixture, sources)
    with torch.inference_mode():
        inference_error = float((ours(mixture) - out_stock).abs().max() / out_stock.abs().max())
    output_error = float((out_ours - out_stock).abs().max() / out_stock.abs().max())
    names = [n for n in grads_stock if grads_stock[n] is not None]
    flat = lambda grads: torch.cat([grads[n].flatten() for n in names])  # noqa: E731
    grad_error = _relative_error(flat(grads_ours), flat(grads_stock))
    per_param = {n: _relative_error(grads_ours[n], grads_stock[n]) for n in grads_stock}
    worst = max(per_param, key=per_param.get)
    # float64: exact math check of the fast path (on CPU, its autograd functions).
    stock.double()
    ours.double()
    ours.impl = "function" if device.type == "cpu" else "autograd"
    out64_stock, grads64_stock = _forward_backward(stock, mixture.double(), sources.double())
    out64_ours, grads64_ours = _forward_backward(ours, mixture.double(), sources.double())
    f64_output_error = _relative_error(out64_ours, out64_stock)
    f64_grad_error = max(_relative_error(grads64_ours[n], grads64_stock[n]) for n in grads64_stock)
    ok = (output_error <= OUTPUT_TOLERANCE and inference_error <= OUTPUT_TOLERANCE
          and grad_error <= GRADIENT_TOLERANCE and f64_output_error <= 1e-10
          and f64_grad_error <= 1e-8)
    return dict(ok=ok, output_rel_error=output_error, inference_rel_error=inference_error,
                grad_rel_error=grad_error, max_param_grad_rel_error=per_param[worst],
                worst_param=worst, float64_output_rel_error=f64_output_error,
                float64_max_param_grad_rel_error=f64_grad_error)


def _scoring_mixtures(data_dir: Optional[str], n_mixtures: int, sample_rate: int,
                      seed: int) -> tuple[dict[str, Any], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """(description, iterator of (mixture (time,), references (2, time)) float64): the first
    `n_mixtures` (0 = all) of BSD-2mix test under `data_dir` when it has them, else as many
    synthetic mixtures of bird-like chirps, as long as the test mixtures are on average."""
    from local.bsd_dataset import BSDDataset, split_csv

    csv_path = None if data_dir is None else split_csv(data_dir, 2, "tt")
    if csv_path is not None and csv_path.is_file():
        dataset = BSDDataset(csv_path, sample_rate, segment_s=None)
        count = len(dataset) if n_mixtures <= 0 else min(n_mixtures, len(dataset))

        def real():
            for idx in range(count):
                mixture, references = dataset[idx]
                yield mixture.double().numpy(), references.double().numpy()

        return dict(source="BSD-2mix tt", csv=str(csv_path), n_mixtures=count,
                    n_mixtures_in_split=len(dataset)), real()
    count = n_mixtures if n_mixtures > 0 else SYNTHETIC_SDR_MIXTURES
    samples = int(SYNTHETIC_SDR_SECONDS * sample_rate)

    def synthetic():
        for k in range(count):
            mixture, sources = random_batch(2, 1, samples, seed + k)
            yield mixture[0].double().numpy(), sources[0].double().numpy()

    why = "no --data_dir" if csv_path is None else f"{csv_path} not found"
    return dict(source=f"synthetic ({why})", n_mixtures=count), synthetic()


def compare_sdr_backends(data_dir: Optional[str], n_mixtures: int, sample_rate: int,
                         oracle_win_ms: float, oracle_hop_ms: float, fast_backend: str,
                         seed: int = 0) -> dict[str, Any]:
    """The evaluation stage's scoring (local.metrics.score_estimates, called as eval.py calls
    it per mixture: the mixture as the input, a model's estimate and the 3 oracle masks, every
    SDR of the mixture in one batch) with `fast_backend`, fast_bss_eval and mir_eval on the
    same mixtures, one after the other per mixture. The model's estimate is the references
    with crosstalk and noise (model inference is common to every path and not timed).
    Speedups are mir_eval's time over each backend's; differences are over every SDR
    (input, model, oracles) against mir_eval's."""
    from local.metrics import ORACLE_MASKS, oracle_estimates, score_estimates, stft_sizes

    win, hop = stft_sizes(sample_rate, oracle_win_ms, oracle_hop_ms)
    backends = list(dict.fromkeys((fast_backend, "fast_bss_eval", "mir_eval")))
    description, mixtures = _scoring_mixtures(data_dir, n_mixtures, sample_rate, seed)
    rng = np.random.default_rng(seed)
    # Other work on the machine slows mir_eval most (its 2 OpenBLAS threads then wait for
    # each other): the load says how far the ratio can be trusted.
    load_before = _load_average()
    seconds = dict.fromkeys(backends, 0.0)
    max_diff = dict.fromkeys(backends, 0.0)
    total_samples = 0
    for mixture, references in mixtures:
        level = references.std(axis=-1, keepdims=True)
        model_like = (references + 0.2 * references[::-1]
                      + 0.05 * level * rng.standard_normal(references.shape))
        estimates = {"model": model_like, **oracle_estimates(mixture, references, win, hop)}
        sdr = {}
        for backend in backends:
            start = time.perf_counter()
            scores = score_estimates(mixture, references, estimates, backend)
            seconds[backend] += time.perf_counter() - start
            sdr[backend] = np.stack([scores[name]["sdr"] for name in ("input", *estimates)])
        for backend in backends:
            max_diff[backend] = max(max_diff[backend],
                                    float(np.abs(sdr[backend] - sdr["mir_eval"]).max()))
        total_samples += mixture.shape[-1]
    n = description["n_mixtures"]
    return dict(description, backend=fast_backend, estimate_sets=["input", "model", *ORACLE_MASKS],
                mean_seconds=total_samples / n / sample_rate,
                scoring_s=seconds, ms_per_mixture={b: 1e3 * s / n for b, s in seconds.items()},
                speedup=seconds["mir_eval"] / seconds[fast_backend],
                speedup_fast_bss_eval=seconds["mir_eval"] / seconds["fast_bss_eval"],
                max_abs_diff_db=max_diff[fast_backend], max_abs_diff_db_per_backend=max_diff,
                tolerance_db=SDR_TOLERANCE_DB, agree=max_diff[fast_backend] <= SDR_TOLERANCE_DB,
                load_average_1min=[load_before, _load_average()])


def _load_average() -> Optional[float]:
    """The machine's 1-minute load average (None where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def time_data_loading(conf: Conf, data_dir: str | Path, n_batches: int,
                      device: str | torch.device = "cpu") -> dict[str, Any]:
    """Median seconds per batch of the recipe's training DataLoader (train.make_train_loader:
    workers, pinned memory on CUDA machines), moved to `device`, after the first batch."""
    from train import make_train_loader

    device = torch.device(device)
    t = conf["training"]
    iterator, times = iter(make_train_loader(conf, data_dir)), []
    next(iterator)  # worker start-up
    for _ in range(n_batches):
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        if device.type != "cpu":
            [x.to(device, non_blocking=True) for x in batch[:2]]
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if not times:
        raise ValueError(f"{data_dir}: fewer than 2 training batches of {t['batch_size']}")
    return dict(batch_s=statistics.median(times), n_batches=len(times),
                num_workers=t["num_workers"], batch_size=t["batch_size"])


# ----------------------------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threads_of(conf: Conf, threads: Optional[int]) -> int:
    if threads:
        return threads
    wanted = conf["training"].get("num_threads", 0)
    return wanted if wanted and wanted > 0 else torch.get_num_threads()


def run_case_in_process(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case here (quicker; peak-memory figures then include earlier cases' peaks)."""
    previous = torch.get_num_threads()
    try:
        return _run_case(case)
    finally:
        torch.set_num_threads(previous)


def run_benchmark(conf: Conf, preset_conf: Conf, *, quick: bool = False,
                  threads: Optional[int] = None, data_dir: Optional[str | Path] = None,
                  infer_seconds: Optional[float] = None, parity_seconds: float = 0.5,
                  json_path: Optional[str | Path] = None, preset_source: str = "",
                  sdr_mixtures: Optional[int] = None, infer_rounds: Optional[int] = None,
                  isolate: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure stock vs ours; returns (and with `json_path` writes) the figures.

    `isolate`: each case in a fresh process (clean memory figures); False runs them here.
    `sdr_mixtures`: mixtures of the evaluation-scoring comparison (0 = the whole test split;
    default: all, QUICK_SDR_MIXTURES with `quick`).  `infer_rounds`: default INFERENCE_ROUNDS,
    1 with `quick`."""
    run_case = run_case_in_subprocess if isolate else run_case_in_process
    seed = conf["common"]["seed"]
    warmup, steps, reps = (1, 2, 1) if quick else (2, 3, 2)
    infer_seconds = infer_seconds or (QUICK_INFERENCE_SECONDS if quick else INFERENCE_SECONDS)
    results: dict[str, Any] = dict(
        device="cuda" if torch.cuda.is_available() else "cpu", cpu_model=_cpu_model(),
        cores=os.cpu_count(), torch_version=torch.__version__, quick=quick,
        preset_source=preset_source or "given", isolated=isolate,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", OMP_WAIT_POLICY) if isolate
        else os.environ.get("OMP_WAIT_POLICY", "default"),
        malloc_keeps_freed_memory=keep_freed_memory(), cases={})
    from fast_tasnet import tcn_native

    # Whether ours ran its gLN blocks on the fused C kernels, or on torch (and why).
    results["native_kernels"] = tcn_native.kernels() is not None
    results["native_kernels_missing_because"] = tcn_native.unavailable_reason()
    log(f"native TCN kernels: {'yes' if results['native_kernels'] else 'no'}"
        + ("" if results["native_kernels"] else f" ({results['native_kernels_missing_because']})"))
    cases = results["cases"]
    # Reference measurements under other process settings: each needs a fresh process.
    references = isolate and not quick
    # Stock also under glibc's malloc defaults (when the recipe's differ from them).
    default_malloc = references and results["malloc_keeps_freed_memory"]

    for name, c in (("thesis", conf), ("preset", preset_conf)):
        kwargs = model_kwargs_of(c)
        t = c["training"]
        base = dict(kind="train", kwargs=kwargs, batch=t["batch_size"], seconds=t["segment_s"],
                    warmup=warmup, steps=steps, threads=_threads_of(c, threads), seed=seed,
                    lr=c["optim"]["lr"], min_seconds=0.0 if quick else MIN_TIMED_S)
        # Step times: stock and ours taking turns in one process.  Peak memory: each alone in
        # a fresh process (one warm-up and one timed step).
        log(f"training steps, {name}, stock and ours taking turns ...")
        pair = cases[f"train_{name}_pair"] = run_case(dict(base, kind="train_pair"))
        for impl in ("stock", "fast"):
            log(f"training memory, {name}, {impl} ...")
            cases[f"train_{name}_{impl}_memory"] = run_case(dict(
                base, impl=impl, warmup=1, steps=1, min_seconds=0.0))
        memory = [cases[f"train_{name}_{impl}_memory"]["peak_rss_growth_mb"]
                  for impl in ("stock", "fast")]
        stock_s, ours_s = pair["step_s_stock"], pair["step_s_fast"]
        results[f"train_speedup_{name}"] = stock_s / ours_s
        results[f"train_step_s_{name}_stock"] = stock_s
        results[f"train_step_s_{name}_ours"] = ours_s
        results[f"train_memory_ratio_{name}"] = memory[0] / max(memory[1], 1e-6)
        results[f"threads_{name}"] = base["threads"]
        log(f"train {name}: stock {stock_s:.3f} s, ours {ours_s:.3f} s -> "
            f"{results[f'train_speedup_{name}']:.2f}x; peak memory {memory[0]:.0f} vs "
            f"{memory[1]:.0f} MB")
        # Opt-in (--precision bf16-mixed): the gLN blocks' matrix products in bf16, against
        # stock in float32, in a pair of their own.
        pair16 = cases[f"train_{name}_pair_bf16"] = run_case(dict(base, kind="train_pair",
                                                                  bf16=True))
        results[f"train_step_s_{name}_ours_bf16"] = pair16["step_s_fast"]
        results[f"train_speedup_{name}_bf16"] = pair16["step_s_stock"] / pair16["step_s_fast"]
        log(f"  ours under bf16 autocast: stock {pair16['step_s_stock']:.3f} s, ours "
            f"{pair16['step_s_fast']:.3f} s -> {results[f'train_speedup_{name}_bf16']:.2f}x")
        if default_malloc:
            _stock_with_default_malloc(results, f"train_{name}", "step_s", ours_s, base,
                                       run_case, log)
        if references:
            _reference_pairs(results, name, base, run_case, log)

    thesis_kwargs = model_kwargs_of(conf)
    infer_base = dict(kind="infer", kwargs=thesis_kwargs, seconds=infer_seconds, reps=reps,
                      threads=_threads_of(conf, threads), seed=seed)
    # Fresh processes taking turns, round after round, and the median of each: with one
    # process each, asteroid's real-time factor moved between runs.
    rounds = infer_rounds or (1 if quick else INFERENCE_ROUNDS)
    variants = {"stock": dict(impl="stock"), "fast": dict(impl="fast"),
                "fast_bf16": dict(impl="fast", bf16=True)}
    runs: dict[str, list] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name, variant in variants.items():
            log(f"inference on {infer_seconds:.0f} s, thesis, {name} "
                f"(round {round_index + 1} of {rounds}) ...")
            runs[name].append(run_case(dict(infer_base, **variant)))
    for name, measured in runs.items():
        cases[f"infer_thesis_{name}"] = dict(
            rtf=statistics.median(m["rtf"] for m in measured),
            rtf_rounds=[m["rtf"] for m in measured],
            peak_rss_growth_mb=max(m["peak_rss_growth_mb"] for m in measured),
            seconds=infer_seconds, threads=infer_base["threads"])
    results["rtf_thesis_stock"] = cases["infer_thesis_stock"]["rtf"]
    results["rtf_thesis_ours"] = cases["infer_thesis_fast"]["rtf"]
    results["infer_speedup_thesis"] = results["rtf_thesis_stock"] / results["rtf_thesis_ours"]
    per_round = ", ".join(
        name + " " + " ".join(f"{rtf:.3f}" for rtf in cases[f"infer_thesis_{name}"]["rtf_rounds"])
        for name in ("stock", "fast"))
    log(f"inference thesis: RTF stock {results['rtf_thesis_stock']:.3f}, ours "
        f"{results['rtf_thesis_ours']:.3f} -> {results['infer_speedup_thesis']:.2f}x"
        + ("" if rounds == 1 else f" (medians of {per_round})"))
    results["rtf_thesis_ours_bf16"] = cases["infer_thesis_fast_bf16"]["rtf"]
    results["infer_speedup_thesis_bf16"] = (results["rtf_thesis_stock"]
                                            / results["rtf_thesis_ours_bf16"])
    log(f"  ours under bf16 autocast: RTF {results['rtf_thesis_ours_bf16']:.3f} -> "
        f"{results['infer_speedup_thesis_bf16']:.2f}x stock (float32)")
    # What separate.py runs by default on this machine (conf separation.bf16, auto: bf16 on a
    # CPU with bf16 instructions). Imported here, not in every case's fresh process.
    from separate import use_bf16

    bf16_default = results["separation_bf16"] = use_bf16(conf["separation"]["bf16"], "cpu")
    results["infer_speedup_thesis_separation"] = results[
        "infer_speedup_thesis_bf16" if bf16_default else "infer_speedup_thesis"]
    log(f"  separate.py's default here: {'bf16' if bf16_default else 'float32'} products -> "
        f"{results['infer_speedup_thesis_separation']:.2f}x stock (float32)")
    if default_malloc:
        _stock_with_default_malloc(results, "infer_thesis", "rtf", results["rtf_thesis_ours"],
                                   infer_base, run_case, log)

    log("parity (stock weights in ours) ...")
    results["parity"] = {name: run_case(dict(
        kind="parity", kwargs=model_kwargs_of(c), seconds=parity_seconds,
        threads=_threads_of(c, threads), seed=seed))
        for name, c in (("thesis", conf), ("preset", preset_conf))}
    results["parity_ok"] = all(p["ok"] for p in results["parity"].values())
    for name, p in results["parity"].items():
        log(f"parity {name}: float32 output {p['output_rel_error']:.1e}, inference "
            f"{p['inference_rel_error']:.1e}, gradients {p['grad_rel_error']:.1e} (worst "
            f"parameter {p['max_param_grad_rel_error']:.1e}, {p['worst_param']}); float64 "
            f"output {p['float64_output_rel_error']:.1e}, worst gradient "
            f"{p['float64_max_param_grad_rel_error']:.1e} -> {'ok' if p['ok'] else 'FAILED'}")

    evaluation = conf["evaluation"]
    log(f"evaluation scoring: {evaluation['sdr_backend']} vs mir_eval ...")
    # torch's default threads, as eval.py runs (fast_bss_eval sets one thread for its solve).
    sdr = run_case(dict(
        kind="sdr", data_dir=None if data_dir is None else str(data_dir),
        n_mixtures=sdr_mixtures if sdr_mixtures is not None else (QUICK_SDR_MIXTURES if quick else 0),
        sample_rate=conf["clips"]["sample_rate"], oracle_win_ms=evaluation["oracle_win_ms"],
        oracle_hop_ms=evaluation["oracle_hop_ms"], backend=evaluation["sdr_backend"],
        threads=threads or torch.get_num_threads(), seed=seed))
    results["eval_sdr"] = sdr
    results["eval_sdr_speedup"] = sdr["speedup"]
    log(f"evaluation scoring of {sdr['n_mixtures']} mixtures ({sdr['source']}): mir_eval "
        f"{sdr['scoring_s']['mir_eval']:.1f} s, {sdr['backend']} {sdr['scoring_s'][sdr['backend']]:.2f} s "
        f"-> {sdr['speedup']:.1f}x (fast_bss_eval {sdr['speedup_fast_bss_eval']:.1f}x); max "
        f"difference {sdr['max_abs_diff_db']:.1e} dB")

    if data_dir is not None:
        log("data loading ...")
        loading = time_data_loading(conf, data_dir, 3 if quick else 10)
        results["data_loading"] = loading
        results["data_batch_s"] = loading["batch_s"]
        results["data_vs_train_step_ours"] = loading["batch_s"] / results["train_step_s_thesis_ours"]
        log(f"data: {loading['batch_s']:.3f} s per batch = "
            f"{results['data_vs_train_step_ours']:.2f} of a training step (ours, thesis)")

    if json_path is not None:
        from utils.atomic import atomic_write_text

        atomic_write_text(json_path, json.dumps(results, indent=2, default=str) + "\n")
        log(f"wrote {json_path}")
    return results


def _stock_with_default_malloc(results, prefix: str, key: str, ours: float, base: dict,
                               run_case, log) -> None:
    """Stock once more, with glibc's malloc defaults, against ours as measured (`ours`, the
    recipe's settings): `<prefix>_stock_default_malloc` case, `*_vs_stock_default_malloc`
    ratio."""
    case = run_case(dict(base, impl="stock", keep_freed_memory=False))
    results["cases"][f"{prefix}_stock_default_malloc"] = case
    ratio = case[key] / ours
    name = prefix.replace("train_", "train_speedup_").replace("infer_", "infer_speedup_")
    results[f"{name}_vs_stock_default_malloc"] = ratio
    log(f"  stock with glibc's malloc defaults: {case[key]:.3f} {key} -> ours {ratio:.2f}x")


# OpenMP threads that spin a little before they sleep: faster than PASSIVE on an idle machine
# (for asteroid's many small operators above all), several times slower on a busy one (the
# recipe keeps PASSIVE).
SHORT_SPIN_ENV = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"}


def _reference_pairs(results, name: str, base: dict, run_case, log) -> None:
    """Training pairs under settings other than the recipe's, for reference: OpenMP threads
    that spin briefly (`train_speedup_<name>_short_spin`) and, for the preset when it runs
    several threads, one thread (`train_speedup_preset_1_thread`): stock may be faster there."""
    variants = [("short_spin", dict(base, kind="train_pair", env=SHORT_SPIN_ENV))]
    if name == "preset" and base["threads"] != 1:
        variants.append(("1_thread", dict(base, kind="train_pair", threads=1)))
    for label, case in variants:
        pair = run_case(case)
        results["cases"][f"train_{name}_pair_{label}"] = pair
        ratio = pair["step_s_stock"] / pair["step_s_fast"]
        results[f"train_speedup_{name}_{label}"] = ratio
        log(f"  {label.replace('_', ' ')}: stock {pair['step_s_stock']:.3f} s, ours "
            f"{pair['step_s_fast']:.3f} s -> {ratio:.2f}x")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset_conf", default="conf_cpu.yml",
                        help="CPU preset conf (its model and training sections are used)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and a 10 s mixture (development)")
    parser.add_argument("--data_dir", default=None, help="also time BSDDataset batch loading")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every case (default: each conf's num_threads)")
    parser.add_argument("--sdr_mixtures", type=int, default=None,
                        help="mixtures of BSD-2mix test scored by each SDR backend (0 = all "
                             f"411; default: all, {QUICK_SDR_MIXTURES} with --quick)")
    parser.add_argument("--infer_rounds", type=int, default=None,
                        help=f"inference rounds (default: {INFERENCE_ROUNDS}, 1 with --quick)")
    parser.add_argument("--in_process", action="store_true",
                        help="run the cases in this process (quicker start; memory figures "
                             "then include earlier cases)")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run_case"]:  # internal: one case, in the subprocess
        result = _run_case(json.loads(argv[1]))
        print(json.dumps(result))
        return result
    args, conf = parse_stage_args(__doc__.splitlines()[0], argv, _add_arguments)
    try:
        preset, source = read_conf(args.preset_conf), str(args.preset_conf)
    except ConfError as err:
        sys.exit(f"benchmark: CPU preset: {err}")
    results = run_benchmark(conf, preset, quick=args.quick, threads=args.threads,
                            data_dir=args.data_dir, json_path=args.json_path,
                            preset_source=source, isolate=not args.in_process,
                            sdr_mixtures=args.sdr_mixtures, infer_rounds=args.infer_rounds)
    print(f"summary: training {results['train_speedup_thesis']:.2f}x (thesis), "
          f"{results['train_speedup_preset']:.2f}x (preset); inference RTF "
          f"{results['rtf_thesis_ours']:.3f} vs {results['rtf_thesis_stock']:.3f} "
          f"({results['infer_speedup_thesis']:.2f}x; separate.py's default "
          f"{results['infer_speedup_thesis_separation']:.2f}x); SDR eval {results['eval_sdr_speedup']:.1f}x; "
          f"parity {'ok' if results['parity_ok'] else 'FAILED'}")
    return results


if __name__ == "__main__":
    main()
