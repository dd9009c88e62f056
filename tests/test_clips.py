"""Stage 1 (local/clips.py, local/activity.py): vocalisation clips and the split."""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from scipy.signal import butter, sosfilt

from local.activity import MIN_NOISE_PROFILE_S, background_samples, band_energy_db, \
    check_conf_clips, denoise, detect_vocalisations, fallback_bands, find_vocalisations, \
    find_vocalisations_in_band
from local.clips import CLIP_COLUMNS, NO_VOCALISATION, REJECT_COLUMNS, assign_splits, \
    cut_recording, main, prepare_clips, remove_rumble
from utils.audio import load_audio
from utils.config import read_conf

# Short real recordings of three species that hold calls.
REAL_IDS = ("308514", "344046", "362031")
RECORDING_COLUMNS = ["id", "genus", "species", "english_name", "recordist", "licence", "quality",
                     "type", "background_species", "length_s", "group", "country", "url", "path"]
# Seconds: a call, two short calls 0.7 s apart, a song longer than clip_max_s, a lone short call.
BURSTS = [(1.0, 3.0), (6.0, 6.3), (7.0, 7.3), (10.0, 20.0), (22.6, 23.0)]


@pytest.fixture(scope="module")
def conf(repo_root):
    return read_conf(repo_root / "conf.yml")


def with_clips(conf, **values):
    conf = copy.deepcopy(conf)
    conf["clips"].update(values)
    return conf


def burst_signal(sample_rate: int, duration_s: float, bursts, seed: int = 0) -> np.ndarray:
    """Low-level white noise with 3 kHz tone bursts (10 ms fades) at known places."""
    rng = np.random.default_rng(seed)
    x = 1e-3 * rng.standard_normal(int(duration_s * sample_rate))
    for start_s, end_s in bursts:
        start, end = int(start_s * sample_rate), int(end_s * sample_rate)
        t = np.arange(end - start) / sample_rate
        envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        x[start:end] += 0.1 * envelope * np.sin(2 * np.pi * 3000 * t)
    return x.astype(np.float32)


@pytest.mark.parametrize("sample_rate", [8000, 16000, 22050])
def test_clips_cover_bursts_at_their_times(conf, sample_rate):
    c = conf["clips"]
    x = burst_signal(sample_rate, 26.0, BURSTS)
    clips = find_vocalisations(x, sample_rate, c)
    spans = sorted((s / sample_rate, e / sample_rate) for s, e, _ in clips)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "clips overlap"
    tol = 2 * c["frame_ms"] / 1000 + 1e-3
    ctx = c["context_s"]

    # A 2 s burst: its span plus context.
    (s0, e0), = [sp for sp in spans if sp[1] < 4.5]
    assert s0 == pytest.approx(1.0 - ctx, abs=tol)
    assert e0 == pytest.approx(3.0 + ctx, abs=tol)
    # Two short calls, each widened symmetrically to clip_min_s; the overlap is merged.
    (s1, e1), = [sp for sp in spans if 4.5 < sp[0] < 9.0]
    assert s1 == pytest.approx((6.0 + 6.3) / 2 - c["clip_min_s"] / 2, abs=tol)
    assert e1 == pytest.approx((7.0 + 7.3) / 2 + c["clip_min_s"] / 2, abs=tol)
    # A lone short call: widened to exactly clip_min_s around it.
    (s2, e2), = [sp for sp in spans if sp[0] > 21.0]
    assert e2 - s2 == pytest.approx(c["clip_min_s"], abs=1.5 / sample_rate)
    assert (s2 + e2) / 2 == pytest.approx(22.8, abs=tol)
    # A 10 s song: cut into near-equal contiguous parts of at most clip_max_s.
    parts = [sp for sp in spans if 9.0 < sp[0] < 21.0]
    assert len(parts) == int(np.ceil((10.0 + 2 * ctx) / c["clip_max_s"]))
    assert parts[0][0] == pytest.approx(10.0 - ctx, abs=tol)
    assert parts[-1][1] == pytest.approx(20.0 + ctx, abs=tol)
    lengths = [e - s for s, e in parts]
    assert max(lengths) <= c["clip_max_s"] and max(lengths) - min(lengths) < 2 / sample_rate
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert len(spans) == 3 + len(parts)
    assert all(f >= c["min_active_fraction"] for _, _, f in clips)


def test_noise_and_silence_give_no_clips(conf):
    c, sr = conf["clips"], conf["clips"]["sample_rate"]
    rng = np.random.default_rng(1)
    white = 1e-2 * rng.standard_normal(20 * sr)
    t = np.arange(20 * sr) / sr
    # Brown-ish noise with a slow +-2 dB swell, like wind.
    brown = np.cumsum(rng.standard_normal(20 * sr)) * 1e-4 * (1 + 0.3 * np.sin(2 * np.pi * 0.2 * t))
    brown -= np.convolve(brown, np.ones(401) / 401, mode="same")
    # Digital silence, then constant noise (the floor must ignore the zeros).
    padded = np.concatenate([np.zeros(10 * sr), 1e-3 * rng.standard_normal(10 * sr)])
    # A quiet stretch (15 s, 20 dB down) holding faint 1 s rustles 12 dB over it, then the
    # usual background: the floor must not drop to the quiet stretch's level.
    quiet_stretch = 1e-2 * rng.standard_normal(100 * sr)
    quiet_stretch[:15 * sr] *= 0.1
    for start_s in range(1, 15, 2):
        quiet_stretch[start_s * sr:(start_s + 1) * sr] *= 4.0
    # Crackle: 96 ms noise bursts 11 dB up, twice a second; active frames, but the clip as a
    # whole is not loud enough over the floor.
    crackle = 1e-2 * rng.standard_normal(30 * sr)
    burst = int(0.096 * sr)
    for start in range(0, 30 * sr - burst, sr // 2):
        crackle[start:start + burst] *= 10 ** (11 / 20)
    for x in (white, brown, padded, np.zeros(20 * sr), quiet_stretch, crackle):
        assert find_vocalisations(x.astype(np.float32), sr, c) == []


def song_filled_recording(sample_rate: int, seed: int = 0) -> np.ndarray:
    """8 s of song all through: 0.15 s syllables (2.6-3.2 kHz sweeps) every 0.17 s, over loud
    noise at 0.8-1.4 kHz and a faint hiss. Over the whole band the low noise buries the song."""
    rng = np.random.default_rng(seed)
    n = 8 * sample_rate
    band = butter(4, [800, 1400], btype="band", fs=sample_rate, output="sos")
    x = 0.05 * sosfilt(band, rng.standard_normal(n)) + 1e-3 * rng.standard_normal(n)
    syllable, step = int(0.15 * sample_rate), int(0.17 * sample_rate)
    t = np.arange(syllable) / sample_rate
    for k, start in enumerate(range(int(0.1 * sample_rate), n - syllable, step)):
        f0 = 2800 + 200 * np.sin(k)
        x[start:start + syllable] += 0.02 * np.hanning(syllable) * np.sin(
            2 * np.pi * (f0 + 1500 * t) * t)
    return x.astype(np.float32)


@pytest.mark.parametrize("sample_rate", [8000, 16000])
def test_song_filling_a_short_recording_is_found_in_its_band(conf, sample_rate):
    c = conf["clips"]
    x = song_filled_recording(sample_rate)
    assert find_vocalisations_in_band(x, sample_rate, c)[0] == []   # the whole band alone
    clips = find_vocalisations(x, sample_rate, c)
    assert sum(end - start for start, end, _ in clips) >= 6 * sample_rate
    assert find_vocalisations(x, sample_rate, {**c, "fallback_bands_hz": []}) == []


def test_coloured_noise_gives_no_clip_in_any_band(conf):
    """Noise only: pink noise, and crackle whose bursts lie inside one fallback band."""
    c, sr = conf["clips"], conf["clips"]["sample_rate"]
    rng = np.random.default_rng(4)
    n = 30 * sr
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum[1:] /= np.sqrt(np.fft.rfftfreq(n, 1 / sr)[1:])
    spectrum[0] = 0
    pink = np.fft.irfft(spectrum, n)
    pink *= 1e-2 / pink.std()
    band = butter(4, [2000, 3500], btype="band", fs=sr, output="sos")
    bursts = 3e-2 * sosfilt(band, rng.standard_normal(n))
    crackle = 1e-2 * rng.standard_normal(n)
    burst = int(0.096 * sr)
    for start in range(0, n - burst, sr // 2):
        crackle[start:start + burst] += bursts[start:start + burst]
    for x in (pink, crackle):
        assert find_vocalisations(x.astype(np.float32), sr, c) == []


def test_fallback_bands_are_capped_and_checked(conf):
    c = conf["clips"]
    bands = {**c, "fallback_bands_hz": [[1600, 3200], [2500, 4000], [3200, 6400], [9000, 12000]]}
    # 3800 Hz cap: [3200, 6400] keeps less than half its width, [9000, 12000] nothing.
    assert fallback_bands(bands, 8000) == [(1600, 3200), (2500, 3800)]
    assert fallback_bands(bands, 16000) == [(1600, 3200), (2500, 4000), (3200, 6400)]
    for bad in ([[3000, 2000]], [[1000]], "1000-2000", [[-5, 100]]):
        with pytest.raises(ValueError, match="fallback_bands_hz"):
            check_conf_clips({**c, "fallback_bands_hz": bad})


def low_share(x: np.ndarray, sample_rate: int, below_hz: float = 100.0) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    return float(spectrum[np.fft.rfftfreq(len(x), 1 / sample_rate) < below_hz].sum()
                 / spectrum.sum())


def test_remove_rumble_keeps_the_bird_in_place(conf):
    sr = 8000
    t = np.arange(4 * sr) / sr
    bird = 0.1 * np.sin(2 * np.pi * 2000 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    rumble = 0.5 * np.sin(2 * np.pi * 35 * t)
    x = (bird + rumble).astype(np.float32)
    y = remove_rumble(x, sr, 100)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert low_share(x, sr) > 0.9 and low_share(y, sr) < 1e-3
    inner = slice(sr, 3 * sr)      # away from the filter's edges
    # Zero phase: the bird is neither delayed nor attenuated (2 kHz is far above 100 Hz).
    assert np.max(np.abs(y[inner] - bird[inner])) < 2e-3
    assert remove_rumble(x, sr, 0) is x
    for bad in (-1, 3900, "100", True):
        with pytest.raises(ValueError, match="highpass_hz"):
            check_conf_clips({**conf["clips"], "highpass_hz": bad})


def test_clips_are_cut_from_the_high_passed_recording(conf, tmp_path):
    """A recording whose bursts sit on loud 40 Hz rumble: the same clips are found with and
    without the high-pass (the activity band lies far above), and with it the clips and their
    denoised versions lose the rumble."""
    sr = 8000
    x = burst_signal(sr, 30.0, BURSTS)
    x = x + 0.3 * np.sin(2 * np.pi * 40 * np.arange(len(x)) / sr).astype(np.float32)
    (tmp_path / "raw").mkdir()
    sf.write(tmp_path / "raw" / "XC1.wav", x, sr, subtype="FLOAT")
    recording = {"id": "1", "genus": "Aus", "species": "bus", "english_name": "A",
                 "path": "XC1.wav"}
    conf_clips = {**conf["clips"], "sample_rate": sr}

    def cut(highpass_hz: float) -> list[dict]:
        out = tmp_path / f"hp{highpass_hz}"
        return cut_recording(recording, tmp_path / "raw", out / "wav",
                             {**conf_clips, "highpass_hz": highpass_hz}, out / "clean")

    rows, unfiltered = cut(100), cut(0)
    assert rows and [r["clip_id"] for r in rows] == [r["clip_id"] for r in unfiltered]
    for row, raw_row in zip(rows, unfiltered):
        clip, _ = sf.read(tmp_path / "hp100" / row["path"])
        clean, _ = sf.read(tmp_path / "hp100" / row["clean_path"])
        raw_clip, _ = sf.read(tmp_path / "hp0" / raw_row["path"])
        assert low_share(clip, sr) < 0.01 and low_share(clean, sr) < 0.01
        assert low_share(raw_clip, sr) > 0.5


def test_denoising_lowers_the_background_of_a_tone_in_noise(conf):
    """3 kHz tone bursts in pink-ish noise: the denoised clip keeps the tone and loses most of
    the noise, with the profile from the recording's own inactive frames."""
    c, sr = conf["clips"], conf["clips"]["sample_rate"]
    rng = np.random.default_rng(5)
    n = 12 * sr
    noise = sosfilt(butter(2, 2000, fs=sr, output="sos"), 2e-2 * rng.standard_normal(n))
    tone = np.zeros(n)
    t = np.arange(2 * sr) / sr
    for start_s in (2, 7):
        tone[start_s * sr:(start_s + 2) * sr] = 0.05 * np.sin(2 * np.pi * 3000 * t) * np.hanning(2 * sr)
    x = (tone + noise).astype(np.float32)
    clips, activity = detect_vocalisations(x, sr, c)
    assert len(clips) == 2
    background = background_samples(x, activity, clips, int(MIN_NOISE_PROFILE_S * sr))
    assert len(background) >= 4 * sr    # most of the 8 s without a tone
    clean = denoise(x, background, sr, c)
    assert clean.shape == x.shape and clean.dtype == np.float32
    for start, end, _ in clips:
        residual_before = np.sum((x[start:end] - tone[start:end]) ** 2)
        residual_after = np.sum((clean[start:end] - tone[start:end]) ** 2)
        assert 10 * np.log10(residual_before / residual_after) > 6
        # The tone stays: its projection keeps most of its energy.
        gain = np.dot(clean[start:end], tone[start:end]) / np.dot(tone[start:end], tone[start:end])
        assert gain > 0.7
    assert denoise(x, background, sr, c).tobytes() == clean.tobytes()   # deterministic
    with pytest.raises(ValueError, match="denoise_prop_decrease"):
        check_conf_clips({**c, "denoise_prop_decrease": 1.5})


def test_real_recordings_give_loud_clips(conf, xc_dump):
    c = conf["clips"]
    sr = c["sample_rate"]
    for recording_id in REAL_IDS:
        x = load_audio(xc_dump / "audio" / f"XC{recording_id}.mp3", sr)
        clips = find_vocalisations(x, sr, c)
        assert clips, f"no clip in XC{recording_id}"
        energy_db, _ = band_energy_db(x, sr, c["frame_ms"], c["band_low_hz"], c["band_high_hz"])
        floor_db = np.percentile(energy_db, c["noise_floor_percentile"])
        for start, end, _ in clips:
            clip_db, _ = band_energy_db(x[start:end], sr, c["frame_ms"], c["band_low_hz"],
                                        c["band_high_hz"])
            snr = 10 * np.log10(np.mean(10 ** (clip_db / 10))) - floor_db
            assert snr >= c["min_clip_snr_db"], (recording_id, start, end, snr)


def recording_row(recording_id: str, genus: str, species: str, path: str) -> dict:
    return {"id": recording_id, "genus": genus, "species": species,
            "english_name": f"{genus} {species} (en)", "recordist": "test",
            "licence": "//creativecommons.org/licenses/by/4.0/", "quality": "A", "type": "song",
            "background_species": "", "length_s": 10, "group": "birds",
            "country": "Puerto Rico", "url": f"//xeno-canto.org/{recording_id}", "path": path}


def make_raw(data_dir: Path, xc_dump: Path, bad_files: bool = True) -> dict[str, str]:
    """A stage-0-like raw/ directory: real mp3s, synthetic flac/ogg/wav, and bad files.
    Returns {recording id: what it is}."""
    raw = data_dir / "raw"
    (raw / "audio").mkdir(parents=True)
    entries = json.loads((xc_dump / "recordings.json").read_text())["recordings"]
    by_id = {r["id"]: r for r in entries}
    rows, kinds = [], {}
    for recording_id in REAL_IDS:
        r = by_id[recording_id]
        name = f"XC{recording_id}.mp3"
        os.symlink(xc_dump / "audio" / name, raw / "audio" / name)
        rows.append(recording_row(recording_id, r["gen"], r["sp"], f"audio/XC{recording_id}.mp3"))
        kinds[recording_id] = "real"
    sr = 22050
    sf.write(raw / "audio" / "XC900001.flac", burst_signal(sr, 12.0, [(2.0, 4.0), (7.0, 9.0)]), sr)
    stereo = np.stack([burst_signal(sr, 8.0, [(1.0, 3.0)], seed=2)] * 2, axis=1)
    sf.write(raw / "audio" / "XC900002.ogg", stereo, sr)
    rows.append(recording_row("900001", "Synthetica", "flac", "audio/XC900001.flac"))
    rows.append(recording_row("900002", "Synthetica", "ogg", "audio/XC900002.ogg"))
    kinds.update({"900001": "synthetic", "900002": "synthetic"})
    if bad_files:
        rng = np.random.default_rng(3)
        (raw / "audio" / "XC900010.mp3").write_bytes(rng.bytes(5000))
        (raw / "audio" / "XC900011.mp3").write_bytes(b"")
        nan_audio = burst_signal(8000, 5.0, [(1.0, 3.0)])
        nan_audio[100:200] = np.nan
        sf.write(raw / "audio" / "XC900012.wav", nan_audio, 8000, subtype="FLOAT")
        sf.write(raw / "audio" / "XC900013.wav", burst_signal(8000, 0.5, [(0.1, 0.4)]), 8000)
        sf.write(raw / "audio" / "XC900014.wav", np.zeros(8000 * 5, np.float32), 8000)
        sf.write(raw / "audio" / "XC900015.wav",
                 (1e-2 * rng.standard_normal(8000 * 10)).astype(np.float32), 8000)
        for recording_id, kind in [("900010", "corrupt"), ("900011", "empty"), ("900012", "nan"),
                                   ("900013", "short"), ("900014", "silent"), ("900015", "noise")]:
            ext = "mp3" if kind in ("corrupt", "empty") else "wav"
            path = f"audio/XC{recording_id}.{ext}"
            rows.append(recording_row(recording_id, "Badfile", kind, path))
            kinds[recording_id] = kind
    pd.DataFrame(rows, columns=RECORDING_COLUMNS).to_csv(raw / "recordings.csv", index=False)
    return kinds


def check_clips_dir(data_dir: Path, clips: pd.DataFrame, sample_rate: int) -> None:
    """clips.csv agrees with its wav files, and nothing unlisted stays in wav/."""
    out = data_dir / "clips"
    on_disk = pd.read_csv(out / "clips.csv", dtype={"clip_id": str, "recording_id": str})
    assert list(on_disk.columns) == CLIP_COLUMNS
    assert on_disk["clip_id"].tolist() == clips["clip_id"].tolist()
    assert sorted(p.name for p in (out / "wav").iterdir()) == \
        sorted(Path(p).name for p in on_disk["path"])
    assert sorted(p.name for p in (out / "clean").iterdir()) == \
        sorted(Path(p).name for p in on_disk["path"])
    for row in on_disk.itertuples():
        m = re.fullmatch(r"XC(\d+)_(\d{9})_(\d{9})", row.clip_id)
        assert m and m.group(1) == row.recording_id
        assert int(m.group(2)) == round(row.start_s * 1000)
        assert int(m.group(3)) == round(row.end_s * 1000)
        info = sf.info(out / row.path)
        assert (info.samplerate, info.channels, info.subtype) == (sample_rate, 1, "FLOAT")
        assert info.frames == row.n_samples == round((row.end_s - row.start_s) * sample_rate)
        # The denoised clip: same place, same length, no louder than the recorded one.
        assert row.clean_path == f"clean/{row.clip_id}.wav"
        clean, recorded = sf.read(out / row.clean_path)[0], sf.read(out / row.path)[0]
        assert clean.shape == recorded.shape
        assert np.sum(clean ** 2) <= np.sum(recorded ** 2) * 1.01
        assert row.sample_rate == sample_rate
        assert row.split in ("tr", "cv", "tt")
    assert on_disk.groupby("recording_id")["split"].nunique().max() == 1


def test_prepare_clips_rejects_bad_files_and_reruns(conf, xc_dump, tmp_path, capsys):
    kinds = make_raw(tmp_path, xc_dump)
    clips = prepare_clips(conf, tmp_path)
    sr = conf["clips"]["sample_rate"]
    check_clips_dir(tmp_path, clips, sr)
    assert set(clips["recording_id"]) == {i for i, k in kinds.items() if k in ("real", "synthetic")}
    # The flac holds two 2 s bursts 3 s apart: two clips of 2.5 s at the right places.
    flac = clips[clips["recording_id"] == "900001"]
    assert flac["start_s"].tolist() == pytest.approx([1.75, 6.75], abs=0.07)
    assert flac["end_s"].tolist() == pytest.approx([4.25, 9.25], abs=0.07)
    assert (clips.loc[clips["recording_id"] == "900002", "species"] == "Synthetica ogg").all()

    rejects = pd.read_csv(tmp_path / "clips" / "rejects.csv", dtype=str)
    assert list(rejects.columns) == REJECT_COLUMNS
    reasons = dict(zip(rejects["recording_id"], rejects["reason"]))
    assert set(reasons) == {i for i, k in kinds.items() if k not in ("real", "synthetic")}
    assert "cannot decode" in reasons["900010"]
    assert "empty" in reasons["900011"]
    assert "NaN" in reasons["900012"]
    assert "too short" in reasons["900013"]
    assert "silence" in reasons["900014"]
    assert reasons["900015"] == NO_VOCALISATION
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"-> {len(clips)} clips" in summary and "6 recordings rejected" in summary

    # Same parameters: skipped, nothing rewritten.
    wav_times = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "clips" / "wav").iterdir()}
    again = prepare_clips(conf, tmp_path)
    assert "up to date" in capsys.readouterr().out
    assert again["clip_id"].tolist() == clips["clip_id"].tolist()
    assert {p.name: p.stat().st_mtime_ns
            for p in (tmp_path / "clips" / "wav").iterdir()} == wav_times

    # Changed parameters: redone, and the clips of the earlier run are gone.
    changed = prepare_clips(with_clips(conf, context_s=0.4), tmp_path)
    assert "up to date" not in capsys.readouterr().out
    assert set(changed["clip_id"]) != set(clips["clip_id"])
    check_clips_dir(tmp_path, changed, sr)

    # A changed recordings.csv (a recording dropped) is a change too.
    recordings_csv = tmp_path / "raw" / "recordings.csv"
    recordings = pd.read_csv(recordings_csv, dtype=str, keep_default_na=False)
    recordings[recordings["id"] != "900002"].to_csv(recordings_csv, index=False)
    fewer = prepare_clips(with_clips(conf, context_s=0.4), tmp_path)
    assert "900002" not in set(fewer["recording_id"])
    check_clips_dir(tmp_path, fewer, sr)

    # Denoising off is a change too: no clean clips are left, none is listed.
    plain = prepare_clips(with_clips(conf, context_s=0.4, denoise=False), tmp_path)
    assert "up to date" not in capsys.readouterr().out
    assert plain["clip_id"].tolist() == fewer["clip_id"].tolist()
    assert (plain["clean_path"].fillna("") == "").all() and not any((tmp_path / "clips" / "clean").iterdir())


@pytest.mark.parametrize("sample_rate", [16000, 22050])
def test_other_sample_rates_and_cli(conf, xc_dump, tmp_path, repo_root, sample_rate):
    make_raw(tmp_path, xc_dump, bad_files=False)
    main(["--conf", str(repo_root / "conf.yml"), "--data_dir", str(tmp_path),
          "--sample_rate", str(sample_rate), "--split_by", "species"])
    clips = pd.read_csv(tmp_path / "clips" / "clips.csv",
                        dtype={"clip_id": str, "recording_id": str})
    assert len(clips) >= len(REAL_IDS) + 2
    check_clips_dir(tmp_path, clips, sample_rate)
    assert clips.groupby("species")["split"].nunique().max() == 1


def synthetic_clip_table(n_species: int = 30, seed: int = 0) -> pd.DataFrame:
    """Clip rows of many recordings (1 to 4 per species, 1 to 5 clips each)."""
    rng = np.random.default_rng(seed)
    rows, recording = [], 1000
    for k in range(n_species):
        for _ in range(rng.integers(1, 5)):
            recording += 1
            start = 0.0
            for _ in range(rng.integers(1, 6)):
                length = float(rng.uniform(2.0, 6.0))
                rows.append({"clip_id": f"XC{recording}_{round(start * 1000):09d}",
                             "recording_id": str(recording), "species": f"Genus sp{k}",
                             "start_s": start, "end_s": start + length})
                start += length + 1.0
    return pd.DataFrame(rows)


def test_split_by_recording(conf):
    clips = synthetic_clip_table()
    fractions = conf["clips"]["split_fractions"]
    split = assign_splits(clips, "recording", fractions, seed=17)
    assert set(split) == {"tr", "cv", "tt"}
    assert clips.assign(split=split).groupby("recording_id")["split"].nunique().max() == 1
    assert set(clips.loc[split == "tr", "species"]) == set(clips["species"])
    duration = (clips["end_s"] - clips["start_s"]).groupby(split).sum()
    share = duration / duration.sum()
    total = sum(fractions.values())
    for name, fraction in fractions.items():
        assert share[name] == pytest.approx(fraction / total, abs=0.08)
    # Deterministic, whatever the row order.
    assert split.tolist() == assign_splits(clips, "recording", fractions, seed=17).tolist()
    shuffled = clips.sample(frac=1.0, random_state=5)
    assert assign_splits(shuffled, "recording", fractions, seed=17).sort_index().tolist() == \
        split.tolist()


def test_split_by_species(conf):
    clips = synthetic_clip_table()
    fractions = conf["clips"]["split_fractions"]
    split = assign_splits(clips, "species", fractions, seed=17)
    assert clips.assign(split=split).groupby("species")["split"].nunique().max() == 1
    assert split.nunique() == 3
    assert split.tolist() == assign_splits(clips, "species", fractions, seed=17).tolist()
    with pytest.raises(ValueError, match="split_by"):
        assign_splits(clips, "recordist", fractions, seed=17)
    with pytest.raises(ValueError, match="split_fractions"):
        assign_splits(clips, "species", {"train": 1.0}, seed=17)
