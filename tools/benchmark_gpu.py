"""Training benchmark for GPUs: asteroid's ConvTasNet in float32 against the recipe's model.

    python -m tools.benchmark_gpu [--data_dir DIR] [--json PATH] [--quality_steps N]
                                  [--variants a,b,...] [--conf conf.yml] [--key value ...]

In one run, on the same batches (the recipe's training DataLoader over --data_dir's BSD-2mix
train split, fetched once and kept on the device; synthetic chirps without --data_dir):
  * parity on the device: stock weights in ours, float32 with TF32 off (tools.benchmark);
  * training throughput (samples per second; forward, PIT SI-SDR loss, backward, gradient
    clipping, Adam) of each variant at the conf's batch (`batch_size` x `segment_s`):
    stock_fp32 (asteroid's ConvTasNet with torch's defaults and Adam, as asteroid's recipes
    run it: the reference), stock_bf16, ours_fp32, ours_bf16 (bf16 autocast), ours_bf16_sync
    (ours_bf16 reading the loss on the host every step, as a training loop with a host
    check would), ours_bf16_compiled and ours_fp32_compiled (torch.compile),
    ours_bf16_compiled_shifted (the depthwise convolution as sums of shifted copies, which
    the compiler fuses with the elementwise work around it, instead of cuDNN's kernels) and
    ours_bf16_compiled_graphs (that, compiled with CUDA graphs: mode "reduce-overhead"; what
    train.py runs on one GPU with conf.yml's defaults);
    device-event timing, medians of windows of steps, after warm-up (the compiled variants'
    first-step time, i.e. compilation, is reported apart);
  * quality: each of `--quality_variants` trained for the same number of steps from the same
    initial weights on the same batch sequence, then SI-SNR and SI-SNRi (PIT, float32
    inference) on held-out mixtures (the cv split's fixed windows); `stock_fp32_seed2`, stock
    from other initial weights, shows how far two equally good runs land apart;
  * inference real-time factor on a 60 s mixture, stock float32 against ours (fp32 and bf16);
  * with --data_dir: seconds per batch of the recipe's DataLoader (workers, pinned memory),
    against ours_bf16's training step.
Results go to --json after every part (a run cut short keeps what it measured). On a CPU it
runs too: its quality part compares CPU bf16 training with float32 (RESULTS.md, Speed), the tests
run it with tiny configs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tools.benchmark import (INFERENCE_SECONDS, build_model, check_parity, model_kwargs_of,
                             optimizer_for, random_batch, time_data_loading)
from model import compile_in_place
from utils.config import Conf, parse_stage_args


@dataclass(frozen=True)
class Variant:
    impl: str                 # "stock" (asteroid) or "fast" (FastConvTasNet)
    bf16: bool = False        # bf16 autocast for the forward pass
    compiled: bool = False    # torch.compile of the model
    host_sync: bool = False   # read the loss on the host every step
    depthwise: str = "conv"   # ours' depthwise convolution: fast_tasnet.DEPTHWISE_FORMS
    compile_mode: str = "default"   # torch.compile's mode (model.COMPILE_MODES)


VARIANTS = {
    "stock_fp32": Variant("stock"),
    "stock_bf16": Variant("stock", bf16=True),
    "ours_fp32": Variant("fast"),
    "ours_bf16": Variant("fast", bf16=True),
    "ours_bf16_sync": Variant("fast", bf16=True, host_sync=True),
    "ours_bf16_compiled": Variant("fast", bf16=True, compiled=True),
    "ours_fp32_compiled": Variant("fast", compiled=True),
    "ours_bf16_compiled_shifted": Variant("fast", bf16=True, compiled=True, depthwise="shifted"),
    "ours_bf16_compiled_graphs": Variant("fast", bf16=True, compiled=True, depthwise="shifted",
                                         compile_mode="reduce-overhead"),
}
REFERENCE = "stock_fp32"
DEFAULT_QUALITY_VARIANTS = ("stock_fp32", "stock_fp32_seed2", "ours_bf16", "ours_bf16_compiled_graphs")
# Throughput timing: warm-up steps, then windows of steps between two device events.
WARMUP_STEPS = 5
TIMED_WINDOWS = 5
STEPS_PER_WINDOW = 10
DEFAULT_QUALITY_STEPS = 1000
EVAL_MIXTURES = 80


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> Callable[[], Callable[[], float]]:
    """start() -> stop(), seconds between them: device events on CUDA, the host clock elsewhere."""
    def start():
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()

            def stop():
                end.record()
                end.synchronize()
                return begin.elapsed_time(end) / 1000.0
            return stop
        t0 = time.perf_counter()
        return lambda: time.perf_counter() - t0
    return start


def make_train_step(model: torch.nn.Module, variant: Variant, lr: float, clip: float,
                    device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training step as a closure over the model and its optimizer; returns the loss
    (a device tensor: no host sync unless the variant asks for one)."""
    from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr

    loss_func = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
    optimizer = optimizer_for(variant.impl, model.parameters(), lr)
    if variant.compiled:   # as train.py --compile true does
        new_graph_step = compile_in_place(model, variant.compile_mode, variant.depthwise)
    else:
        new_graph_step = lambda: None  # noqa: E731
        if hasattr(model, "impl"):
            model.depthwise = variant.depthwise
    model.train()

    def step(mixture: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        new_graph_step()
        optimizer.zero_grad(set_to_none=True)
        with matmul_precision(variant):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
                estimates = model(mixture)
            loss = loss_func(estimates.float(), sources)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        optimizer.step()
        if variant.host_sync:
            loss.item()
        return loss.detach()

    return step


@contextmanager
def matmul_precision(variant: Variant):
    """float32 matrix products as each side runs them: ours as train.py sets it on GPUs
    ("high": TF32), stock with torch's default ("highest"; its 1x1 convolutions go through
    cuDNN, which uses TF32 by default all the same)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if variant.impl == "fast" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _new_model(kwargs: dict[str, Any], variant: Variant, init_state: dict, device) -> torch.nn.Module:
    model = build_model(kwargs, variant.impl)
    model.load_state_dict(init_state)
    return model.to(device)


def time_variant(kwargs: dict[str, Any], variant: Variant, init_state: dict,
                 batches: list, lr: float, clip: float, device: torch.device,
                 windows: int = TIMED_WINDOWS, steps_per_window: int = STEPS_PER_WINDOW,
                 warmup: int = WARMUP_STEPS) -> dict[str, Any]:
    """Training throughput of one variant: median seconds per step over timed windows."""
    model = _new_model(kwargs, variant, init_state, device)
    step = make_train_step(model, variant, lr, clip, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = time.perf_counter()
    step(*batches[0])
    _sync(device)
    first_step_s = time.perf_counter() - first
    for i in range(1, warmup):
        step(*batches[i % len(batches)])
    clock, per_step, i = _clock(device), [], warmup
    for _ in range(windows):
        stop = clock()
        for _ in range(steps_per_window):
            loss = step(*batches[i % len(batches)])
            i += 1
        per_step.append(stop() / steps_per_window)
    if not bool(torch.isfinite(loss)):
        raise RuntimeError(f"{variant}: non-finite training loss")
    step_s = statistics.median(per_step)
    batch = batches[0][0].shape[0]
    result = dict(variant=asdict(variant), step_s=step_s, window_step_s=per_step,
                  samples_per_s=batch / step_s, first_step_s=first_step_s, batch=batch)
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


@torch.no_grad()
def score(model: torch.nn.Module, eval_batches: list) -> dict[str, float]:
    """Mean SI-SNR and SI-SNRi (dB, best permutation per mixture) of float32 inference."""
    from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr

    pit = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
    model.eval()
    total, total_input, count = 0.0, 0.0, 0
    for mixture, sources in eval_batches:
        estimates = model(mixture)
        n = mixture.shape[0]
        total += -float(pit(estimates, sources)) * n
        # The mixture as every source's estimate: the input's SI-SNR.
        total_input += -float(pit(mixture.unsqueeze(1).expand_as(sources), sources)) * n
        count += n
    return dict(si_snr_db=total / count, si_snri_db=(total - total_input) / count,
                n_mixtures=count)


def train_and_score(kwargs: dict[str, Any], variant: Variant, init_state: dict, batches: list,
                    eval_batches: list, n_steps: int, lr: float, clip: float,
                    device: torch.device) -> dict[str, Any]:
    """SI-SNR after `n_steps` training steps (the batch sequence repeats when shorter)."""
    model = _new_model(kwargs, variant, init_state, device)
    step = make_train_step(model, variant, lr, clip, device)
    started = time.perf_counter()
    losses = [step(*batches[i % len(batches)]) for i in range(n_steps)]
    last = torch.stack(losses[-min(50, n_steps):]).float().mean()
    result = dict(variant=asdict(variant), steps=n_steps, train_s=time.perf_counter() - started,
                  final_train_loss=float(last))
    result.update(score(model, eval_batches))
    return result


def infer_rtf(kwargs: dict[str, Any], variant: Variant, init_state: dict, seconds: float,
              device: torch.device, reps: int = 5) -> float:
    model = _new_model(kwargs, variant, init_state, device).eval()
    sample_rate = kwargs["sample_rate"]
    mixture, _ = random_batch(kwargs["n_src"], 1, int(seconds * sample_rate), seed=0)
    mixture = mixture.to(device)
    clock, times = _clock(device), []
    with matmul_precision(variant), torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=variant.bf16):
        model(mixture)
        for _ in range(reps):
            stop = clock()
            model(mixture)
            times.append(stop())
    return statistics.median(times) / seconds


def _device_batches(loader, n_batches: int, device: torch.device, epochs: int = 1000) -> list:
    """The first `n_batches` (mixture, sources) of the loader, over as many epochs as needed
    (at most `epochs`), on the device."""
    batches: list = []
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):   # a new shuffle per pass, as Lightning does
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            batches.append(tuple(x.to(device) for x in batch[:2]))
            if len(batches) == n_batches:
                return batches
    return batches


def training_batches(conf: Conf, data_dir: Optional[str | Path], n_batches: int,
                     device: torch.device) -> tuple[list, list, str]:
    """(train batches, held-out batches, their source), on the device."""
    t, n_src = conf["training"], conf["model"]["n_src"]
    if data_dir is None:
        samples = int(t["segment_s"] * conf["clips"]["sample_rate"])
        make = lambda seed: tuple(x.to(device) for x in random_batch(n_src, t["batch_size"], samples, seed))
        return ([make(i) for i in range(n_batches)],
                [make(10_000 + i) for i in range(max(1, EVAL_MIXTURES // t["batch_size"]))],
                "synthetic chirps")
    from train import make_loaders

    torch.manual_seed(conf["common"]["seed"])
    train_loader, val_loader = make_loaders(conf, data_dir)
    train = _device_batches(train_loader, n_batches, device)
    held_out = _device_batches(val_loader, max(1, EVAL_MIXTURES // t["batch_size"]), device,
                               epochs=1)
    return train, held_out, f"{data_dir}: {len(train)} train batches, cv windows"


def _quality_variant(name: str) -> tuple[Variant, int]:
    """A quality run's variant and the seed of its initial weights (`<variant>_seed2`)."""
    base, _, seed = name.partition("_seed")
    return VARIANTS[base], int(seed or 1)


def _failed(results: dict, what: str, err: Exception, save, log) -> None:
    results["failed"][what] = f"{type(err).__name__}: {err}"
    log(f"  {what} FAILED: {type(err).__name__}: {err}")
    save()


def _throughput(name: str, *, kwargs, init_state, batches, lr, clip, device, timing, results,
                save, log) -> None:
    log(f"throughput {name} ...")
    warmup, windows, per_window = timing
    try:
        r = time_variant(kwargs, VARIANTS[name], init_state, batches, lr, clip, device, windows,
                         per_window, warmup)
    except Exception as err:  # one variant failing (e.g. torch.compile) must not end the run
        if name == REFERENCE:
            raise
        return _failed(results, f"throughput {name}", err, save, log)
    results["throughput"][name] = r
    r["speedup"] = r["samples_per_s"] / results["throughput"][REFERENCE]["samples_per_s"]
    log(f"  {name}: {r['samples_per_s']:.1f} samples/s ({1000 * r['step_s']:.1f} ms/step, "
        f"first step {r['first_step_s']:.1f} s"
        + (f", peak {r['peak_memory_mb']:.0f} MB" if "peak_memory_mb" in r else "")
        + f") -> {r['speedup']:.2f}x {REFERENCE}")
    save()


def _quality(name: str, *, kwargs, init_state, batches, eval_batches, n_steps: int, seed: int,
             lr, clip, device, results, save, log) -> None:
    variant, init_seed = _quality_variant(name)
    if init_seed != 1:
        torch.manual_seed(seed + init_seed - 1)
        init_state = build_model(kwargs, "stock").state_dict()
    log(f"quality {name}: {n_steps} steps ...")
    try:
        q = train_and_score(kwargs, variant, init_state, batches, eval_batches, n_steps, lr, clip,
                            device)
    except Exception as err:
        return _failed(results, f"quality {name}", err, save, log)
    results["quality"][name] = q
    if REFERENCE in results["quality"]:
        q["si_snr_minus_reference_db"] = q["si_snr_db"] - results["quality"][REFERENCE]["si_snr_db"]
    log(f"  {name}: SI-SNR {q['si_snr_db']:.2f} dB, SI-SNRi {q['si_snri_db']:.2f} dB "
        f"(train loss {q['final_train_loss']:.2f}, {q['train_s']:.0f} s)"
        + (f", {q['si_snr_minus_reference_db']:+.2f} dB vs {REFERENCE}"
           if "si_snr_minus_reference_db" in q else ""))
    save()


def run_gpu_benchmark(conf: Conf, *, data_dir: Optional[str | Path] = None,
                      variants: tuple[str, ...] = tuple(VARIANTS),
                      quality_variants: tuple[str, ...] = DEFAULT_QUALITY_VARIANTS,
                      quality_steps: int = DEFAULT_QUALITY_STEPS,
                      infer_seconds: float = INFERENCE_SECONDS,
                      timing: tuple[int, int, int] = (WARMUP_STEPS, TIMED_WINDOWS, STEPS_PER_WINDOW),
                      json_path: Optional[str | Path] = None, device: Optional[str] = None,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the variants; returns (and with `json_path` writes, after each part) the figures."""
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = [*variants, *(q.partition("_seed")[0] for q in quality_variants)]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}: expected some of {', '.join(VARIANTS)}")
    if REFERENCE not in variants:
        variants = (REFERENCE, *variants)
    kwargs = model_kwargs_of(conf)
    t, optim = conf["training"], conf["optim"]
    lr, clip = optim["lr"], optim["gradient_clip"]
    results: dict[str, Any] = dict(
        device=str(device_), torch_version=torch.__version__,
        gpu=torch.cuda.get_device_name(device_) if device_.type == "cuda" else None,
        batch=t["batch_size"], segment_s=t["segment_s"], model=kwargs,
        float32_matmul_precision={"stock": "highest", "ours": "high"}, throughput={}, quality={},
        failed={})

    def save():
        if json_path is not None:
            from utils.atomic import atomic_write_text

            atomic_write_text(json_path, json.dumps(results, indent=2, default=str) + "\n")

    warmup, windows, per_window = timing
    n_batches = max(quality_steps, warmup + windows * per_window) if quality_variants else \
        warmup + windows * per_window
    batches, eval_batches, source = training_batches(conf, data_dir, n_batches, device_)
    results["data"] = source
    log(f"device {results['gpu'] or device_}, torch {torch.__version__}; data: {source}")
    torch.manual_seed(conf["common"]["seed"])
    init_state = build_model(kwargs, "stock").state_dict()

    parity = results["parity"] = check_parity(kwargs, seconds=1.0, device=str(device_))
    log(f"parity on {device_.type} (stock weights in ours, float32 without TF32): output "
        f"{parity['output_rel_error']:.1e}, gradients {parity['grad_rel_error']:.1e}; float64 "
        f"output {parity['float64_output_rel_error']:.1e}, worst gradient "
        f"{parity['float64_max_param_grad_rel_error']:.1e} -> {'ok' if parity['ok'] else 'FAILED'}")
    save()

    # Eager variants first, torch.compile's last: compilation time is the least predictable.
    compiled = lambda name: VARIANTS[name.partition("_seed")[0]].compiled  # noqa: E731
    measure = dict(kwargs=kwargs, init_state=init_state, batches=batches, lr=lr, clip=clip,
                   device=device_, results=results, save=save, log=log)
    for stage in (False, True):
        for name in (v for v in variants if compiled(v) == stage):
            _throughput(name, timing=timing, **measure)
        for name in (q for q in quality_variants if compiled(q) == stage):
            _quality(name, eval_batches=eval_batches, n_steps=quality_steps,
                     seed=conf["common"]["seed"], **measure)
        if stage:
            continue
        if infer_seconds > 0:
            rtf = results["inference_rtf"] = {
                name: infer_rtf(kwargs, VARIANTS[name], init_state, infer_seconds, device_)
                for name in ("stock_fp32", "ours_fp32", "ours_bf16")}
            log(f"inference RTF on {infer_seconds:.0f} s: "
                + ", ".join(f"{n} {v:.4f}" for n, v in rtf.items()))
            save()
        if data_dir is not None:
            loading = time_data_loading(conf, data_dir, 20, device_)
            batch_s = results["data_batch_s"] = loading["batch_s"]
            ours = results["throughput"].get("ours_bf16", results["throughput"][REFERENCE])
            results["data_vs_train_step"] = batch_s / ours["step_s"]
            log(f"data: {1000 * batch_s:.1f} ms per batch ({t['num_workers']} workers) = "
                f"{results['data_vs_train_step']:.2f} of a training step")
            save()
    return results


def _split(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_dir", default=None, help="BSD-2mix data (default: synthetic)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the figures here")
    parser.add_argument("--variants", type=_split, default=tuple(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--quality_variants", type=_split, default=DEFAULT_QUALITY_VARIANTS,
                        help="trained then scored; '<variant>_seed2': other initial weights")
    parser.add_argument("--quality_steps", type=int, default=DEFAULT_QUALITY_STEPS)
    parser.add_argument("--infer_seconds", type=float, default=INFERENCE_SECONDS)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args, conf = parse_stage_args(__doc__.splitlines()[0], argv, _add_arguments)
    if not torch.cuda.is_available():
        print("benchmark_gpu: no CUDA device; running on CPU (no GPU figures)", file=sys.stderr)
    return run_gpu_benchmark(conf, data_dir=args.data_dir, variants=args.variants,
                             quality_variants=args.quality_variants,
                             quality_steps=args.quality_steps, infer_seconds=args.infer_seconds,
                             json_path=args.json_path)


if __name__ == "__main__":
    main()
