"""A data directory that trains on part of another one's tr clips: for measuring how separation
quality grows with training data (RESULTS.md, Quality).

    python -m tools.subset_clips --data_dir data_hp --out_dir data_hp_rec50 --by recording --fraction 0.5

`--by recording` keeps whole recordings, drawn at random until their clips hold `fraction` of
the tr audio: fewer recording conditions (and perhaps species). `--by clip` keeps at least one clip
of every tr recording and draws the others at random until the same share: as many recordings
and species, less audio of each. The cv and tt clips are all kept, and the new directory links to
the source's clip audio and its BSD-{n}mix, so validation and evaluation use the very same
mixtures. Only dynamic mixing (`training.dynamic_mixing`), which draws from clips.csv, sees the
subset; the stored tr mixtures stay those of the full set. A summary goes to subset.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from utils.atomic import atomic_write_text

BY = ("recording", "clip")


def _take_until(order: Sequence[Any], sizes: pd.Series, target: float) -> list[Any]:
    """The first items of `order` whose sizes add up to at least `target` (at least one)."""
    taken, total = [], 0.0
    for item in order:
        if taken and total >= target:
            break
        taken.append(item)
        total += float(sizes[item])
    return taken


def choose_tr_clips(clips: pd.DataFrame, fraction: float, by: str, seed: int) -> pd.Index:
    """Index labels of the tr rows of `clips` (stage 1's clips.csv) to keep."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction}: expected a share in (0, 1]")
    if by not in BY:
        raise ValueError(f"--by {by}: expected one of {', '.join(BY)}")
    tr = clips[clips["split"] == "tr"]
    if tr.empty:
        raise ValueError("no tr clip to draw from")
    rng = np.random.default_rng(seed)
    if by == "recording":
        per_recording = tr.groupby("recording_id")["n_samples"].sum()
        order = list(rng.permutation(sorted(per_recording.index)))
        kept = _take_until(order, per_recording, fraction * per_recording.sum())
        return tr.index[tr["recording_id"].isin(kept)]
    # One clip of every recording first, then the other clips in random order.
    tr = tr.sort_values("clip_id")
    order = list(rng.permutation(tr.index.to_numpy()))
    first = list(tr.loc[order].drop_duplicates("recording_id").index)
    taken = set(first)
    rest = [i for i in order if i not in taken]
    target = fraction * tr["n_samples"].sum() - tr.loc[first, "n_samples"].sum()
    return pd.Index(first + (_take_until(rest, tr["n_samples"], target) if target > 0 else []))


def _summary(tr: pd.DataFrame) -> dict[str, Any]:
    return dict(clips=int(len(tr)), recordings=int(tr["recording_id"].nunique()),
                species=int(tr["species"].nunique()),
                hours=round(float((tr["n_samples"] / tr["sample_rate"]).sum()) / 3600, 4))


def subset_clips(data_dir: str | Path, out_dir: str | Path, fraction: float, by: str = "recording",
                 seed: int = 0) -> dict[str, Any]:
    """Write `out_dir` (which must not exist) as described in the module docstring; return the
    summary also written to `out_dir/subset.json`."""
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    clips_csv = data_dir / "clips" / "clips.csv"
    if not clips_csv.is_file():
        raise FileNotFoundError(f"{clips_csv} not found: run stage 1 on {data_dir} first")
    mix_dirs = sorted(p for p in data_dir.glob("BSD-*mix") if p.is_dir())
    if not mix_dirs:
        raise FileNotFoundError(f"no BSD-*mix in {data_dir}: run stage 2 on it first")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: remove it or choose another --out_dir")
    clips = pd.read_csv(clips_csv, dtype={"clip_id": str, "recording_id": str})
    kept = choose_tr_clips(clips, fraction, by, seed)
    subset = clips[(clips["split"] != "tr") | clips.index.isin(kept)]
    summary = dict(source=str(data_dir), by=by, fraction=fraction, seed=seed,
                   tr_full=_summary(clips[clips["split"] == "tr"]),
                   tr_kept=_summary(subset[subset["split"] == "tr"]))
    # Built beside out_dir and renamed into place: an interrupted run leaves no half directory.
    part = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    (part / "clips").mkdir(parents=True)
    for name in ("wav", "clean"):
        if (data_dir / "clips" / name).is_dir():
            os.symlink(data_dir / "clips" / name, part / "clips" / name)
    for mix_dir in mix_dirs:
        os.symlink(mix_dir, part / mix_dir.name)
    subset.to_csv(part / "clips" / "clips.csv", index=False)
    atomic_write_text(part / "subset.json", json.dumps(summary, indent=2) + "\n")
    part.rename(out_dir)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="built data directory (stages 1-2)")
    parser.add_argument("--out_dir", required=True, help="new directory to write")
    parser.add_argument("--fraction", type=float, required=True,
                        help="share of the tr audio to keep, in (0, 1]")
    parser.add_argument("--by", choices=BY, default="recording",
                        help="keep whole recordings, or part of every recording's clips")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw")
    args = parser.parse_args(argv)
    summary = subset_clips(args.data_dir, args.out_dir, args.fraction, args.by, args.seed)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
