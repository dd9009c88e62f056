"""Recipe-level test: ./run.sh stages 0-2 on a small subset of the shared dump, then a rerun
that must skip every stage (done-markers)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

SUBSET = ["--species", "[Coereba flaveola, Vireo latimeri, Margarops fuscatus, "
                       "Melopyrrha portoricensis, Todus mexicanus, Quiscalus niger]",
          "--max_per_species", "4",
          "--split_fractions", "{tr: 0.5, cv: 0.25, tt: 0.25}",
          "--hours", "{tr: 0.02, cv: 0.01, tt: 0.01}"]


def run_recipe(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(["./run.sh", "--python", sys.executable, *args], cwd=repo_root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def recipe_data(repo_root, xc_dump, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    data_dir = tmp_path_factory.mktemp("recipe") / "data"
    out = run_recipe(repo_root, "--xc_source", str(xc_dump), "--data_dir", str(data_dir),
                     "--stop_stage", "2", *SUBSET)
    return data_dir, out


def test_stages_0_to_2_write_the_data_sets(recipe_data):
    data_dir, _ = recipe_data
    recordings = pd.read_csv(data_dir / "raw" / "recordings.csv")
    assert 0 < len(recordings) <= 24
    assert set(recordings.genus + " " + recordings.species) <= {
        "Coereba flaveola", "Vireo latimeri", "Margarops fuscatus",
        "Melopyrrha portoricensis", "Todus mexicanus", "Quiscalus niger"}
    assert (data_dir / "raw" / "ATTRIBUTION.md").read_text().count("XC") >= len(recordings)
    clips = pd.read_csv(data_dir / "clips" / "clips.csv")
    assert set(clips.split) == {"tr", "cv", "tt"}
    assert clips.groupby("recording_id").split.nunique().max() == 1
    for n_src in (2, 3):
        root = data_dir / f"BSD-{n_src}mix"
        info = json.loads((root / "dataset.json").read_text())
        assert info["sample_rate"] == 8000 and info["n_src"] == n_src
        assert info["snr_db"] == [-5.0, 5.0]
        for split in ("tr", "cv", "tt"):
            df = pd.read_csv(root / f"{split}.csv")
            assert len(df) == info["splits"][split]["n_mixtures"] > 0
            species = df[[f"source_{k}_species" for k in range(1, n_src + 1)]]
            assert (species.nunique(axis=1) == n_src).all()
            row = df.iloc[0]
            mix, sr = sf.read(root / row.mixture_path, dtype="float32")
            assert sr == 8000 and len(mix) == row.length
            total = sum(sf.read(root / row[f"source_{k}_path"], dtype="float32")[0]
                        for k in range(1, n_src + 1))
            assert abs(mix - total).max() < 1e-6
    assert not list(data_dir.rglob("*.part"))


def test_rerun_skips_finished_stages(repo_root, xc_dump, recipe_data):
    data_dir, _ = recipe_data
    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.csv")}
    out = run_recipe(repo_root, "--xc_source", str(xc_dump), "--data_dir", str(data_dir),
                     "--stop_stage", "2", *SUBSET)
    log = out.stdout + out.stderr
    assert "already done" in log and "up to date" in log and "skipped" in log
    assert before == {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.csv")}


def test_stages_3_and_4_train_and_evaluate_a_tiny_model(repo_root, recipe_data, tmp_path):
    """run.sh stage 3 then stage 4 alone: the derived tag finds the same experiment."""
    data_dir, _ = recipe_data
    tiny = ["--n_filters", "16", "--bn_chan", "8", "--hid_chan", "16", "--skip_chan", "8",
            "--n_blocks", "2", "--n_repeats", "1", "--epochs", "1", "--batch_size", "2",
            "--segment_s", "1.0", "--num_workers", "0", "--n_save_examples", "1",
            "--oracles", "false"]
    common = ["--data_dir", str(data_dir), "--exp_root", str(tmp_path), *tiny]
    run_recipe(repo_root, "--stage", "3", "--stop_stage", "3", *common)
    (exp_dir,) = tmp_path.iterdir()
    assert exp_dir.name.startswith("conf_n_filters16_bn_chan8")
    for name in ("conf.yml", "run_command.txt", "best_model.pth", "best_k_models.json",
                 "checkpoints/last.ckpt"):
        assert (exp_dir / name).is_file(), name
    run_recipe(repo_root, "--stage", "4", "--stop_stage", "4", *common)
    metrics = json.loads((exp_dir / "eval" / "final_metrics.json").read_text())
    tt = json.loads((data_dir / "BSD-2mix" / "dataset.json").read_text())["splits"]["tt"]
    assert metrics["n_utterances"] == tt["n_mixtures"]
    assert np.isfinite(metrics["si_sdr_imp"]) and np.isfinite(metrics["sdr_imp"])
