"""PyTorch dataset over a BSD-{n}mix split csv written by stage 2 (local/mixtures.py).

Every path column of the csv is relative to the directory holding the csv."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from torch.utils.data import Dataset


def split_csv(data_dir: str | Path, n_src: int, split: str) -> Path:
    """Path of a split's csv, e.g. data/BSD-2mix/tr.csv."""
    return Path(data_dir) / f"BSD-{n_src}mix" / f"{split}.csv"


class BSDDataset(Dataset):
    """Mixtures and their references.

    Returns `(mixture[time], sources[n_src, time])`, or with `return_id=True`
    `(mixture, sources, mixture_id)`. With `segment_s`, each item is a `segment_s` window in
    which every source holds at least `min_source_share` of its energy (drawn at random, or
    fixed per item when `random_segments=False`); mixtures shorter than a segment are
    zero-padded at the end. Without `segment_s` items are full length (evaluation).

    `table` gives the rows (the csv's columns) directly, for data sets listed from a folder
    tree (local/data_layouts.py: LibriMix, wsj0-2mix); `csv_path` then only names the split,
    and the paths are relative to its parent all the same.
    """

    def __init__(self, csv_path: str | Path, sample_rate: int, segment_s: float | None = None,
                 return_id: bool = False, random_segments: bool = True,
                 min_source_share: float = 0.0, table: pd.DataFrame | None = None):
        self.csv_path = Path(csv_path)
        if table is None and not self.csv_path.is_file():
            raise FileNotFoundError(f"{self.csv_path} not found: run stage 2 (local/mixtures.py) first")
        self.root = self.csv_path.parent
        self.df = pd.read_csv(self.csv_path) if table is None else table
        self.source_columns = sorted((c for c in self.df.columns
                                      if c.startswith("source_") and c.endswith("_path")),
                                     key=lambda c: int(c.split("_")[1]))
        self.n_src = len(self.source_columns)
        if self.n_src == 0 or len(self.df) == 0:
            raise ValueError(f"{self.csv_path}: no sources or no mixtures")
        self.sample_rate = sample_rate
        self.segment = None if segment_s is None else int(round(segment_s * sample_rate))
        self.return_id = return_id
        self.random_segments = random_segments
        self.min_source_share = min_source_share

    def __len__(self) -> int:
        return len(self.df)

    def _read(self, rel_path: str, start: int, stop: int | None) -> np.ndarray:
        audio, sr = sf.read(str(self.root / rel_path), start=start, stop=stop, dtype="float32")
        if sr != self.sample_rate:
            raise ValueError(f"{self.root / rel_path}: {sr} Hz, expected {self.sample_rate} Hz; "
                             "rebuild the data set or set --sample_rate to match")
        return audio

    def __getitem__(self, idx: int):
        row = self.df.iloc[idx]
        mixture = self._read(row["mixture_path"], 0, None)
        sources = np.stack([self._read(row[c], 0, None) for c in self.source_columns])
        if self.segment is not None and mixture.shape[0] > self.segment:
            start = self._segment_start(sources)
            mixture = mixture[start:start + self.segment]
            sources = sources[:, start:start + self.segment]
        if self.segment is not None and mixture.shape[0] < self.segment:
            pad = self.segment - mixture.shape[0]
            mixture = np.pad(mixture, (0, pad))
            sources = np.pad(sources, ((0, 0), (0, pad)))
        mixture_t, sources_t = torch.from_numpy(mixture), torch.from_numpy(sources)
        if self.return_id:
            return mixture_t, sources_t, str(row["mixture_id"])
        return mixture_t, sources_t

    def _segment_start(self, sources: np.ndarray) -> int:
        """Start of a training window in which every source is heard.

        Bird clips are short and mostly padded or sparse, so a window drawn blindly often holds
        one source only; its silent reference makes SI-SNR meaningless (the loss then only
        rewards matching the padding). A window qualifies when it holds at least
        `min_source_share` of each source's energy; one is drawn at random among those (or, for
        fixed windows, the one whose worst-covered source is best covered is taken).
        """
        n_starts = sources.shape[1] - self.segment + 1
        energy = np.concatenate([np.zeros((self.n_src, 1)),
                                 np.cumsum(np.square(sources, dtype=np.float64), axis=1)], axis=1)
        inside = (energy[:, self.segment:] - energy[:, :n_starts]) / (energy[:, -1:] + 1e-12)
        worst_share = inside.min(axis=0)
        if not self.random_segments:
            return int(worst_share.argmax())
        candidates = np.flatnonzero(worst_share >= self.min_source_share)
        if candidates.size == 0:
            return int(worst_share.argmax())
        return int(candidates[np.random.randint(candidates.size)])
