"""eval.py's quality breakdown (level over background, species, clean yardstick) and
tools/quality_table.py's rows."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from eval import breakdown, recording_interval
from local.metrics import band_centroid_hz, level_over_background_db
from tools.quality_table import paired_difference, quality_table

SAMPLE_RATE = 8000


def test_level_over_background_measures_the_clips_own_background():
    rng = np.random.default_rng(0)
    n = 2 * SAMPLE_RATE
    noise = 0.01 * rng.standard_normal(n)
    call = np.zeros(n)
    call[:n // 4] = 0.3 * np.sin(2 * np.pi * 2000 * np.arange(n // 4) / SAMPLE_RATE)
    # Zero padding around the clip is not part of its background.
    padded = np.concatenate([np.zeros(5000), call + noise, np.zeros(3000)])
    level = level_over_background_db(padded, SAMPLE_RATE)
    expected = 10 * np.log10(np.sum((call + noise) ** 2) / np.sum(noise ** 2))
    assert level == pytest.approx(expected, abs=0.5)
    assert level_over_background_db(call + 4 * noise, SAMPLE_RATE) < level - 10
    assert np.isnan(level_over_background_db(np.zeros(100), SAMPLE_RATE))


def per_utterance(levels, imps, species):
    rows = []
    for (l1, l2), (i1, i2), (s1, s2) in zip(levels, imps, species):
        rows.append({"source_1_level_over_background_db": l1, "source_2_level_over_background_db": l2,
                     "source_1_si_sdr": i1, "source_2_si_sdr": i2,
                     "source_1_input_si_sdr": 0.0, "source_2_input_si_sdr": 0.0,
                     "source_1_species": s1, "source_2_species": s2,
                     "si_sdr_imp": (i1 + i2) / 2, "sdr_imp": (i1 + i2) / 2 + 1,
                     "ibm_si_sdr_imp": 20.0, "ibm_sdr_imp": 21.0})
    return pd.DataFrame(rows)


def test_breakdown_by_level_species_and_the_clean_yardstick():
    df = per_utterance(levels=[(5, 25), (18, 30), (8, 9)], imps=[(2, 4), (10, 12), (0, 6)],
                       species=[("a", "b"), ("a", "c"), ("b", "c")])
    out = breakdown(df, n_src=2, clean_level_db=15)
    assert out["by_species"]["a"] == {"n_sources": 2, "si_sdr_imp": 6.0}
    assert out["by_level_over_background_db"]["[20.0, inf)"] == {"n_sources": 2, "si_sdr_imp": 8.0}
    assert out["by_level_over_background_db"]["[-inf, 6.0)"]["n_sources"] == 1
    clean = out["clean"]      # only the second mixture has both references >= 15 dB
    assert clean["n_mixtures"] == 1 and clean["si_sdr_imp"] == 11.0 and clean["sdr_imp"] == 12.0
    assert clean["oracle"]["ibm"]["si_sdr_imp"] == 20.0
    assert breakdown(df, 2, clean_level_db=40)["clean"] == {"clean_level_db": 40,
                                                           "n_mixtures": 0}


def test_quality_table_rows_come_from_the_experiment(tmp_path):
    exp = tmp_path / "exp1"
    (exp / "eval").mkdir(parents=True)
    pd.DataFrame({"epoch": [0, 1], "step": [10, 20], "train_minutes": [1.0, 2.5],
                  "val_si_snr_db": [3.0, 4.25], "lr": [1e-3, 0.0]}).to_csv(
        exp / "learning_curve.csv", index=False)
    df = per_utterance(levels=[(18, 30)], imps=[(10, 12)], species=[("a", "c")])
    metrics = {"si_sdr_imp": 6.5, "sdr_imp": 7.25, "oracle": {"ibm": {"si_sdr_imp": 19.9}},
               "breakdown": breakdown(df, 2, 15)}
    (exp / "eval" / "final_metrics.json").write_text(json.dumps(metrics))
    table = quality_table([exp], png=tmp_path / "curves.png")
    assert table.splitlines()[-1] == ("| exp1 | 20 | 2.5 | 4.25 | 6.50 / 7.25 | "
                                      "11.00 / 12.00 (1) | 19.90 / 20.00 | n/a |")
    # An evaluation with the fixed-filter oracle shows it.
    metrics["oracle"]["fixed"] = {"si_sdr_imp": 5.14}
    (exp / "eval" / "final_metrics.json").write_text(json.dumps(metrics))
    assert quality_table([exp]).splitlines()[-1].endswith("| 19.90 / 20.00 | 5.14 |")
    # With eval.py's per-utterance table, the interval over its recordings joins the row.
    recordings_table([2.0, 4.0, 6.0, 8.0]).to_csv(exp / "eval" / "per_utterance.csv", index=False)
    low, high = recording_interval(pd.read_csv(exp / "eval" / "per_utterance.csv"), 2)["si_sdr_imp"]
    assert f"| 6.50 [{low:.2f}, {high:.2f}] / 7.25 |" in quality_table([exp])
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_band_centroid_follows_the_loud_frames():
    rng = np.random.default_rng(1)
    n = 2 * SAMPLE_RATE
    t = np.arange(n) / SAMPLE_RATE
    hiss = 0.001 * rng.standard_normal(n)
    call = np.where(t < 0.5, 0.2 * np.sin(2 * np.pi * 3000 * t), 0.0)
    assert band_centroid_hz(call + hiss, SAMPLE_RATE) == pytest.approx(3000, abs=60)
    rumble = 0.5 * np.sin(2 * np.pi * 40 * t)
    assert band_centroid_hz(call + rumble, SAMPLE_RATE) < 1000
    assert np.isnan(band_centroid_hz(np.zeros(n), SAMPLE_RATE))
    assert np.isnan(band_centroid_hz(np.zeros(10), SAMPLE_RATE))


def test_breakdown_by_band_distance():
    df = per_utterance(levels=[(5, 25), (18, 30), (8, 9)], imps=[(2, 4), (10, 12), (0, 6)],
                       species=[("a", "b"), ("a", "c"), ("b", "c")])
    df["source_1_centroid_hz"] = [2000.0, 500.0, 3000.0]
    df["source_2_centroid_hz"] = [2100.0, 3000.0, 2600.0]
    by_distance = breakdown(df, 2, 15)["by_band_distance_hz"]
    assert by_distance["[0.0, 250.0)"] == {"n_sources": 2, "si_sdr_imp": 3.0}
    assert by_distance["[250.0, 500.0)"] == {"n_sources": 2, "si_sdr_imp": 3.0}
    assert by_distance["[2000.0, inf)"] == {"n_sources": 2, "si_sdr_imp": 11.0}
    # Tables of older evaluations have no centroids: no bins, the rest of the breakdown stands.
    old = breakdown(df.drop(columns=["source_1_centroid_hz", "source_2_centroid_hz"]), 2, 15)
    assert old["by_band_distance_hz"] == {} and old["by_species"]["a"]["n_sources"] == 2


def recordings_table(recording_means, n_mixtures=6, spread=1.0, seed=0):
    """Mixtures whose two sources come from recordings with the given mean SI-SNRi."""
    rng = np.random.default_rng(seed)
    n_rec = len(recording_means)
    rows = []
    for i in range(n_mixtures * n_rec):
        r1, r2 = i % n_rec, (i + 1 + i // n_rec) % n_rec
        v1, v2 = (recording_means[r] + spread * rng.standard_normal() for r in (r1, r2))
        rows.append({"source_1_recording_id": str(100 + r1), "source_2_recording_id": str(100 + r2),
                     "source_1_si_sdr": v1, "source_2_si_sdr": v2,
                     "source_1_input_si_sdr": 0.0, "source_2_input_si_sdr": 0.0,
                     "source_1_sdr": v1 + 1, "source_2_sdr": v2 + 1,
                     "source_1_input_sdr": 0.0, "source_2_input_sdr": 0.0,
                     "si_sdr_imp": (v1 + v2) / 2, "sdr_imp": (v1 + v2) / 2 + 1})
    return pd.DataFrame(rows)


def test_recording_interval_resamples_recordings_not_mixtures():
    df = recordings_table([0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0])
    out = recording_interval(df, n_src=2)
    assert out["n_recordings"] == 8 and out["confidence"] == 0.95
    low, high = out["si_sdr_imp"]
    assert low < df["si_sdr_imp"].mean() < high
    assert out["sdr_imp"] == pytest.approx([low + 1, high + 1])
    # Recordings that differ by 2 dB steps leave the mean uncertain by several dB, however
    # many mixtures reuse them; a mixture-level bootstrap (the standard error below) would not.
    mixture_se = df["si_sdr_imp"].std() / np.sqrt(len(df))
    assert high - low > 5 > 4 * mixture_se
    # Recordings that all score alike leave a narrow interval; reruns give the same interval.
    tight = recording_interval(recordings_table([5.0] * 8, spread=0.5), n_src=2)
    assert tight["si_sdr_imp"][1] - tight["si_sdr_imp"][0] < 0.5
    assert recording_interval(df, 2) == out


def test_recording_interval_needs_recordings():
    df = recordings_table([1.0, 3.0])
    assert recording_interval(df.drop(columns=["source_1_recording_id"]), 2) is None
    df["source_1_recording_id"] = df["source_2_recording_id"] = "7"
    assert recording_interval(df, 2) is None


def test_paired_difference_cancels_what_the_recordings_share(tmp_path):
    # Recordings 2 dB apart: each model's own interval spans several dB, but the second model
    # is 0.5 dB better on every mixture, which the paired interval resolves.
    means = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    reference = recordings_table(means, seed=0)
    reference["mixture_id"] = [f"tt_{i:06d}" for i in range(len(reference))]
    noise = np.random.default_rng(5).normal(0, 0.1, (len(reference), 2))
    other = reference.copy()
    for k in (1, 2):
        for metric in ("si_sdr", "sdr"):
            other[f"source_{k}_{metric}"] += 0.5 + noise[:, k - 1]
    other = other.iloc[::-1]                        # row order does not matter
    diff = paired_difference(reference, other, 2)
    assert diff["si_sdr_imp"] == pytest.approx(0.5 + noise.mean())
    assert diff["sdr_imp"] == pytest.approx(diff["si_sdr_imp"])
    low, high = diff["interval"]["si_sdr_imp"]
    assert 0.3 < low < diff["si_sdr_imp"] < high < 0.7
    own_low, own_high = recording_interval(reference, 2)["si_sdr_imp"]
    assert own_high - own_low > 10 * (high - low)
    with pytest.raises(ValueError, match="same mixtures"):
        paired_difference(reference, other.iloc[1:], 2)
    with pytest.raises(ValueError, match="same mixtures"):
        paired_difference(reference, pd.concat([other, other.iloc[:1]]), 2)
    # In the table, the column gives the difference and its interval.
    exps = []
    for name, table in (("ref", reference), ("new", other)):
        exp = tmp_path / name
        (exp / "eval").mkdir(parents=True)
        table.to_csv(exp / "eval" / "per_utterance.csv", index=False)
        pd.DataFrame({"epoch": [0], "step": [10], "train_minutes": [1.0], "val_si_snr_db": [3.0],
                      "lr": [0.0]}).to_csv(exp / "learning_curve.csv", index=False)
        metrics = {"si_sdr_imp": float(table["si_sdr_imp"].mean()), "sdr_imp": 1.0,
                   "oracle": {"ibm": {"si_sdr_imp": 19.9}},
                   "breakdown": {"clean": {"n_mixtures": 0}}}
        (exp / "eval" / "final_metrics.json").write_text(json.dumps(metrics))
        exps.append(exp)
    lines = quality_table(exps, against=exps[0]).splitlines()
    assert lines[0].endswith("| SI-SNRi against ref [paired 95 % interval] |")
    assert lines[1].count("---") == 9
    assert lines[-1].endswith(f"| {diff['si_sdr_imp']:+.2f} [{low:+.2f}, {high:+.2f}] |")
