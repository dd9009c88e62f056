"""Stage 4 (eval.py) on a tiny synthetic BSD-2mix test split with a tiny serialised Conv-TasNet."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import eval as eval_stage
from conftest import TINY_MODEL
from model import make_model
from utils.audio import write_wav
from utils.config import apply_overrides, read_conf, write_conf

SR = 8000
# (source 1 band, source 2 band, source 2 level relative to source 1, duration in s)
MIXTURES = [((300, 1200), (2200, 3600), 0.5, 1.0),
            ((2000, 3500), (200, 1000), 1.0, 0.75),
            ((500, 1500), (2500, 3900), 2.0, 1.25)]


def band_noise(rng: np.random.Generator, n: int, low_hz: float, high_hz: float) -> np.ndarray:
    """Unit-RMS noise with its spectrum in [low_hz, high_hz) only (no DC): sources in disjoint
    bands are exactly orthogonal and zero-mean, so the input SI-SNR has a closed form."""
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spectrum = rng.standard_normal(freqs.shape) + 1j * rng.standard_normal(freqs.shape)
    spectrum[(freqs < low_hz) | (freqs >= high_hz) | (freqs == 0)] = 0
    x = np.fft.irfft(spectrum, n)
    return x / np.sqrt(np.mean(x ** 2))


@pytest.fixture(scope="module")
def tiny_bsd(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """<data_dir>/BSD-2mix/tt.csv with three mixtures (common.md's columns) and dataset.json;
    returns the data dir and each mixture's closed-form input SI-SNR of source 1."""
    data_dir = tmp_path_factory.mktemp("data")
    ds_dir = data_dir / "BSD-2mix"
    rng = np.random.default_rng(0)
    rows, expected_input = [], {}
    for i, (band_1, band_2, level_2, duration_s) in enumerate(MIXTURES):
        n = int(duration_s * SR)
        s1 = 0.1 * band_noise(rng, n, *band_1)
        s2 = 0.1 * level_2 * band_noise(rng, n, *band_2)
        s1, s2 = s1.astype(np.float32), s2.astype(np.float32)
        mixture_id = f"XC{100 + i}_0_XC{200 + i}_0"
        row = {"mixture_id": mixture_id, "mixture_path": f"tt/mix/{mixture_id}.wav",
               "source_1_path": f"tt/s1/{mixture_id}.wav", "source_2_path": f"tt/s2/{mixture_id}.wav",
               "length": n}
        for k, (source, species) in enumerate([(s1, "Coereba flaveola"), (s2, "Tiaris olivaceus")], 1):
            row.update({f"source_{k}_clip_id": f"XC{100 * k + i}_000000000_000010000",
                        f"source_{k}_recording_id": 100 * k + i, f"source_{k}_species": species,
                        f"source_{k}_gain": 1.0, f"source_{k}_snr_db": 0.0 if k == 1 else 20 * np.log10(level_2),
                        f"source_{k}_offset": 0})
            write_wav(ds_dir / row[f"source_{k}_path"], source, SR)
        write_wav(ds_dir / row["mixture_path"], s1 + s2, SR)
        rows.append(row)
        s1_64, s2_64 = s1.astype(np.float64), s2.astype(np.float64)
        expected_input[mixture_id] = 10 * np.log10(np.sum(s1_64 ** 2) / np.sum(s2_64 ** 2))
    pd.DataFrame(rows).to_csv(ds_dir / "tt.csv", index=False)
    (ds_dir / "dataset.json").write_text(json.dumps({"n_src": 2, "sample_rate": SR}))
    return data_dir, expected_input


@pytest.fixture(scope="module")
def tiny_exp(tmp_path_factory, repo_root) -> Path:
    """exp/<tag>/ with a resolved conf.yml and a tiny (untrained) serialised Conv-TasNet."""
    exp_dir = tmp_path_factory.mktemp("exp") / "tiny"
    conf = apply_overrides(read_conf(repo_root / "conf.yml"),
                           {**{k: str(v) for k, v in TINY_MODEL.items()}, "n_src": "2", "sample_rate": str(SR), "n_save_examples": "2"})
    write_conf(conf, exp_dir / "conf.yml")
    torch.manual_seed(0)
    torch.save(make_model(conf).serialize(), exp_dir / "best_model.pth")
    return exp_dir


def si_snr_db(estimate: np.ndarray, reference: np.ndarray) -> float:
    """SI-SNR written out: zero-mean, project on the reference, target/residual energy."""
    estimate = estimate - estimate.mean()
    reference = reference - reference.mean()
    target = (estimate @ reference) / (reference @ reference) * reference
    return 10 * np.log10(np.sum(target ** 2) / np.sum((estimate - target) ** 2))


def test_eval_end_to_end(tiny_bsd, tiny_exp):
    data_dir, expected_input = tiny_bsd
    # Thin CLI: the conf defaults to <exp_dir>/conf.yml; overrides apply on top of it.
    metrics = eval_stage.main(["--data_dir", str(data_dir), "--exp_dir", str(tiny_exp),
                               "--n_save_examples", "2"])
    eval_dir = tiny_exp / "eval"
    assert json.loads((eval_dir / "final_metrics.json").read_text()) == metrics
    assert metrics["n_utterances"] == 3
    assert metrics["checkpoint"] == str(tiny_exp / "best_model.pth")
    assert metrics["data"]["csv"] == str(data_dir / "BSD-2mix" / "tt.csv")
    assert metrics["data"]["dataset"] == {"n_src": 2, "sample_rate": SR}
    assert metrics["sdr_backend"] == "toeplitz"  # conf.yml's default
    assert not list(eval_dir.rglob("*.part"))

    table = pd.read_csv(eval_dir / "per_utterance.csv")
    assert list(table["mixture_id"]) == list(expected_input)
    assert list(table["source_2_species"]) == ["Tiaris olivaceus"] * 3
    assert list(table["source_1_recording_id"]) == [100, 101, 102]
    assert list(table["length"]) == [int(d * SR) for *_, d in MIXTURES]
    # Input SI-SNR of source 1 against the closed form 10 log10(|s1|^2 / |s2|^2).
    np.testing.assert_allclose(table["source_1_input_si_sdr"], list(expected_input.values()), atol=1e-3)
    np.testing.assert_allclose(table["source_2_input_si_sdr"], [-v for v in expected_input.values()],
                               atol=1e-3)
    np.testing.assert_allclose(table["si_sdr_imp"], table["si_sdr"] - table["input_si_sdr"], atol=1e-3)
    np.testing.assert_allclose(table["sdr_imp"], table["sdr"] - table["input_sdr"], atol=1e-3)
    for name in ("si_sdr", "si_sdr_imp", "sdr", "sdr_imp"):
        assert metrics[name] == pytest.approx(table[name].mean(), abs=1e-3)

    # Oracles beside the model: disjoint bands, so the masks separate almost perfectly.
    for name in ("ibm", "irm", "wiener", "fixed"):
        assert metrics["oracle"][name]["si_sdr_imp"] > 15
        assert metrics["oracle"][name]["si_sdr_imp"] == pytest.approx(table[f"{name}_si_sdr_imp"].mean(), abs=1e-3)

    # Two examples: wavs and spectrograms; the saved estimates are aligned to the references,
    # and the table's output SI-SNR is recomputed from them independently.
    example_dirs = sorted(p for p in (eval_dir / "examples").iterdir())
    assert [p.name for p in example_dirs] == sorted(list(expected_input)[:2])
    for example in example_dirs:
        names = {p.name for p in example.iterdir()}
        assert names == {"mixture.wav", "s1.wav", "s2.wav", "s1_estimate.wav", "s2_estimate.wav",
                         "spectrograms.png"}
        assert (example / "spectrograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        row = table.set_index("mixture_id").loc[example.name]
        for k in (1, 2):
            estimate, sr = sf.read(example / f"s{k}_estimate.wav", dtype="float64")
            reference, _ = sf.read(example / f"s{k}.wav", dtype="float64")
            assert sr == SR and estimate.shape == reference.shape == (row["length"],)
            assert si_snr_db(estimate, reference) == pytest.approx(row[f"source_{k}_si_sdr"], abs=1e-2)

    # A rerun with the same model, data and settings is skipped; other settings redo it
    # and leave no examples of the previous run.
    mtime = (eval_dir / "per_utterance.csv").stat().st_mtime_ns
    assert eval_stage.main(["--data_dir", str(data_dir), "--exp_dir", str(tiny_exp),
                            "--n_save_examples", "2"]) == metrics
    assert (eval_dir / "per_utterance.csv").stat().st_mtime_ns == mtime
    eval_stage.main(["--data_dir", str(data_dir), "--exp_dir", str(tiny_exp),
                     "--n_save_examples", "1"])
    assert (eval_dir / "per_utterance.csv").stat().st_mtime_ns != mtime
    assert len(list((eval_dir / "examples").iterdir())) == 1


def test_mir_eval_backend_agrees(tiny_bsd, tiny_exp, tmp_path):
    """The slow reference path (--sdr_backend mir_eval) gives the same SDRs as the fast ones,
    without oracles."""
    data_dir, _ = tiny_bsd
    exp_dir = tmp_path / "tiny"
    exp_dir.mkdir()
    for name in ("conf.yml", "best_model.pth"):
        (exp_dir / name).write_bytes((tiny_exp / name).read_bytes())
    conf = apply_overrides(read_conf(exp_dir / "conf.yml"),
                           {"sdr_backend": "mir_eval", "oracles": "false", "n_save_examples": "0"})
    reference = eval_stage.evaluate(conf, data_dir, exp_dir)
    reference_table = pd.read_csv(exp_dir / "eval" / "per_utterance.csv")
    assert reference["sdr_backend"] == "mir_eval" and reference["oracle"] is None
    assert not (exp_dir / "eval" / "examples").exists()
    assert not any(c.startswith("ibm_") for c in reference_table.columns)
    for backend, tolerance in (("toeplitz", 1e-3), ("fast_bss_eval", 0.05)):  # csv: 4 decimals
        fast = eval_stage.evaluate(apply_overrides(conf, {"sdr_backend": backend}), data_dir, exp_dir)
        fast_table = pd.read_csv(exp_dir / "eval" / "per_utterance.csv")
        assert fast["sdr_backend"] == backend
        for column in ("source_1_sdr", "source_2_sdr", "source_1_input_sdr", "source_2_input_sdr"):
            np.testing.assert_allclose(fast_table[column], reference_table[column], atol=tolerance)
        assert fast["si_sdr"] == pytest.approx(reference["si_sdr"], abs=1e-6)


def test_evaluate_oracles_needs_no_model(tiny_bsd):
    data_dir, _ = tiny_bsd
    result = eval_stage.evaluate_oracles(data_dir, n_src=2, split="tt", sample_rate=SR)
    assert result["n_utterances"] == 3
    assert result["data"]["csv"] == str(data_dir / "BSD-2mix" / "tt.csv")
    assert set(result["oracle"]) == {"ibm", "irm", "wiener", "fixed"}
    for name, scores in result["oracle"].items():
        assert scores["si_sdr_imp"] > 15, name
        assert scores["sdr_imp"] > 15, name


def test_bad_settings_fail_clearly(tiny_bsd, tiny_exp, tmp_path):
    data_dir, _ = tiny_bsd
    conf = read_conf(tiny_exp / "conf.yml")
    with pytest.raises(ValueError, match="sdr_backend"):
        eval_stage.evaluate(apply_overrides(conf, {"sdr_backend": "museval"}), data_dir, tiny_exp)
    with pytest.raises(FileNotFoundError, match="cv.csv"):
        eval_stage.evaluate(apply_overrides(conf, {"eval_on": "cv"}), data_dir, tiny_exp)
    with pytest.raises(FileNotFoundError, match="best_model.pth"):
        eval_stage.evaluate(conf, data_dir, tmp_path)
    with pytest.raises(SystemExit):  # no conf.yml in the experiment dir: argparse error
        eval_stage.main(["--data_dir", str(data_dir), "--exp_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="sdr_backend"):  # a message, not a traceback
        eval_stage.main(["--data_dir", str(data_dir), "--exp_dir", str(tiny_exp),
                         "--sdr_backend", "museval"])
    with pytest.raises(SystemExit, match="BSD-3mix"):
        eval_stage.main(["--data_dir", str(data_dir), "--exp_dir", str(tiny_exp), "--n_src", "3"])
    with pytest.raises(SystemExit, match="8000 Hz"):
        eval_stage.main(["--data_dir", str(data_dir), "--exp_dir", str(tiny_exp),
                         "--sample_rate", "16000"])


def test_a_background_output_is_saved_not_scored(tiny_bsd, tmp_path, repo_root):
    """A model trained with `training.targets: background` has n_src + 1 outputs: the birds
    are scored, the last one is written as the example's background estimate."""
    data_dir, _ = tiny_bsd
    conf = apply_overrides(read_conf(repo_root / "conf.yml"), {
        **{k: str(v) for k, v in TINY_MODEL.items()}, "n_src": "2", "sample_rate": str(SR),
        "n_save_examples": "1", "oracles": "false", "targets": "background",
        "dynamic_mixing": "true"})
    exp_dir = tmp_path / "bg"
    write_conf(conf, exp_dir / "conf.yml")
    torch.manual_seed(0)
    model = make_model(conf)
    assert model.get_model_args()["n_src"] == 3
    package = model.serialize()
    package["infos"]["training_config"] = conf
    torch.save(package, exp_dir / "best_model.pth")
    metrics = eval_stage.main(["--data_dir", str(data_dir), "--exp_dir", str(exp_dir)])
    assert metrics["n_utterances"] == 3
    (example,) = (exp_dir / "eval" / "examples").iterdir()
    assert sorted(p.name for p in example.glob("*.wav")) == [
        "background_estimate.wav", "mixture.wav", "s1.wav", "s1_estimate.wav", "s2.wav",
        "s2_estimate.wav"]
    # The scores are those of the bird outputs.
    mixture, _ = sf.read(str(example / "mixture.wav"), dtype="float32")
    with torch.no_grad():
        outputs = model.eval()(torch.from_numpy(mixture)[None])[0].double().numpy()
    refs = [sf.read(str(example / f"s{k}.wav"))[0] for k in (1, 2)]
    best = max(np.mean([si_snr_db(outputs[p[0]], refs[0]), si_snr_db(outputs[p[1]], refs[1])])
               for p in ((0, 1), (1, 0)))
    row = pd.read_csv(exp_dir / "eval" / "per_utterance.csv").iloc[0]
    assert row["si_sdr"] == pytest.approx(best, abs=1e-3)

    # Without the conf saying so, a model with more outputs than sources is refused.
    del package["infos"]["training_config"]
    torch.save(package, exp_dir / "best_model.pth")
    with pytest.raises(SystemExit, match="3 outputs"):
        eval_stage.main(["--data_dir", str(data_dir), "--exp_dir", str(exp_dir)])
