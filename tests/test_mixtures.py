"""Stage 2 (local/mixtures.py) on a small synthetic clip pool: tones and noise bursts of a few
species, a few seconds each at 8 kHz, laid out as stage 1 writes them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from local.bsd_dataset import BSDDataset, split_csv
from local.mixtures import (MixtureError, load_clips, main, make_mixture_metadata,
                            prepare_mixtures, split_rng)
from utils.audio import write_wav
from utils.config import apply_overrides, read_conf

SR = 8000
TINY_HOURS = "{tr: 0.01, cv: 0.004, tt: 0.004}"


def write_clip_pool(clips_dir: Path, n_species: int = 5, seed: int = 0) -> Path:
    """clips.csv + wavs: per species, recordings in tr (3), cv (1), tt (1), two clips each."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_species):
        for r, split in enumerate(["tr", "tr", "tr", "cv", "tt"]):
            recording_id = str(100 * (s + 1) + r)
            for c in range(2):
                n = int(rng.uniform(2.0, 4.0) * SR)
                t = np.arange(n) / SR
                bursts = (np.sin(2 * np.pi * rng.uniform(1, 4) * t) > 0).astype(float)
                x = 0.2 * np.sin(2 * np.pi * (600 + 350 * s) * t) * bursts \
                    + 0.02 * rng.standard_normal(n)
                start = 10 * c
                clip_id = f"XC{recording_id}_{start * 1000:09d}_{(start * SR + n) // 8:09d}"
                path = f"wav/{clip_id}.wav"
                write_wav(clips_dir / path, x.astype(np.float32), SR)
                rows.append({"clip_id": clip_id, "recording_id": recording_id,
                             "species": f"Genus species{s}", "english_name": f"Bird {s}",
                             "split": split, "start_s": start, "end_s": start + n / SR,
                             "n_samples": n, "sample_rate": SR, "active_fraction": 0.5,
                             "path": path})
    pd.DataFrame(rows).to_csv(clips_dir / "clips.csv", index=False)
    return clips_dir / "clips.csv"


def make_conf(repo_root: Path, **overrides: str):
    base = {"hours": TINY_HOURS, "sample_rate": str(SR)}
    base.update(overrides)
    return apply_overrides(read_conf(repo_root / "conf.yml"), base)


@pytest.fixture(scope="module")
def clip_pool(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("pool")
    clips_csv = write_clip_pool(data_dir / "clips")
    clips_df, clip_audio = load_clips(clips_csv, SR)
    return data_dir, clips_df, clip_audio


def span_power(wav: np.ndarray, offset: int, clip_length: int, mode: str) -> float:
    """Power of the part of a written source that comes from its clip."""
    part = wav if mode == "min" else wav[offset:offset + clip_length]
    return float(np.mean(np.square(part, dtype=np.float64)))


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("n_src", [2, 3])
def test_metadata_species_snr_lengths(clip_pool, repo_root, mode, n_src):
    _, clips_df, clip_audio = clip_pool
    conf = make_conf(repo_root, mode=mode, snr_low_db="-3.0", snr_high_db="4.0")
    meta = make_mixture_metadata(clips_df, n_src, "tr", 0.01, conf, split_rng(1, n_src, "tr"),
                                 clip_audio)
    assert meta["length"].sum() >= 0.01 * 3600 * SR  # target reached
    assert meta["length"].sum() - meta["length"].iloc[-1] < 0.01 * 3600 * SR  # and no more
    assert meta["mixture_id"].is_unique
    clip_cols = [f"source_{k}_clip_id" for k in range(1, n_src + 1)]
    combos = meta[clip_cols].apply(lambda r: tuple(sorted(r)), axis=1)
    assert combos.is_unique
    tr_clips = set(clips_df.loc[clips_df["split"] == "tr", "clip_id"])
    for _, row in meta.iterrows():
        species = [row[f"source_{k}_species"] for k in range(1, n_src + 1)]
        recordings = [row[f"source_{k}_recording_id"] for k in range(1, n_src + 1)]
        assert len(set(species)) == n_src and len(set(recordings)) == n_src
        assert row["source_1_snr_db"] == 0.0
        lengths = []
        for k in range(1, n_src + 1):
            assert row[f"source_{k}_clip_id"] in tr_clips
            assert -3.0 <= row[f"source_{k}_snr_db"] <= 4.0
            lengths.append(clip_audio[row[f"source_{k}_clip_id"]].shape[0])
        expected = min(lengths) if mode == "min" else max(lengths)
        assert row["length"] == expected
        for k, n in enumerate(lengths, start=1):
            offset = row[f"source_{k}_offset"]
            assert 0 <= offset <= abs(n - expected)
    snrs = meta[[f"source_{k}_snr_db" for k in range(2, n_src + 1)]].to_numpy()
    assert snrs.std() > 0.5  # actually drawn, not constant


def test_metadata_is_deterministic_per_seed(clip_pool, repo_root):
    _, clips_df, clip_audio = clip_pool
    conf = make_conf(repo_root)

    def draw(seed):
        return make_mixture_metadata(clips_df, 2, "cv", 0.004, conf, split_rng(seed, 2, "cv"),
                                     clip_audio)

    pd.testing.assert_frame_equal(draw(5), draw(5))
    assert not draw(5).equals(draw(6))


def test_too_few_species_is_a_clear_error(clip_pool, repo_root):
    _, clips_df, clip_audio = clip_pool
    two_species = clips_df[clips_df["species"].isin(["Genus species0", "Genus species1"])]
    with pytest.raises(MixtureError, match=r"split 'tt' has .* 2 species.*at least 3 species"):
        make_mixture_metadata(two_species, 3, "tt", 0.01, make_conf(repo_root),
                              split_rng(0, 3, "tt"), clip_audio)


def test_exhausted_pool_stops_without_repeating(clip_pool, repo_root, caplog):
    _, clips_df, clip_audio = clip_pool
    pool = clips_df[clips_df["species"].isin(["Genus species0", "Genus species1"]) &
                    (clips_df["split"] == "cv")]  # 2 clips per species: 4 combinations
    with caplog.at_level(logging.WARNING, logger="local.mixtures"):
        meta = make_mixture_metadata(pool, 2, "cv", 1.0, make_conf(repo_root),
                                     split_rng(0, 2, "cv"), clip_audio)
    assert len(meta) == 4
    assert "exhausted" in caplog.text


@pytest.fixture(scope="module", params=["max", "min"])
def built(request, clip_pool, repo_root, tmp_path_factory):
    """Both data sets built from the pool, in each mode."""
    pool_dir = clip_pool[0]
    data_dir = tmp_path_factory.mktemp(f"data_{request.param}")
    (data_dir / "clips").symlink_to(pool_dir / "clips")
    conf = make_conf(repo_root, mode=request.param)
    info = prepare_mixtures(conf, data_dir)
    return data_dir, conf, info


def test_written_mixtures_are_consistent(built, clip_pool):
    data_dir, conf, info = built
    _, _, clip_audio = clip_pool
    m = conf["mixtures"]
    mode = m["mode"]
    assert sorted(info) == [2, 3]
    for n_src in (2, 3):
        ds_dir = data_dir / f"BSD-{n_src}mix"
        assert json.loads((ds_dir / "dataset.json").read_text()) == info[n_src]
        assert info[n_src]["n_src"] == n_src and info[n_src]["mode"] == mode
        assert info[n_src]["snr_db"] == [m["snr_low_db"], m["snr_high_db"]]
        assert info[n_src]["sample_rate"] == SR and info[n_src]["seed"] == conf["common"]["seed"]
        for split in ("tr", "cv", "tt"):
            meta = pd.read_csv(ds_dir / f"{split}.csv")
            figures = info[n_src]["splits"][split]
            assert figures["n_mixtures"] == len(meta)
            assert figures["hours"] == pytest.approx(meta["length"].sum() / SR / 3600, abs=1e-4)
            cols = lambda what: [f"source_{k}_{what}" for k in range(1, n_src + 1)]  # noqa: E731
            assert figures["n_species"] == len(set(meta[cols("species")].to_numpy().ravel()))
            assert figures["n_clips"] == len(set(meta[cols("clip_id")].to_numpy().ravel()))
            assert figures["n_recordings"] == len(
                set(meta[cols("recording_id")].astype(str).to_numpy().ravel()))
            assert sorted(p.name for p in (ds_dir / split / "mix").iterdir()) == \
                sorted(f"{i}.wav" for i in meta["mixture_id"])
            for _, row in meta.iterrows():
                mixture, sr = sf.read(ds_dir / row["mixture_path"], dtype="float32")
                assert sr == SR and mixture.shape == (row["length"],)
                sources = np.stack([sf.read(ds_dir / row[f"source_{k}_path"], dtype="float32")[0]
                                    for k in range(1, n_src + 1)])
                assert np.abs(mixture - sources.sum(axis=0)).max() < 1e-6
                assert np.abs(mixture).max() <= m["max_peak"]
                assert np.abs(sources).max() <= m["max_peak"]
                powers = [span_power(sources[k - 1], row[f"source_{k}_offset"],
                                     clip_audio[row[f"source_{k}_clip_id"]].shape[0], mode)
                          for k in range(1, n_src + 1)]
                assert 10 * np.log10(powers[0]) <= m["ref_level_db"] + 0.01
                for k in range(2, n_src + 1):
                    ratio_db = 10 * np.log10(powers[k - 1] / powers[0])
                    assert ratio_db == pytest.approx(row[f"source_{k}_snr_db"], abs=0.01)
                    assert m["snr_low_db"] <= row[f"source_{k}_snr_db"] <= m["snr_high_db"]
                # The metadata alone rebuilds each source from its clip.
                clip = clip_audio[row["source_1_clip_id"]]
                offset, length = row["source_1_offset"], row["length"]
                rebuilt = np.zeros(length)
                if mode == "min":
                    rebuilt[:] = clip[offset:offset + length] * row["source_1_gain"]
                else:
                    rebuilt[offset:offset + clip.shape[0]] = clip * row["source_1_gain"]
                assert np.abs(rebuilt - sources[0]).max() < 1e-6


def test_bsd_dataset_reads_the_csv(built):
    data_dir, _, _ = built
    for n_src in (2, 3):
        dataset = BSDDataset(split_csv(data_dir, n_src, "tr"), SR, return_id=True)
        assert dataset.n_src == n_src and len(dataset) > 0
        mixture, sources, mixture_id = dataset[0]
        assert sources.shape == (n_src, mixture.shape[0]) and mixture_id == "tr_000000"
        segmented = BSDDataset(split_csv(data_dir, n_src, "cv"), SR, segment_s=1.5)
        mixture, sources = segmented[len(segmented) - 1]
        assert mixture.shape == (int(1.5 * SR),) and sources.shape == (n_src, int(1.5 * SR))


def wav_state(ds_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(ds_dir)): p.stat().st_mtime_ns for p in ds_dir.rglob("*.wav")}


def test_rerun_skips_and_new_parameters_redo(clip_pool, repo_root, tmp_path):
    (tmp_path / "clips").symlink_to(clip_pool[0] / "clips")
    conf = make_conf(repo_root, n_srcs="[2]")
    first = prepare_mixtures(conf, tmp_path)
    ds_dir = tmp_path / "BSD-2mix"
    before = wav_state(ds_dir)
    assert prepare_mixtures(conf, tmp_path) == first
    assert wav_state(ds_dir) == before  # nothing rewritten
    assert not (tmp_path / "BSD-3mix").exists()

    smaller = make_conf(repo_root, n_srcs="[2]", hours="{tr: 0.004, cv: 0.002, tt: 0.002}",
                        snr_high_db="2.0")
    second = prepare_mixtures(smaller, tmp_path)
    assert second[2]["splits"]["tr"]["n_mixtures"] < first[2]["splits"]["tr"]["n_mixtures"]
    meta = pd.read_csv(ds_dir / "tr.csv")
    assert meta["source_2_snr_db"].max() <= 2.0
    # Stale wavs of the first parameters are gone; no .part file is left.
    expected = {f"{split}/{sub}/{i}.wav" for split in ("tr", "cv", "tt")
                for i in pd.read_csv(ds_dir / f"{split}.csv")["mixture_id"]
                for sub in ("mix", "s1", "s2")}
    assert set(wav_state(ds_dir)) == expected
    assert not list(tmp_path.rglob("*.part"))


def test_interrupted_run_resumes_keeping_written_wavs(clip_pool, repo_root, tmp_path):
    (tmp_path / "clips").symlink_to(clip_pool[0] / "clips")
    conf = make_conf(repo_root, n_srcs="[2]")
    info = prepare_mixtures(conf, tmp_path)
    ds_dir = tmp_path / "BSD-2mix"
    reference = {p: sf.read(ds_dir / p)[0] for p in wav_state(ds_dir)}
    # The state a run killed mid-way leaves: started-marker, csvs, some wavs, a .part file.
    marker = ds_dir / ".done.mixtures"
    (ds_dir / ".done.mixtures-started").write_text(marker.read_text())
    marker.unlink()
    (ds_dir / "dataset.json").unlink()
    removed = ["tr/s2/tr_000003.wav", "cv/mix/cv_000000.wav", "tt/s1/tt_000001.wav"]
    for rel in removed:
        (ds_dir / rel).unlink()
    (ds_dir / "tt/s1/tt_000001.wav.part").write_bytes(b"half")
    kept = {p: t for p, t in wav_state(ds_dir).items()}

    assert prepare_mixtures(conf, tmp_path) == info
    after = wav_state(ds_dir)
    assert {p: after[p] for p in kept} == kept  # written wavs were kept, not redone
    assert set(after) == set(reference)
    for rel in removed:
        np.testing.assert_array_equal(sf.read(ds_dir / rel)[0], reference[rel])
    assert not list(ds_dir.rglob("*.part"))
    assert not (ds_dir / ".done.mixtures-started").exists()


def test_cli(clip_pool, repo_root, tmp_path):
    (tmp_path / "clips").symlink_to(clip_pool[0] / "clips")
    info = main(["--conf", str(repo_root / "conf.yml"), "--data_dir", str(tmp_path),
                 "--hours", "{tr: 0.002, cv: 0.002}", "--n_srcs", "[3]", "--seed", "3",
                 "--mode", "min"])
    assert sorted(info) == [3] and sorted(info[3]["splits"]) == ["cv", "tr"]
    assert info[3]["seed"] == 3 and info[3]["mode"] == "min"
    assert (tmp_path / "BSD-3mix" / "cv.csv").is_file()
    with pytest.raises(SystemExit, match="clips.csv not found"):
        main(["--conf", str(repo_root / "conf.yml"), "--data_dir", str(tmp_path / "nothing")])
