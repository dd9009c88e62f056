"""tools/benchmark_gpu.py on CPU with a tiny model: every part runs and reports, and training
under bf16 autocast lands where float32 training does (the figures are no GPU measurement)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import TINY_MODEL, needs_cxx
from tools.benchmark_gpu import run_gpu_benchmark
from test_train import write_tiny_bsd
from utils.config import read_conf

EAGER = ("stock_fp32", "ours_fp32", "ours_bf16", "ours_bf16_sync")


@pytest.fixture
def tiny_conf(repo_root):
    conf = read_conf(repo_root / "conf.yml")
    conf["model"].update(TINY_MODEL)
    conf["training"].update(batch_size=2, segment_s=0.5, num_workers=0)
    return conf


def test_gpu_benchmark_runs_every_part_on_cpu(tiny_conf, tmp_path):
    data_dir = tmp_path / "data"
    write_tiny_bsd(data_dir, n_train=6)
    json_path = tmp_path / "gpu.json"
    results = run_gpu_benchmark(
        tiny_conf, data_dir=data_dir, variants=EAGER[1:],
        quality_variants=("stock_fp32", "stock_fp32_seed2", "ours_bf16"), quality_steps=12,
        infer_seconds=1.0, timing=(1, 2, 2), json_path=json_path, log=lambda _: None)
    assert json.loads(json_path.read_text())["throughput"].keys() == results["throughput"].keys()
    assert results["parity"]["ok"] and not results["failed"]
    assert tuple(results["throughput"]) == EAGER  # the reference is always measured, first
    for figures in results["throughput"].values():
        assert figures["samples_per_s"] > 0 and math.isfinite(figures["speedup"])
    assert results["throughput"]["stock_fp32"]["speedup"] == 1.0
    quality = results["quality"]
    assert all(math.isfinite(q["si_snr_db"]) and q["steps"] == 12 for q in quality.values())
    # Same initial weights and batches: bf16 autocast training ends near float32's; other
    # initial weights end elsewhere.
    assert abs(quality["ours_bf16"]["si_snr_minus_reference_db"]) < 0.5
    assert quality["stock_fp32_seed2"]["si_snr_minus_reference_db"] != 0.0
    assert set(results["inference_rtf"]) == {"stock_fp32", "ours_fp32", "ours_bf16"}
    assert results["data_batch_s"] > 0 and results["data"].startswith(str(data_dir))


def test_gpu_benchmark_refuses_unknown_variants(tiny_conf):
    with pytest.raises(ValueError, match="unknown variants.*ours_fp64"):
        run_gpu_benchmark(tiny_conf, variants=("ours_fp64",), quality_variants=(),
                          log=lambda _: None)


@needs_cxx
def test_compiled_variant_with_shifted_depthwise_and_cuda_graphs_trains(tiny_conf,
                                                                          shifted_depthwise_only):
    # On CPU, mode "reduce-overhead" compiles without CUDA graphs; the variant's training
    # loop (a new graph step per training step) and the shifted depthwise form run compiled.
    results = run_gpu_benchmark(
        tiny_conf, variants=(), quality_variants=("stock_fp32", "ours_bf16_compiled_graphs"),
        quality_steps=6, infer_seconds=0, timing=(1, 1, 1), log=lambda _: None)
    assert not results["failed"]
    compiled = results["quality"]["ours_bf16_compiled_graphs"]
    assert compiled["steps"] == 6 and abs(compiled["si_snr_minus_reference_db"]) < 0.5
