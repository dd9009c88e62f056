"""Stage 2: build BSD-{n}mix, mixtures of n clips of different bird species (LibriMix-style).

For every number of sources n in `mixtures.n_srcs` and every split with a target duration in
`mixtures.hours`, mixtures are drawn until the split's total mixture duration reaches the
target, and written as

    <data_dir>/BSD-{n}mix/{split}.csv                          metadata, paths relative to it
    <data_dir>/BSD-{n}mix/{split}/{mix,s1..sn}/<mixture_id>.wav   float32 wav
    <data_dir>/BSD-{n}mix/dataset.json                          parameters and per-split figures

Drawing (seeded with common.seed, per data set and split, so each split is reproducible on its
own): clips are drawn uniformly from the split's pool, each from a species (and recording) not
yet in the mixture; a clip combination is never repeated. Levels: the first source is set to
`ref_level_db` dBFS RMS and source k to `ref_level_db + snr_k` with snr_k uniform in
[snr_low_db, snr_high_db] (source 1 has snr 0 dB by definition). Levels are measured on the part
of each clip that is used (the crop in "min" mode, the whole clip in "max" mode), as
wsj0-2mix/LibriMix measure utterances before padding. Finally one common factor scales all
sources down so that neither the mixture nor any source peaks above `max_peak`; the stored
`source_k_gain` includes that factor, so `source_k = gain_k * clip_k[...]` and
`mixture = sum_k source_k` exactly (float32).

`source_k_offset` (samples): in "min" mode, where the crop starts in clip k (the mixture has the
shortest clip's length); in "max" mode, where clip k starts in the mixture (the mixture has the
longest clip's length, zeros elsewhere).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from utils.atomic import atomic_path, atomic_write_text
from utils.audio import AudioError, load_audio, write_wav
from utils.config import Conf, parse_stage_args
from utils.stage_marker import clear_done, is_done, mark_done

logger = logging.getLogger(__name__)

STAGE_NAME = "mixtures"
# Written before the first wav of a data set: wavs found later under the same parameters were
# written from the same (deterministic) metadata, so an interrupted run can keep them.
STARTED_NAME = "mixtures-started"
MODES = ("min", "max")
# Rejected draws in a row (repeated combination, silent crop) after which a split's clip pool is
# taken as exhausted.
MAX_CONSECUTIVE_REJECTIONS = 2000
# Peak protection leaves this relative headroom so that float32 rounding of the scaled sources
# and of their sum can never push a peak above max_peak.
PEAK_MARGIN = 1e-6


class MixtureError(ValueError):
    """The clips or the configuration cannot give the requested mixtures."""


def dataset_dir(data_dir: str | Path, n_src: int) -> Path:
    return Path(data_dir) / f"BSD-{n_src}mix"


def is_built(ds_dir: Path, params: dict[str, Any]) -> bool:
    """Built with exactly these parameters (done-marker and dataset.json present)."""
    return is_done(ds_dir, STAGE_NAME, params) and (ds_dir / "dataset.json").is_file()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_clips(clips_csv: str | Path, sample_rate: int, splits: Sequence[str] | None = None
               ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Read stage 1's clips.csv and decode every clip into memory (the pool is small).

    Clips that cannot be decoded are left out with a warning. Returns the usable clips (sorted
    by clip_id, so that row order in the csv does not matter) and {clip_id: float32 audio};
    with `splits`, only those splits' clips.
    """
    clips_csv = Path(clips_csv)
    if not clips_csv.is_file():
        raise MixtureError(f"{clips_csv} not found: run stage 1 (local/clips.py) first")
    clips = pd.read_csv(clips_csv, dtype={"clip_id": str, "recording_id": str,
                                          "species": str, "split": str, "path": str})
    missing = {"clip_id", "recording_id", "species", "split", "path"} - set(clips.columns)
    if missing:
        raise MixtureError(f"{clips_csv}: missing columns {sorted(missing)}")
    if clips["clip_id"].duplicated().any():
        raise MixtureError(f"{clips_csv}: duplicate clip_id values")
    if splits is not None:
        clips = clips[clips["split"].isin(list(splits))]
    clips = clips.sort_values("clip_id", kind="stable").reset_index(drop=True)
    audio: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for clip_id, rel_path in tqdm(zip(clips["clip_id"], clips["path"]), total=len(clips),
                                  desc="load clips", unit="clip", leave=False):
        try:
            audio[clip_id] = load_audio(clips_csv.parent / rel_path, sample_rate)
        except AudioError as err:
            bad.append(clip_id)
            logger.warning("skipping clip %s: %s", clip_id, err)
    if bad:
        logger.warning("%d of %d clips unusable and left out", len(bad), len(clips))
        clips = clips[~clips["clip_id"].isin(bad)].reset_index(drop=True)
    return clips, audio


def split_rng(seed: int, n_src: int, split: str) -> np.random.Generator:
    """One generator per (data set, split): a split's mixtures do not depend on the others."""
    return np.random.default_rng([seed, n_src, zlib.crc32(split.encode())])


def render_sources(clips: Sequence[np.ndarray], gains: Sequence[float],
                   offsets: Sequence[int], length: int, mode: str) -> np.ndarray:
    """The scaled references, float32 (n_src, length); see the module doc for offsets."""
    sources = np.zeros((len(clips), length), dtype=np.float32)
    for k, (clip, gain, offset) in enumerate(zip(clips, gains, offsets)):
        if mode == "min":
            segment = clip[offset:offset + length]
            sources[k] = (segment.astype(np.float64) * gain).astype(np.float32)
        else:
            sources[k, offset:offset + clip.shape[0]] = (clip.astype(np.float64) * gain).astype(np.float32)
    return sources


def mix(sources: np.ndarray) -> np.ndarray:
    """The mixture: the float32 sum of the float32 references, so it equals them exactly."""
    return sources.sum(axis=0, dtype=np.float32)


def _check_mixture_conf(conf: Conf) -> dict[str, Any]:
    m = conf["mixtures"]
    if m["mode"] not in MODES:
        raise MixtureError(f"mode must be one of {MODES}, got '{m['mode']}'")
    if m["snr_low_db"] > m["snr_high_db"]:
        raise MixtureError(f"snr_low_db ({m['snr_low_db']}) > snr_high_db ({m['snr_high_db']})")
    if not 0 < m["max_peak"] <= 1:
        raise MixtureError(f"max_peak must be in (0, 1], got {m['max_peak']}")
    return m


# How a mixture's clips are drawn from the pool (ClipPool): uniformly, or balanced so that
# every recording, or every species, comes up as often.
BALANCE = ("clip", "recording", "species")


class ClipPool:
    """One split's clips, and the draw of a mixture from them (stage 2 and dynamic mixing
    draw the same way): clips uniformly, each from a species and recording not yet in the
    mixture; source 1 at `ref_level_db` dBFS RMS, source k at `ref_level_db + snr_k` with
    snr_k uniform in [snr_low_db, snr_high_db]; then peak protection.

    `balance` (dynamic mixing's `training.dm_balance`) changes the first part: "recording" or
    "species" draws each clip with a weight of one over its recording's (species') number of
    clips in the pool, so that every recording (species) is drawn as often, however many
    clips it gave. "clip" (stage 2's draw) keeps the uniform draw, and its exact draws."""

    def __init__(self, clips_df: pd.DataFrame, split: str, clip_audio: Mapping[str, np.ndarray],
                 n_src: int, conf: Conf, balance: str = "clip"):
        self.m = _check_mixture_conf(conf)
        if n_src < 2:
            raise MixtureError(f"a mixture needs at least 2 sources, got n_src={n_src}")
        if balance not in BALANCE:
            raise MixtureError(f"balance {balance!r}: expected one of {', '.join(BALANCE)}")
        self.n_src, self.split = n_src, split
        pool = clips_df[clips_df["split"] == split].reset_index(drop=True)
        self.species = pool["species"].to_numpy(dtype=object)
        n_species = len(set(self.species))
        if n_species < n_src:
            raise MixtureError(f"split '{split}' has {len(pool)} clips of {n_species} species "
                               f"({', '.join(sorted(set(self.species))) or 'none'}); "
                               f"BSD-{n_src}mix needs at least {n_src} species per split (more "
                               "clips, or split_by/split_fractions that give this split more "
                               "species)")
        self.clip_ids = pool["clip_id"].to_numpy(dtype=object)
        self.recordings = pool["recording_id"].astype(str).to_numpy(dtype=object)
        self.species_codes = pd.factorize(self.species)[0]
        self.recording_codes = pd.factorize(self.recordings)[0]
        self.clips = [clip_audio[c] for c in self.clip_ids]
        self.balance = balance
        codes = {"recording": self.recording_codes, "species": self.species_codes}.get(balance)
        self.weights = None if codes is None else 1.0 / np.bincount(codes)[codes]

    def __len__(self) -> int:
        return len(self.clips)

    def pick(self, rng: np.random.Generator) -> list[int]:
        """Clip indices, each from a species and recording not yet in the mixture (fewer than
        n_src when the pool runs out of such clips)."""
        chosen: list[int] = []
        allowed = np.ones(len(self.clips), dtype=bool)
        for _ in range(self.n_src):
            candidates = np.flatnonzero(allowed)
            if candidates.size == 0:
                break
            if self.weights is None:
                index = int(candidates[rng.integers(candidates.size)])
            else:
                weights = self.weights[candidates]
                index = int(candidates[rng.choice(candidates.size, p=weights / weights.sum())])
            chosen.append(index)
            allowed &= (self.species_codes != self.species_codes[index]) & \
                       (self.recording_codes != self.recording_codes[index])
        return chosen

    def audio_of(self, chosen: Sequence[int],
                 audio: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """The audio of the `chosen` clips: the pool's, or `audio` (one array per chosen clip,
        such as dynamic mixing's speed-perturbed copies) where given."""
        if audio is None:
            return [self.clips[i] for i in chosen]
        if len(audio) != len(chosen):
            raise ValueError(f"{len(audio)} audio arrays for {len(chosen)} chosen clips")
        return list(audio)

    def place(self, rng: np.random.Generator, chosen: Sequence[int],
              audio: Sequence[np.ndarray] | None = None
              ) -> tuple[int, list[int], list[float], np.ndarray] | None:
        """(length, offsets, snrs, gains) of a mixture of the `chosen` clips (their `audio`
        where given, see audio_of), or None when a crop is silent (no level to set)."""
        m = self.m
        clips = self.audio_of(chosen, audio)
        lengths = np.array([c.shape[0] for c in clips])
        if m["mode"] == "min":
            length = int(lengths.min())
            offsets = [int(rng.integers(n - length + 1)) for n in lengths]
            segments = [c[o:o + length] for c, o in zip(clips, offsets)]
        else:
            length = int(lengths.max())
            offsets = [int(rng.integers(length - n + 1)) for n in lengths]
            segments = clips
        snrs = [0.0] + [float(rng.uniform(m["snr_low_db"], m["snr_high_db"]))
                        for _ in range(self.n_src - 1)]
        rms = np.array([np.sqrt(np.mean(np.square(s, dtype=np.float64))) for s in segments])
        if not np.all(rms > 1e-8):
            return None
        gains = 10.0 ** ((float(m["ref_level_db"]) + np.array(snrs)) / 20.0) / rms
        sources = render_sources(clips, gains, offsets, length, m["mode"])
        peak = max(float(np.abs(mix(sources)).max()), float(np.abs(sources).max()))
        max_peak = float(m["max_peak"]) * (1 - PEAK_MARGIN)
        if peak > max_peak:
            gains = gains * (max_peak / peak)
        return length, offsets, snrs, gains

    def render(self, chosen: Sequence[int], gains: Sequence[float], offsets: Sequence[int],
               length: int, audio: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """The scaled references of a placed mixture, float32 (n_src, length)."""
        return render_sources(self.audio_of(chosen, audio), gains, offsets, length,
                              self.m["mode"])


def make_mixture_metadata(clips_df: pd.DataFrame, n_src: int, split: str, hours: float,
                          conf: Conf, rng: np.random.Generator,
                          clip_audio: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Draw one split's mixtures (pure: same inputs and generator state, same table).

    `clips_df` has stage 1's columns; `clip_audio` maps clip_id to float32 audio at the data
    set's sample rate (levels and peaks are measured on it). Returns the split's csv table.
    """
    pool = ClipPool(clips_df, split, clip_audio, n_src, conf)
    sample_rate = int(conf["clips"]["sample_rate"])
    target_samples = hours * 3600 * sample_rate
    total_samples = 0
    seen: set[tuple[int, ...]] = set()
    rows: list[dict[str, Any]] = []
    rejections = 0
    while total_samples < target_samples:
        if rejections >= MAX_CONSECUTIVE_REJECTIONS:
            logger.warning("BSD-%dmix %s: clip pool exhausted after %d mixtures (%.2f of %.2f h)",
                           n_src, split, len(rows), total_samples / sample_rate / 3600, hours)
            break
        chosen = pool.pick(rng)
        key = tuple(sorted(chosen))
        if len(chosen) < n_src or key in seen:
            rejections += 1     # a clip combination is never repeated
            continue
        placed = pool.place(rng, chosen)
        if placed is None:
            rejections += 1
            continue
        length, offsets, snrs, gains = placed
        seen.add(key)
        rejections = 0
        mixture_id = f"{split}_{len(rows):06d}"
        row: dict[str, Any] = {"mixture_id": mixture_id,
                               "mixture_path": f"{split}/mix/{mixture_id}.wav"}
        for k in range(1, n_src + 1):
            row[f"source_{k}_path"] = f"{split}/s{k}/{mixture_id}.wav"
        row["length"] = length
        for k, (index, gain, snr, offset) in enumerate(zip(chosen, gains, snrs, offsets), start=1):
            row[f"source_{k}_clip_id"] = pool.clip_ids[index]
            row[f"source_{k}_recording_id"] = pool.recordings[index]
            row[f"source_{k}_species"] = pool.species[index]
            row[f"source_{k}_gain"] = float(gain)
            row[f"source_{k}_snr_db"] = snr
            row[f"source_{k}_offset"] = offset
        rows.append(row)
        total_samples += length
    if not rows:
        raise MixtureError(f"BSD-{n_src}mix {split}: no valid mixture could be drawn")
    return pd.DataFrame(rows)


def summarise_split(metadata: pd.DataFrame, n_src: int, sample_rate: int) -> dict[str, Any]:
    """The per-split figures of dataset.json."""
    def used(column: str) -> int:
        return len(set().union(*(set(metadata[f"source_{k}_{column}"].astype(str))
                                 for k in range(1, n_src + 1))))
    return {"n_mixtures": int(len(metadata)),
            "hours": round(float(metadata["length"].sum()) / sample_rate / 3600, 4),
            "n_species": used("species"),
            "n_recordings": used("recording_id"),
            "n_clips": used("clip_id")}


def _write_mixture(ds_dir: Path, row: Mapping[str, Any], n_src: int, mode: str,
                   clip_audio: Mapping[str, np.ndarray], sample_rate: int) -> int:
    """Write the missing wavs of one mixture; returns how many were written."""
    paths = [ds_dir / row["mixture_path"]] + \
            [ds_dir / row[f"source_{k}_path"] for k in range(1, n_src + 1)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if not missing:
        return 0  # kept from an interrupted run with the same parameters
    sources = render_sources([clip_audio[row[f"source_{k}_clip_id"]] for k in range(1, n_src + 1)],
                             [row[f"source_{k}_gain"] for k in range(1, n_src + 1)],
                             [int(row[f"source_{k}_offset"]) for k in range(1, n_src + 1)],
                             int(row["length"]), mode)
    signals = [mix(sources)] + list(sources)
    for i in missing:
        write_wav(paths[i], signals[i], sample_rate)
    return len(missing)


def write_split(ds_dir: Path, split: str, metadata: pd.DataFrame, n_src: int, mode: str,
                clip_audio: Mapping[str, np.ndarray], sample_rate: int) -> int:
    """Write a split's csv, then its wavs (skipping complete ones); returns wavs written.

    Serial on purpose: writing is disk-bound (threads measured no faster)."""
    with atomic_path(ds_dir / f"{split}.csv") as tmp:
        metadata.to_csv(tmp, index=False)
    for sub in ["mix"] + [f"s{k}" for k in range(1, n_src + 1)]:
        (ds_dir / split / sub).mkdir(parents=True, exist_ok=True)
    written = 0
    for row in tqdm(metadata.to_dict("records"), desc=f"BSD-{n_src}mix {split}", unit="mix"):
        written += _write_mixture(ds_dir, row, n_src, mode, clip_audio, sample_rate)
    return written


def _clean(ds_dir: Path, splits: Sequence[str]) -> None:
    """Remove what stage 2 writes in a data set directory (stale results, other parameters)."""
    clear_done(ds_dir, STAGE_NAME)
    clear_done(ds_dir, STARTED_NAME)
    (ds_dir / "dataset.json").unlink(missing_ok=True)
    for split in splits:
        (ds_dir / f"{split}.csv").unlink(missing_ok=True)
        if (ds_dir / split).is_dir():
            shutil.rmtree(ds_dir / split)


def prepare_dataset(clips_df: pd.DataFrame, clip_audio: Mapping[str, np.ndarray], n_src: int,
                    conf: Conf, data_dir: str | Path, params: dict[str, Any]) -> dict[str, Any]:
    """Build (or resume, or skip) one BSD-{n}mix data set; returns its dataset.json contents."""
    m = _check_mixture_conf(conf)
    ds_dir = dataset_dir(data_dir, n_src)
    if is_built(ds_dir, params):
        info = json.loads((ds_dir / "dataset.json").read_text())
        logger.info("BSD-%dmix: already built with these parameters, skipped (%s)", n_src,
                    _summary_text(info))
        return info
    sample_rate = int(conf["clips"]["sample_rate"])
    hours = {split: float(h) for split, h in m["hours"].items() if float(h) > 0}
    if not hours:
        raise MixtureError("mixtures.hours gives no split a positive duration")
    if not is_done(ds_dir, STARTED_NAME, params):
        _clean(ds_dir, sorted(set(hours) | {"tr", "cv", "tt"}))
        mark_done(ds_dir, STARTED_NAME, params)
    clear_done(ds_dir, STAGE_NAME)
    info: dict[str, Any] = {"sample_rate": sample_rate, "seed": int(conf["common"]["seed"]),
                            "snr_db": [float(m["snr_low_db"]), float(m["snr_high_db"])],
                            "mode": m["mode"], "n_src": n_src, "splits": {}}
    written = 0
    for split, split_hours in hours.items():
        metadata = make_mixture_metadata(clips_df, n_src, split, split_hours, conf,
                                         split_rng(info["seed"], n_src, split), clip_audio)
        written += write_split(ds_dir, split, metadata, n_src, m["mode"], clip_audio,
                               sample_rate)
        info["splits"][split] = summarise_split(metadata, n_src, sample_rate)
    atomic_write_text(ds_dir / "dataset.json", json.dumps(info, indent=1) + "\n")
    mark_done(ds_dir, STAGE_NAME, params)
    clear_done(ds_dir, STARTED_NAME)
    logger.info("BSD-%dmix: %s; %d wavs written -> %s", n_src, _summary_text(info), written, ds_dir)
    return info


def _summary_text(info: Mapping[str, Any]) -> str:
    return ", ".join(f"{split} {s['n_mixtures']} mixtures {s['hours']:.2f} h "
                     f"{s['n_species']} species" for split, s in info["splits"].items())


def prepare_mixtures(conf: Conf, data_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Stage 2: build every data set of `mixtures.n_srcs`; returns {n_src: dataset.json}."""
    m = _check_mixture_conf(conf)
    sample_rate = int(conf["clips"]["sample_rate"])
    clips_csv = Path(data_dir) / "clips" / "clips.csv"
    if not clips_csv.is_file():
        raise MixtureError(f"{clips_csv} not found: run stage 1 (local/clips.py) first")
    # n_srcs lists the data sets to build; it does not change any one of them.
    base_params = {key: value for key, value in m.items() if key != "n_srcs"}
    base_params.update(seed=conf["common"]["seed"], sample_rate=sample_rate,
                       clips_csv_sha256=file_sha256(clips_csv))
    n_srcs = [int(n) for n in m["n_srcs"]]
    pending = [n for n in n_srcs
               if not is_built(dataset_dir(data_dir, n), {**base_params, "n_src": n})]
    clips_df, clip_audio = (load_clips(clips_csv, sample_rate) if pending
                            else (pd.DataFrame(), {}))
    return {n: prepare_dataset(clips_df, clip_audio, n, conf, data_dir,
                               {**base_params, "n_src": n}) for n in n_srcs}


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, Any]]:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data_dir", required=True,
                            help="data directory (reads clips/, writes BSD-{n}mix/)")

    args, conf = parse_stage_args("Stage 2: build the BSD-{n}mix data sets.", argv, add_arguments)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return prepare_mixtures(conf, args.data_dir)
    except MixtureError as err:
        raise SystemExit(f"local.mixtures: {err}") from None


if __name__ == "__main__":
    main()
