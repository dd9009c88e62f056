"""Dynamic mixing (as in SpeechBrain's WSJ0Mix recipes): training mixtures drawn on the fly
from stage 1's tr clips instead of read from BSD-{n}mix/tr, so every epoch brings new clip
combinations, new levels and new offsets.

A mixture is drawn exactly as stage 2 draws one (local/mixtures.py's ClipPool: clips of
different species and recordings, levels at a random SNR in [snr_low_db, snr_high_db], peak
protection), then a training window is cut from it as from a stored mixture
(local/bsd_dataset.py's window_start). Item `(index, (seed, epoch))`, as `ShuffledEpochs`
hands them out, is drawn from a generator seeded with (seed, epoch, index): the same run gives
the same mixtures in any process, and a resumed run takes up the same epoch again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from local.bsd_dataset import fit_to_segment, window_start
from local.mixtures import ClipPool, MixtureError, load_clips, mix
from utils.config import Conf

# Draws in a row that may fail (a silent crop) before an item gives up.
MAX_DRAWS = 100
# Mixed into the generator's seed, so dynamic mixing's draws are not stage 2's.
DRAW_TAG = 0x444D


def clips_csv_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "clips" / "clips.csv"


class DynamicMixDataset(Dataset):
    """`n_items` training mixtures a pass, drawn from the `split` clips of
    `<data_dir>/clips/clips.csv`; items are `(mixture[segment], sources[n_src, segment])`, with
    `return_id` also an id naming the clips (`dm:<clip>+<clip>`)."""

    def __init__(self, data_dir: str | Path, n_src: int, conf: Conf, segment_s: float,
                 n_items: int, min_source_share: float = 0.0, return_id: bool = False,
                 split: str = "tr"):
        self.csv_path = clips_csv_path(data_dir)
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"{self.csv_path} not found: dynamic mixing draws from "
                                    "stage 1's clips (run stage 1, local/clips.py)")
        self.sample_rate = int(conf["clips"]["sample_rate"])
        clips_df, audio = load_clips(self.csv_path, self.sample_rate, splits=[split])
        if not audio:
            raise MixtureError(f"{self.csv_path}: no usable '{split}' clip to mix")
        self.pool = ClipPool(clips_df, split, audio, n_src, conf)
        self.n_src, self.n_items = n_src, n_items
        self.segment = int(round(segment_s * self.sample_rate))
        self.min_source_share, self.return_id = min_source_share, return_id

    def __len__(self) -> int:
        return self.n_items

    def draw(self, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
        """(clip indices, references (n_src, length)) of one mixture drawn with `rng`."""
        for _ in range(MAX_DRAWS):
            chosen = self.pool.pick(rng)
            if len(chosen) < self.n_src:
                continue
            placed = self.pool.place(rng, chosen)
            if placed is not None:
                length, offsets, _, gains = placed
                return chosen, self.pool.render(chosen, gains, offsets, length)
        raise MixtureError(f"{self.csv_path}: no mixture of {self.n_src} clips could be drawn "
                           f"in {MAX_DRAWS} tries (silent clips?)")

    def __getitem__(self, key: int | tuple[int, tuple[int, ...]]):
        idx, draw_key = key if isinstance(key, tuple) else (key, None)
        # Without a key, a generator seeded from numpy's global one (as DataLoader workers
        # seed it per epoch).
        seed = [*draw_key, idx, DRAW_TAG] if draw_key is not None else np.random.randint(2**32)
        rng = np.random.default_rng(seed)
        chosen, sources = self.draw(rng)
        start = 0
        if sources.shape[1] > self.segment:
            start = window_start(sources, self.segment, self.min_source_share, rng)
        mixture, sources = fit_to_segment(mix(sources), sources, self.segment, start)
        mixture_t, sources_t = torch.from_numpy(mixture), torch.from_numpy(sources)
        if self.return_id:
            return mixture_t, sources_t, "dm:" + "+".join(self.pool.clip_ids[i] for i in chosen)
        return mixture_t, sources_t
