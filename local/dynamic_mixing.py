"""Dynamic mixing (as in SpeechBrain's WSJ0Mix recipes): training mixtures drawn on the fly
from stage 1's tr clips instead of read from BSD-{n}mix/tr, so every epoch brings new clip
combinations, new levels and new offsets.

A mixture is drawn exactly as stage 2 draws one (local/mixtures.py's ClipPool: clips of
different species and recordings, levels at a random SNR in [snr_low_db, snr_high_db], peak
protection), then a training window is cut from it as from a stored mixture
(local/bsd_dataset.py's window_start). Item `(index, (seed, epoch))`, as `ShuffledEpochs`
hands them out, is drawn from a generator seeded with (seed, epoch, index): the same run gives
the same mixtures in any process, and a resumed run takes up the same epoch again.

With `speed_perturb` factors (conf `training.speed_perturb`, as SpeechBrain's recipes
perturb speed), each chosen clip is first resampled by one of them, drawn per clip: a factor s
plays it s times faster and s times higher, as a bird of the same kind singing higher or
faster; a new voice for the model at no cost in data.

With `balance` (conf `training.dm_balance`) "recording" or "species", the clips are drawn so
that every recording, or species, comes up as often (ClipPool), where stage 2's uniform draw
over clips gives the recordings that yielded many clips most of the mixtures.

The references are the recorded clips, or with `targets` (conf `training.targets`,
local/targets.py) the denoised clips at the same gains and offsets, or these plus the sum of
the backgrounds as one more source. The mixture is the sum of the recorded clips in every case,
and the same draw gives the same mixture and window whatever the targets.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.signal import resample_poly
from torch.utils.data import Dataset

from local.bsd_dataset import fit_to_segment, window_start
from local.mixtures import ClipPool, MixtureError, load_clips, mix, render_sources
from local.targets import TARGETS
from utils.audio import AudioError, load_audio
from utils.config import Conf

# Draws in a row that may fail (a silent crop) before an item gives up.
MAX_DRAWS = 100
# Mixed into the generator's seed, so dynamic mixing's draws are not stage 2's.
DRAW_TAG = 0x444D
# Speed factors farther from 1 than this turn a song into another kind of sound.
SPEED_RANGE = (0.5, 2.0)
# Resampling ratios are rounded to fractions with at most this denominator (1 % steps and finer).
SPEED_DENOMINATOR = 100


def speed_ratio(factor: float) -> Fraction:
    """The resampling ratio (new length / old length) of a speed `factor`, as a fraction, or
    ValueError outside SPEED_RANGE."""
    low, high = SPEED_RANGE
    if not low <= factor <= high:
        raise ValueError(f"speed factor {factor}: expected one in [{low}, {high}]")
    return Fraction(1 / factor).limit_denominator(SPEED_DENOMINATOR)


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """`audio` played `factor` times faster (and higher): polyphase resampling to about
    len / factor samples (scipy's resample_poly, with its anti-aliasing filter), float32."""
    ratio = speed_ratio(factor)
    if ratio == 1:
        return audio
    return resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)


def clips_csv_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "clips" / "clips.csv"


class DynamicMixDataset(Dataset):
    """`n_items` training mixtures a pass, drawn from the `split` clips of
    `<data_dir>/clips/clips.csv`; items are `(mixture[segment], references[n, segment])`
    (n = n_src, or n_src + 1 with `targets="background"`), with `return_id` also an id naming
    the clips (`dm:<clip>+<clip>`)."""

    def __init__(self, data_dir: str | Path, n_src: int, conf: Conf, segment_s: float,
                 n_items: int, min_source_share: float = 0.0, return_id: bool = False,
                 split: str = "tr", targets: str = "recorded",
                 speed_perturb: Sequence[float] = (), balance: str = "clip"):
        if targets not in TARGETS:
            raise ValueError(f"targets {targets!r}: expected one of {', '.join(TARGETS)}")
        self.csv_path = clips_csv_path(data_dir)
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"{self.csv_path} not found: dynamic mixing draws from "
                                    "stage 1's clips (run stage 1, local/clips.py)")
        self.sample_rate = int(conf["clips"]["sample_rate"])
        clips_df, audio = load_clips(self.csv_path, self.sample_rate, splits=[split])
        if not audio:
            raise MixtureError(f"{self.csv_path}: no usable '{split}' clip to mix")
        self.pool = ClipPool(clips_df, split, audio, n_src, conf, balance=balance)
        self.targets = targets
        self.clean = [] if targets == "recorded" else self.load_clean(clips_df)
        self.n_src, self.n_items = n_src, n_items
        self.segment = int(round(segment_s * self.sample_rate))
        self.min_source_share, self.return_id = min_source_share, return_id
        # Resampled per draw (under a millisecond a clip), so nothing is held in memory.
        self.speed_factors = [float(f) for f in speed_perturb]
        for factor in self.speed_factors:
            speed_ratio(factor)   # checked here, not in a worker

    def load_clean(self, clips_df) -> list[np.ndarray]:
        """The denoised audio of the pool's clips (stage 1's clean_path), in the pool's order."""
        hint = (f"--targets {self.targets} needs stage 1's denoised clips: set --denoise true "
                "and rerun stage 1 (local/clips.py)")
        if "clean_path" not in clips_df.columns:
            raise MixtureError(f"{self.csv_path} has no clean_path column; {hint}")
        clean_of = dict(zip(clips_df["clip_id"], clips_df["clean_path"].fillna("")))
        clean = []
        for clip_id, recorded in zip(self.pool.clip_ids, self.pool.clips):
            if not clean_of[clip_id]:
                raise MixtureError(f"{self.csv_path}: clip {clip_id} has no clean_path; {hint}")
            path = self.csv_path.parent / clean_of[clip_id]
            try:
                audio = load_audio(path, self.sample_rate)
            except (AudioError, OSError) as err:
                raise MixtureError(f"{path}: cannot read the denoised clip ({err}); {hint}") \
                    from None
            if audio.shape != recorded.shape:
                raise MixtureError(f"{path}: {audio.shape[0]} samples, its recorded clip has "
                                   f"{recorded.shape[0]}; {hint}")
            clean.append(audio)
        return clean

    def __len__(self) -> int:
        return self.n_items

    def draw_placed(self, rng: np.random.Generator
                    ) -> tuple[list[int], list[float], list[np.ndarray], int, list[int],
                               np.ndarray]:
        """(clip indices, speed factors, the clips' audio at those speeds, length, offsets,
        gains) of one mixture drawn with `rng` (factors 1 without speed perturbation)."""
        for _ in range(MAX_DRAWS):
            chosen = self.pool.pick(rng)
            if len(chosen) < self.n_src:
                continue
            factors = [1.0] * len(chosen)
            if self.speed_factors:
                factors = [self.speed_factors[k]
                           for k in rng.integers(len(self.speed_factors), size=len(chosen))]
            audio = [change_speed(self.pool.clips[i], f) for i, f in zip(chosen, factors)]
            placed = self.pool.place(rng, chosen, audio)
            if placed is not None:
                length, offsets, _, gains = placed
                return chosen, factors, audio, length, offsets, gains
        raise MixtureError(f"{self.csv_path}: no mixture of {self.n_src} clips could be drawn "
                           f"in {MAX_DRAWS} tries (silent clips?)")

    def references(self, mixture: np.ndarray, recorded: np.ndarray, chosen: list[int],
                   factors: list[float], length: int, offsets: list[int], gains: np.ndarray
                   ) -> np.ndarray:
        """The training references of a drawn mixture for `self.targets`, float32."""
        if self.targets == "recorded":
            return recorded
        clean = render_sources([change_speed(self.clean[i], f) for i, f in zip(chosen, factors)],
                               gains, offsets, length, self.pool.m["mode"])
        if self.targets == "denoised":
            return clean
        background = mixture.astype(np.float64) - clean.sum(axis=0, dtype=np.float64)
        return np.concatenate([clean, background[None].astype(np.float32)])

    def __getitem__(self, key: int | tuple[int, tuple[int, ...]]):
        idx, draw_key = key if isinstance(key, tuple) else (key, None)
        # Without a key, a generator seeded from numpy's global one (as DataLoader workers
        # seed it per epoch).
        seed = [*draw_key, idx, DRAW_TAG] if draw_key is not None else np.random.randint(2**32)
        rng = np.random.default_rng(seed)
        chosen, factors, audio, length, offsets, gains = self.draw_placed(rng)
        recorded = self.pool.render(chosen, gains, offsets, length, audio)
        start = 0
        if recorded.shape[1] > self.segment:
            # The window is chosen on the recorded clips, so that it is the same for every target.
            start = window_start(recorded, self.segment, self.min_source_share, rng)
        mixture = mix(recorded)
        sources = self.references(mixture, recorded, chosen, factors, length, offsets, gains)
        mixture, sources = fit_to_segment(mixture, sources, self.segment, start)
        mixture_t, sources_t = torch.from_numpy(mixture), torch.from_numpy(sources)
        if self.return_id:
            return mixture_t, sources_t, "dm:" + "+".join(self.pool.clip_ids[i] for i in chosen)
        return mixture_t, sources_t


class FixedDraws(Dataset):
    """A dynamic-mixing dataset whose item i is always the same mixture (drawn with the key
    (seed, 0)): a validation set for targets that the stored mixtures do not hold."""

    def __init__(self, dataset: DynamicMixDataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.csv_path = dataset.csv_path

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        return self.dataset[(idx, (self.seed, 0))]
