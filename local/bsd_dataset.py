"""PyTorch dataset over a BSD-{n}mix split csv written by stage 2 (local/mixtures.py).

Every path column of the csv is relative to the directory holding the csv."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def split_csv(data_dir: str | Path, n_src: int, split: str) -> Path:
    """Path of a split's csv, e.g. data/BSD-2mix/tr.csv."""
    return Path(data_dir) / f"BSD-{n_src}mix" / f"{split}.csv"


def window_start(sources: np.ndarray, segment: int, min_source_share: float,
                 rng: np.random.Generator | None) -> int:
    """Start of a `segment`-sample training window of `sources` (n_src, time) in which every
    source is heard.

    Bird clips are short and mostly padded or sparse, so a window drawn blindly often holds
    one source only; its silent reference makes SI-SNR meaningless (the loss then only
    rewards matching the padding). A window qualifies when it holds at least
    `min_source_share` of each source's energy; one is drawn with `rng` among those (without
    `rng`, a fixed window: the one whose worst-covered source is best covered).
    """
    n_starts = sources.shape[1] - segment + 1
    energy = np.concatenate([np.zeros((sources.shape[0], 1)),
                             np.cumsum(np.square(sources, dtype=np.float64), axis=1)], axis=1)
    inside = (energy[:, segment:] - energy[:, :n_starts]) / (energy[:, -1:] + 1e-12)
    worst_share = inside.min(axis=0)
    if rng is None:
        return int(worst_share.argmax())
    candidates = np.flatnonzero(worst_share >= min_source_share)
    if candidates.size == 0:
        return int(worst_share.argmax())
    return int(candidates[rng.integers(candidates.size)])


def fit_to_segment(mixture: np.ndarray, sources: np.ndarray, segment: int, start: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The window [start, start + segment) of a mixture and its sources, zero-padded at the end
    when they are shorter."""
    mixture, sources = mixture[start:start + segment], sources[:, start:start + segment]
    if mixture.shape[0] < segment:
        pad = segment - mixture.shape[0]
        mixture, sources = np.pad(mixture, (0, pad)), np.pad(sources, ((0, 0), (0, pad)))
    return mixture, sources


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

    An item is asked for by its index, or (from `ShuffledEpochs`) by `(index, draw_key)`: the
    random window is then drawn from a generator seeded with `(*draw_key, index)`, so the same
    key gives the same window in any process; a plain index draws from numpy's global one.
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

    def __getitem__(self, key: int | tuple[int, tuple[int, ...]]):
        idx, draw_key = key if isinstance(key, tuple) else (key, None)
        row = self.df.iloc[idx]
        mixture = self._read(row["mixture_path"], 0, None)
        sources = np.stack([self._read(row[c], 0, None) for c in self.source_columns])
        if self.segment is not None:
            start = 0
            if mixture.shape[0] > self.segment:
                # Without a key, a generator seeded from numpy's global one (as DataLoader
                # workers seed it per epoch).
                seed = [*draw_key, idx] if draw_key is not None else np.random.randint(2**32)
                start = window_start(sources, self.segment, self.min_source_share,
                                     np.random.default_rng(seed) if self.random_segments else None)
            mixture, sources = fit_to_segment(mixture, sources, self.segment, start)
        mixture_t, sources_t = torch.from_numpy(mixture), torch.from_numpy(sources)
        if self.return_id:
            return mixture_t, sources_t, str(row["mixture_id"])
        return mixture_t, sources_t

class ShuffledEpochs(Sampler):
    """Training order that a resumed run can take up again: epoch e visits the items in a
    shuffle drawn from (seed, e), each with the key of its window draw (see BSDDataset).
    Lightning calls `set_epoch` at each epoch start; `resume(epoch, items_done)` makes the
    next pass over `epoch` skip the items an interrupted run already trained on."""

    def __init__(self, n_items: int, seed: int):
        self.n_items, self.seed, self.epoch = n_items, seed, 0
        self._skip: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, items_done: int) -> None:
        self.epoch = epoch
        self._skip = {epoch: items_done}

    def items_to_skip(self, epoch: int) -> int:
        """How many items the next pass over `epoch` leaves out (a resumed epoch's done ones)."""
        return self._skip.get(epoch, 0)

    def __len__(self) -> int:
        # The whole epoch, also when resuming: Lightning counts a resumed epoch's batches
        # from where it stopped, up to this length.
        return self.n_items

    def __iter__(self):
        epoch = self.epoch
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
        skip = self._skip.pop(epoch, 0)
        return iter([(int(idx), (self.seed, epoch)) for idx in order[skip:]])


class ResumableLoader(DataLoader):
    """A training DataLoader over `ShuffledEpochs` whose position goes into Lightning's
    checkpoints (`state_dict`, read back by `load_state_dict` before the loader's first pass
    when a run resumes), so a run killed in mid-epoch trains the rest of that epoch's batches,
    with the same windows, as if it had never stopped.  (A time-budget stop ends the epoch in
    Lightning's count: the resumed run starts the next one, whole.)"""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, **kwargs):
        super().__init__(dataset, batch_size=batch_size, drop_last=True,
                         sampler=ShuffledEpochs(len(dataset), seed), **kwargs)
        self._position = (0, 0)          # (epoch, batches handed out in it)

    def __iter__(self):
        epoch = self.sampler.epoch
        done = self.sampler.items_to_skip(epoch) // self.batch_size
        self._position = (epoch, done)
        for batch in super().__iter__():
            done += 1
            self._position = (epoch, done)
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = state["epoch"], state["batches"]
        if batches >= len(self):     # saved at the end of its epoch: the next one starts afresh
            self.sampler.set_epoch(epoch + 1)
        else:
            self.sampler.resume(epoch, batches * self.batch_size)
