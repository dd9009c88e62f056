"""eval.py's quality breakdown (level over background, species, clean yardstick) and
tools/quality_table.py's rows."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from eval import breakdown
from local.metrics import level_over_background_db
from tools.quality_table import quality_table

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
                                      "11.00 / 12.00 (1) | 19.90 / 20.00 |")
    assert (tmp_path / "curves.png").stat().st_size > 0
