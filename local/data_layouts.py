"""The recipe's data sets, whatever their layout: BSD-{n}mix from stage 2, or a separation data
set the user already has in the layout of LibriMix or wsj0-2mix.

train.py and eval.py take a `--data_dir`; `open_split` finds out what it holds:

  BSD      <data_dir>/BSD-{n}mix/{tr,cv,tt}.csv (stage 2, local/mixtures.py)
  LibriMix <root>/wav8k/min/{train-100,dev,test}/{mix_clean,s1,s2[,s3]}/<id>.wav, optionally with
           the metadata csvs LibriMix ships (<root>/wav8k/min/metadata/mixture_<split>_mix_clean.csv:
           mixture_ID, ..., length), which then give the list and order of the mixtures
  wsj0-2mix <root>/wav8k/min/{tr,cv,tt}/{mix,s1,s2[,s3]}/<id>.wav

where <root> is `data_dir` itself, or its `Libri{n}Mix/` or `{n}speakers/` folder (n = --n_src),
`wav8k` follows --sample_rate (wav16k for 16000) and `min` is used when present, else `max`. The
recipe's splits map to tr = train-100 (else train-360), cv = dev, tt = test for LibriMix.

A LibriMix or wsj0-2mix split is read through the same BSDDataset as BSD-{n}mix (same windows,
same items): it is listed as a table with the columns of a stage-2 csv, after checking every
file's presence, sample rate and length, so a broken tree fails at once with what is wrong.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import soundfile as sf

from local.bsd_dataset import BSDDataset, split_csv

# Folder names of the recipe's splits in each layout (the first one present is used).
LAYOUT_SPLITS = {
    "librimix": {"tr": ("train-100", "train-360"), "cv": ("dev",), "tt": ("test",)},
    "wsj0-2mix": {"tr": ("tr",), "cv": ("cv",), "tt": ("tt",)},
}
# The folder of the mixtures in a split (LibriMix: the clean mixtures, no noise).
MIXTURE_FOLDERS = {"librimix": "mix_clean", "wsj0-2mix": "mix"}
MIX_MODES = ("min", "max")
# Problems listed in one error message before "and N more".
MAX_LISTED_PROBLEMS = 5


class DataLayoutError(ValueError):
    """A LibriMix or wsj0-2mix tree that cannot be used as it is."""


@dataclass(frozen=True)
class Layout:
    """A LibriMix or wsj0-2mix tree: `base` is its <root>/wav8k/min folder."""
    kind: str
    base: Path


def rate_folder(sample_rate: int) -> str:
    """wav8k for 8000 Hz (the folder names of LibriMix and wsj0-2mix)."""
    return f"wav{sample_rate // 1000}k" if sample_rate % 1000 == 0 else f"wav{sample_rate}"


def _layout_kind(base: Path) -> str | None:
    for kind, splits in LAYOUT_SPLITS.items():
        if any((base / name / MIXTURE_FOLDERS[kind]).is_dir()
               for names in splits.values() for name in names):
            return kind
    return None


def find_layout(data_dir: str | Path, n_src: int, sample_rate: int) -> Layout | None:
    """The LibriMix or wsj0-2mix tree in `data_dir`, or None when it holds BSD-{n_src}mix or
    nothing recognisable (BSDDataset then says what is missing)."""
    data_dir = Path(data_dir)
    if (data_dir / f"BSD-{n_src}mix").is_dir():
        return None
    roots = [data_dir / f"Libri{n_src}Mix", data_dir / f"{n_src}speakers", data_dir]
    for root in roots:
        rates = sorted(p.name for p in root.glob("wav*") if p.is_dir()) if root.is_dir() else []
        if not rates:
            continue
        wanted = root / rate_folder(sample_rate)
        if not wanted.is_dir():
            raise DataLayoutError(f"{root} has {', '.join(rates)}, no {wanted.name} for "
                                  f"--sample_rate {sample_rate}: pass the sample rate of one of them")
        for mode in MIX_MODES:
            kind = _layout_kind(wanted / mode)
            if kind is not None:
                return Layout(kind, wanted / mode)
        raise DataLayoutError(
            f"{wanted}: no {'/'.join(MIX_MODES)}/<split>/{{mix_clean|mix}} folders of a LibriMix "
            f"({', '.join(n for ns in LAYOUT_SPLITS['librimix'].values() for n in ns)}) or "
            f"wsj0-2mix ({', '.join(n for ns in LAYOUT_SPLITS['wsj0-2mix'].values() for n in ns)}) tree")
    return None


def _split_folder(layout: Layout, split: str) -> Path:
    names = LAYOUT_SPLITS[layout.kind].get(split)
    if names is None:
        raise DataLayoutError(f"unknown split {split!r}: expected one of "
                              f"{', '.join(LAYOUT_SPLITS[layout.kind])}")
    for name in names:
        if (layout.base / name).is_dir():
            return layout.base / name
    raise DataLayoutError(f"{layout.base}: no {' or '.join(names)} folder (the {split} split of "
                          f"a {layout.kind} tree)")


def _mixture_ids(layout: Layout, split_dir: Path, mixture_dir: Path) -> tuple[list[str], dict[str, int]]:
    """Mixture ids in order, and the lengths the metadata csv states (if LibriMix ships one)."""
    metadata = layout.base / "metadata" / f"mixture_{split_dir.name}_{mixture_dir.name}.csv"
    if layout.kind == "librimix" and metadata.is_file():
        table = pd.read_csv(metadata)
        missing = {"mixture_ID", "length"} - set(table.columns)
        if missing:
            raise DataLayoutError(f"{metadata}: no column {', '.join(sorted(missing))}")
        ids = table["mixture_ID"].astype(str).tolist()
        return ids, dict(zip(ids, table["length"].astype(int)))
    return sorted(p.stem for p in mixture_dir.glob("*.wav")), {}


def layout_table(layout: Layout, split: str, sample_rate: int, n_src: int) -> tuple[Path, pd.DataFrame]:
    """The split's folder and its mixtures as a stage-2 csv table (mixture_id, mixture_path,
    source_<k>_path, length; paths relative to the split folder's parent).

    Every file must be there, at `sample_rate`, and as long as its mixture."""
    split_dir = _split_folder(layout, split)
    mixture_dir = split_dir / MIXTURE_FOLDERS[layout.kind]
    found = [int(p.name[1:]) for p in split_dir.glob("s[0-9]*") if p.is_dir() and p.name[1:].isdigit()]
    n_sources = max([n_src, *found])
    missing_dirs = [f"s{k}" for k in range(1, n_sources + 1) if not (split_dir / f"s{k}").is_dir()]
    if missing_dirs:
        raise DataLayoutError(f"{split_dir}: missing source folder(s) {', '.join(missing_dirs)}")
    ids, stated_lengths = _mixture_ids(layout, split_dir, mixture_dir)
    if not ids:
        raise DataLayoutError(f"{mixture_dir}: no .wav mixtures")

    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    folders = [mixture_dir.name] + [f"s{k}" for k in range(1, n_sources + 1)]
    for mixture_id in ids:
        paths = [f"{split_dir.name}/{folder}/{mixture_id}.wav" for folder in folders]
        lengths = []
        for rel in paths:
            path = split_dir.parent / rel
            try:
                info = sf.info(str(path))
            except (sf.LibsndfileError, RuntimeError):
                problems.append(f"{rel}: missing or not a readable wav" if path.exists()
                                else f"{rel}: missing")
                continue
            if info.samplerate != sample_rate:
                problems.append(f"{rel}: {info.samplerate} Hz, expected {sample_rate} Hz")
            lengths.append(info.frames)
        if len(set(lengths)) > 1:
            problems.append(f"{mixture_id}: mixture and sources differ in length "
                            f"({', '.join(f'{f} {n}' for f, n in zip(folders, lengths))} samples)")
        elif lengths and mixture_id in stated_lengths and stated_lengths[mixture_id] != lengths[0]:
            problems.append(f"{mixture_id}: {lengths[0]} samples, the metadata csv says "
                            f"{stated_lengths[mixture_id]}")
        row = {"mixture_id": mixture_id, "mixture_path": paths[0]}
        row.update({f"source_{k}_path": paths[k] for k in range(1, n_sources + 1)})
        row["length"] = lengths[0] if lengths else 0
        rows.append(row)
    if problems:
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise DataLayoutError(f"{split_dir} ({layout.kind} layout): "
                              + "; ".join(problems[:MAX_LISTED_PROBLEMS])
                              + (f"; and {more} more" if more > 0 else ""))
    return split_dir, pd.DataFrame(rows)


def open_split(data_dir: str | Path, n_src: int, split: str, sample_rate: int,
               **dataset_kwargs: Any) -> BSDDataset:
    """The dataset of one split (tr, cv, tt) of whatever `data_dir` holds (see module doc);
    `dataset_kwargs` go to BSDDataset (segment_s, return_id, ...)."""
    layout = find_layout(data_dir, n_src, sample_rate)
    if layout is None:
        return BSDDataset(split_csv(data_dir, n_src, split), sample_rate, **dataset_kwargs)
    split_dir, table = layout_table(layout, split, sample_rate, n_src)
    return BSDDataset(split_dir, sample_rate, table=table, **dataset_kwargs)


def split_fingerprint(dataset: BSDDataset) -> str:
    """sha256 of what a dataset lists: its csv file, or (LibriMix, wsj0-2mix) its table."""
    if dataset.csv_path.is_file():
        return hashlib.sha256(dataset.csv_path.read_bytes()).hexdigest()
    return hashlib.sha256(dataset.df.to_csv(index=False).encode()).hexdigest()
