"""Stage 1: cut the downloaded recordings into vocalisation clips and split them.

Reads `<data_dir>/raw/recordings.csv` (stage 0), decodes each recording at
`clips.sample_rate`, finds the vocalisations (local/activity.py), writes each as a float32
mono wav under `<data_dir>/clips/wav/` (with `clips.denoise`, also without its background under
`<data_dir>/clips/clean/`, local/activity.py's `denoise`), assigns whole recordings (or whole species) to
tr/cv/tt, and lists the clips in `<data_dir>/clips/clips.csv`. Recordings that give no clip
are listed with the reason in `<data_dir>/clips/rejects.csv`.

    python -m local.clips --conf conf.yml --data_dir data [--key value ...]
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import signal
from tqdm import tqdm

from local.activity import MIN_NOISE_PROFILE_S, background_samples, check_conf_clips, denoise, \
    detect_vocalisations
from utils.atomic import atomic_path
from utils.audio import AudioError, load_audio, write_wav
from utils.config import Conf, parse_stage_args
from utils.stage_marker import clear_done, is_done, mark_done

SPLITS = ("tr", "cv", "tt")
SPLIT_BY = ("recording", "species")
CLIP_COLUMNS = ["clip_id", "recording_id", "species", "english_name", "split", "start_s", "end_s",
                "n_samples", "sample_rate", "active_fraction", "path", "clean_path"]
REJECT_COLUMNS = ["recording_id", "path", "reason"]
RECORDING_COLUMNS = ["id", "genus", "species", "english_name", "path"]
NO_VOCALISATION = "no vocalisation found"
MARKER = "clips"


def clip_id(recording_id: str, start_s: float, end_s: float) -> str:
    """`XC<id>_<start_ms:09d>_<end_ms:09d>`: the clip's place in its recording."""
    return f"XC{recording_id}_{round(start_s * 1000):09d}_{round(end_s * 1000):09d}"


def read_recordings(recordings_csv: Path) -> pd.DataFrame:
    """Stage 0's recordings.csv, every column as text (ids stay as written)."""
    if not recordings_csv.is_file():
        raise FileNotFoundError(f"{recordings_csv} not found: "
                                "run stage 0 (local/download.py) first")
    recordings = pd.read_csv(recordings_csv, dtype=str, keep_default_na=False)
    missing = set(RECORDING_COLUMNS) - set(recordings.columns)
    if missing:
        raise ValueError(f"{recordings_csv}: missing columns {sorted(missing)}")
    return recordings


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decode_recording(path: Path, conf_clips: dict[str, Any]) -> np.ndarray:
    """Mono audio at clips.sample_rate; AudioError for anything unusable about this file."""
    try:
        return load_audio(path, int(conf_clips["sample_rate"]),
                          min_duration_s=conf_clips["clip_min_s"])
    except AudioError:
        raise
    except (OSError, ValueError, RuntimeError, MemoryError) as err:  # any other decoder failure
        raise AudioError(f"{path}: cannot decode audio ({type(err).__name__}: {err})") from None


def remove_rumble(x: np.ndarray, sample_rate: int, cutoff_hz: float) -> np.ndarray:
    """`x` without what lies below `cutoff_hz` (wind, handling and traffic rumble): a
    4th-order Butterworth high-pass run forwards and backwards (scipy's sosfiltfilt), so
    that nothing is delayed and the clips stay where the detector found them. 0: `x` as is."""
    if not cutoff_hz:
        return x
    sos = signal.butter(4, cutoff_hz, "highpass", fs=sample_rate, output="sos")
    return signal.sosfiltfilt(sos, x).astype(x.dtype, copy=False)


def cut_recording(recording: dict[str, str], raw_dir: Path, wav_dir: Path,
                  conf_clips: dict[str, Any], clean_dir: Path | None = None
                  ) -> list[dict[str, Any]]:
    """Decode one recording (high-passed at clips.highpass_hz), write its vocalisation clips
    (and with `clean_dir`, the same clips of the denoised recording), and return their
    clips.csv rows (without split). Raises AudioError when the audio is unusable; other
    errors (a full disk, say) are the stage's, not the file's, and propagate."""
    sample_rate = int(conf_clips["sample_rate"])
    x = remove_rumble(decode_recording(raw_dir / recording["path"], conf_clips), sample_rate,
                      conf_clips["highpass_hz"])
    clips, activity = detect_vocalisations(x, sample_rate, conf_clips)
    clean = None
    if clean_dir is not None and clips:
        noise = background_samples(x, activity, clips, int(MIN_NOISE_PROFILE_S * sample_rate))
        clean = denoise(x, noise, sample_rate, conf_clips)
    rows = []
    for start, end, active_fraction in clips:
        start_s, end_s = start / sample_rate, end / sample_rate
        name = clip_id(recording["id"], start_s, end_s)
        write_wav(wav_dir / f"{name}.wav", x[start:end], sample_rate)
        clean_path = ""
        if clean is not None:
            write_wav(clean_dir / f"{name}.wav", clean[start:end], sample_rate)
            clean_path = f"{clean_dir.name}/{name}.wav"
        rows.append({"clip_id": name, "recording_id": recording["id"],
                     "species": f"{recording['genus']} {recording['species']}",
                     "english_name": recording["english_name"],
                     "start_s": round(start_s, 6), "end_s": round(end_s, 6),
                     "n_samples": end - start, "sample_rate": sample_rate,
                     "active_fraction": round(active_fraction, 4),
                     "path": f"{wav_dir.name}/{name}.wav", "clean_path": clean_path})
    return rows


def _normalised_fractions(fractions: dict[str, float]) -> dict[str, float]:
    unknown = set(fractions) - set(SPLITS)
    if unknown or not fractions:
        raise ValueError(f"split_fractions: expected keys among {SPLITS}, got {sorted(fractions)}")
    if any(not np.isfinite(v) or v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split_fractions must be non-negative with a positive sum: {fractions}")
    total = sum(fractions.values())
    return {split: fractions.get(split, 0.0) / total for split in SPLITS}


def assign_splits(clips: pd.DataFrame, split_by: str, fractions: dict[str, float],
                  seed: int) -> pd.Series:
    """Split of each clip (a Series aligned with `clips`).

    Whole groups (recordings, or species) go to tr/cv/tt so that the cumulative clip duration
    of each split approaches its fraction: groups are visited in a seeded random order and each
    goes to the split furthest below its target. With `split_by: recording`, one recording of
    every species goes to tr first, so that every species is seen in training.
    Deterministic for the same clips, fractions and seed.
    """
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got '{split_by}'")
    fractions = _normalised_fractions(fractions)
    if clips.empty:
        return pd.Series([], index=clips.index, dtype=str)
    group_column = "recording_id" if split_by == "recording" else "species"
    duration = (clips["end_s"] - clips["start_s"]).groupby(clips[group_column]).sum()
    groups = sorted(duration.index)
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    targets = {split: fractions[split] * duration.sum() for split in SPLITS}
    totals = dict.fromkeys(SPLITS, 0.0)
    split_of: dict[str, str] = {}

    def put(group: str, split: str) -> None:
        split_of[group] = split
        totals[split] += duration[group]

    if split_by == "recording" and fractions["tr"] > 0:
        species_of = clips.groupby("recording_id")["species"].first()
        seen_species = set()
        for recording in order:
            if species_of[recording] not in seen_species:
                seen_species.add(species_of[recording])
                put(recording, "tr")
    open_splits = [split for split in SPLITS if fractions[split] > 0]
    for group in order:
        if group not in split_of:
            put(group, max(open_splits, key=lambda s: targets[s] - totals[s]))
    return clips[group_column].map(split_of)


def _remove_unlisted_wavs(wav_dir: Path, keep: set[str]) -> int:
    """Remove clip files of earlier runs (and interrupted writes) that are not listed."""
    removed = 0
    if wav_dir.is_dir():
        for path in wav_dir.iterdir():
            if path.is_file() and path.name not in keep:
                path.unlink()
                removed += 1
    return removed


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def summary_line(clips: pd.DataFrame, n_recordings: int, n_rejected: int) -> str:
    parts = []
    for split in SPLITS:
        in_split = clips[clips["split"] == split]
        hours = (in_split["end_s"] - in_split["start_s"]).sum() / 3600
        parts.append(f"{split} {len(in_split)} clips {hours:.2f} h "
                     f"{in_split['species'].nunique()} species")
    return (f"clips: {n_recordings} recordings -> {len(clips)} clips "
            f"({'; '.join(parts)}), {n_rejected} recordings rejected")


def prepare_clips(conf: Conf, data_dir: str | Path) -> pd.DataFrame:
    """Run stage 1 (or skip it when done with the same parameters); returns clips.csv's rows."""
    conf_clips = conf["clips"]
    check_conf_clips(conf_clips)
    _normalised_fractions(conf_clips["split_fractions"])
    if conf_clips["split_by"] not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got '{conf_clips['split_by']}'")
    raw_dir = Path(data_dir) / "raw"
    out_dir = Path(data_dir) / "clips"
    wav_dir = out_dir / "wav"
    clean_dir = out_dir / "clean"
    clips_csv, rejects_csv = out_dir / "clips.csv", out_dir / "rejects.csv"
    recordings_csv = raw_dir / "recordings.csv"
    recordings = read_recordings(recordings_csv)
    params = {"clips": conf_clips, "seed": conf["common"]["seed"],
              "recordings_csv_sha256": file_sha256(recordings_csv)}
    if is_done(out_dir, MARKER, params) and clips_csv.is_file() and rejects_csv.is_file():
        clips = pd.read_csv(clips_csv, dtype={"clip_id": str, "recording_id": str})
        print(f"clips: up to date ({len(clips)} clips in {clips_csv})")
        return clips

    # Nothing of an earlier run stays visible while this one works.
    clear_done(out_dir, MARKER)
    for path in (clips_csv, rejects_csv):
        path.unlink(missing_ok=True)
    wav_dir.mkdir(parents=True, exist_ok=True)
    if conf_clips["denoise"]:
        clean_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    seen_ids: set[str] = set()
    for recording in tqdm(recordings.to_dict("records"), desc="clips", unit="rec"):
        reason = None
        if not recording["id"] or not recording["path"]:
            reason = "no id or no path"
        elif not recording["genus"] or not recording["species"]:
            reason = "no species name"
        elif recording["id"] in seen_ids:
            reason = "duplicate recording id"
        else:
            seen_ids.add(recording["id"])
            try:
                new_rows = cut_recording(recording, raw_dir, wav_dir, conf_clips,
                                         clean_dir if conf_clips["denoise"] else None)
                rows += new_rows
                reason = None if new_rows else NO_VOCALISATION
            except AudioError as err:
                reason = str(err)
        if reason is not None:
            rejects.append({"recording_id": recording["id"], "path": recording["path"],
                            "reason": reason})

    clips = pd.DataFrame(rows, columns=[c for c in CLIP_COLUMNS if c != "split"])
    clips = clips.sort_values("clip_id", kind="stable").reset_index(drop=True)
    clips.insert(CLIP_COLUMNS.index("split"), "split",
                 assign_splits(clips, conf_clips["split_by"], conf_clips["split_fractions"],
                               int(conf["common"]["seed"])))
    _write_csv(clips, clips_csv)
    _write_csv(pd.DataFrame(rejects, columns=REJECT_COLUMNS), rejects_csv)
    _remove_unlisted_wavs(wav_dir, {Path(p).name for p in clips["path"]})
    _remove_unlisted_wavs(clean_dir, {Path(p).name for p in clips["clean_path"] if p})
    mark_done(out_dir, MARKER, params)
    print(summary_line(clips, len(recordings), len(rejects)))
    if clips.empty:
        print(f"clips: warning: no clip at all; see {rejects_csv}", file=sys.stderr)
    return clips


def main(argv: list[str] | None = None) -> None:
    def add_arguments(parser):
        parser.add_argument("--data_dir", default="data",
                            help="data directory (reads raw/, writes clips/)")

    args, conf = parse_stage_args("Stage 1: vocalisation clips, split by recording or species.",
                                  argv, add_arguments)
    try:
        prepare_clips(conf, args.data_dir)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"local.clips: {err}")


if __name__ == "__main__":
    main()
