"""tools/error_budget.py on a tiny synthetic BSD-2mix split whose birds and backgrounds are
known exactly (the "denoised" clips are the birds themselves)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from local.mixtures import render_sources
from tools.error_budget import ErrorBudgetError, error_budget, main, swapped_blocks

SR = 8000
N_MIX = 4


def write_split(data_dir, background_level: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """clips/ (recorded and clean), BSD-2mix/tt.csv and its wavs; returns, per mixture id,
    its rendered birds and backgrounds."""
    rng = np.random.default_rng(0)
    for sub in ("clips/wav", "clips/clean", "BSD-2mix/tt/mix", "BSD-2mix/tt/s1", "BSD-2mix/tt/s2"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    clip_rows, mix_rows, parts = [], [], {}
    for m in range(N_MIX):
        birds, noises, ids, lengths = [], [], [], []
        for k in range(2):
            n = SR * (2 + k)
            t = np.arange(n) / SR
            bird = 0.3 * np.sin(2 * np.pi * (600 + 900 * k + 150 * m + 300 * t) * t) * (t % 0.5 < 0.3)
            noise = background_level * rng.standard_normal(n)
            cid = f"XC{m}{k}_000000000_{n:09d}"
            sf.write(data_dir / "clips/wav" / f"{cid}.wav", (bird + noise).astype(np.float32), SR, subtype="FLOAT")
            sf.write(data_dir / "clips/clean" / f"{cid}.wav", bird.astype(np.float32), SR, subtype="FLOAT")
            clip_rows.append({"clip_id": cid, "recording_id": f"{m}{k}", "species": f"S{k}",
                              "split": "tt", "path": f"wav/{cid}.wav", "clean_path": f"clean/{cid}.wav"})
            birds.append(bird), noises.append(noise), ids.append(cid), lengths.append(n)
        length, offsets, gains = max(lengths), [0, 0], [1.0, 0.8]
        b = render_sources(birds, gains, offsets, length, "max").astype(np.float64)
        refs = render_sources([x + y for x, y in zip(birds, noises)], gains, offsets, length, "max")
        mid = f"tt_{m:06d}"
        row = {"mixture_id": mid, "mixture_path": f"tt/mix/{mid}.wav", "length": length}
        sf.write(data_dir / "BSD-2mix" / row["mixture_path"], refs.sum(0), SR, subtype="FLOAT")
        for k in (1, 2):
            row[f"source_{k}_path"] = f"tt/s{k}/{mid}.wav"
            sf.write(data_dir / "BSD-2mix" / row[f"source_{k}_path"], refs[k - 1], SR, subtype="FLOAT")
            row.update({f"source_{k}_clip_id": ids[k - 1], f"source_{k}_gain": gains[k - 1],
                        f"source_{k}_offset": offsets[k - 1]})
        mix_rows.append(row)
        parts[mid] = (b, refs.astype(np.float64) - b)
    pd.DataFrame(clip_rows).to_csv(data_dir / "clips/clips.csv", index=False)
    pd.DataFrame(mix_rows).to_csv(data_dir / "BSD-2mix/tt.csv", index=False)
    (data_dir / "BSD-2mix/dataset.json").write_text(json.dumps({"mode": "max"}))
    return parts


def separator_from(parts, make):
    """A separator that looks the mixture up by its energy and returns make(birds, backgrounds)."""
    table = {round(float(np.sum((b + n).sum(0) ** 2)), 3): (b, n) for b, n in parts.values()}

    def separate(mixture):
        return make(*table[round(float(np.sum(mixture ** 2)), 3)])
    return separate


def test_without_background_every_bound_is_perfect(tmp_path):
    write_split(tmp_path, background_level=0.0)
    means = error_budget(tmp_path, SR)["si_sdr_imp"]
    assert min(means.values()) > 50


def test_bounds_order_with_a_background(tmp_path):
    write_split(tmp_path, background_level=0.05)
    means = error_budget(tmp_path, SR)["si_sdr_imp"]
    assert means["background_swapped"] < means["background_shared"] < 40
    assert means["birds_only"] < 40


@pytest.mark.parametrize("error, removed_by", [("leak", "without_bird_leak"),
                                               ("background", "without_background_error")])
def test_model_budget_finds_the_part_that_was_added(tmp_path, error, removed_by):
    parts = write_split(tmp_path, background_level=0.05)

    def make(b, n):
        if error == "leak":
            return (b + n) + 0.3 * b[::-1]
        return b + n[::-1]
    result = error_budget(tmp_path, SR, separate=separator_from(parts, make))
    means = result["si_sdr_imp"]
    assert means["model"] < 25
    assert means[removed_by] > 50 > means["model"] + 10
    other = "without_background_error" if error == "leak" else "without_bird_leak"
    assert means[other] == pytest.approx(means["model"], abs=1.0)
    assert means["without_residual"] == pytest.approx(means["model"], abs=1.0)


def test_perfect_separator_and_no_swaps(tmp_path):
    parts = write_split(tmp_path, background_level=0.05)
    result = error_budget(tmp_path, SR, separate=separator_from(parts, lambda b, n: b + n))
    assert min(result["si_sdr_imp"][k] for k in ("model", "without_residual")) > 50
    assert result["swapped_blocks"]["swapped"] == 0 and result["swapped_blocks"]["blocks"] > 0


def test_swapped_blocks_counts_a_swap_in_mid_mixture():
    rng = np.random.default_rng(3)
    refs = rng.standard_normal((2, 4 * SR))
    est = refs.copy()
    est[:, 2 * SR:] = refs[::-1, 2 * SR:]
    assert swapped_blocks(est, refs, SR) == (2, 4)


def test_missing_denoised_clips_and_split_are_clear_errors(tmp_path):
    write_split(tmp_path, background_level=0.05)
    with pytest.raises(ErrorBudgetError, match="not found: run stage 2"):
        error_budget(tmp_path, SR, split="cv")
    clips = pd.read_csv(tmp_path / "clips/clips.csv").drop(columns="clean_path")
    clips.to_csv(tmp_path / "clips/clips.csv", index=False)
    with pytest.raises(ErrorBudgetError, match="--denoise true"):
        error_budget(tmp_path, SR)


def test_main_prints_and_writes_json(tmp_path, capsys):
    write_split(tmp_path / "data", background_level=0.05)
    result = main(["--data_dir", str(tmp_path / "data"), "--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text()) == result
    assert "background_shared" in capsys.readouterr().out
