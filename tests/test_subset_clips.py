"""tools/subset_clips.py: a data directory that trains on part of the tr clips."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from local.dynamic_mixing import DynamicMixDataset
from test_dynamic_mixing import dm_conf, write_tiny_clips  # noqa: F401  (dm_conf: fixture)
from test_train import write_tiny_bsd
from tools.subset_clips import choose_tr_clips, subset_clips


def clip_table(n_recordings: int = 6, clips_per_recording: int = 4) -> pd.DataFrame:
    """tr clips of unequal lengths, several per recording, and a few cv / tt clips."""
    rows = []
    for r in range(n_recordings):
        for c in range(clips_per_recording):
            rows.append(dict(clip_id=f"XC{r}_{c}", recording_id=str(r), species=f"sp{r % 3}",
                             split="tr", n_samples=1000 * (1 + (r + c) % 5), sample_rate=8000))
    for split in ("cv", "tt"):
        rows.append(dict(clip_id=f"XC_{split}", recording_id=split, species="sp9", split=split,
                         n_samples=500, sample_rate=8000))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_by_recording_keeps_whole_recordings_up_to_the_share(fraction):
    clips = clip_table()
    tr = clips[clips["split"] == "tr"]
    kept = tr.loc[choose_tr_clips(clips, fraction, "recording", seed=3)]
    # Whole recordings only: every clip of a kept recording is kept.
    assert set(tr.index[tr["recording_id"].isin(kept["recording_id"])]) == set(kept.index)
    share = kept["n_samples"].sum() / tr["n_samples"].sum()
    assert share >= fraction
    # And no more than one recording beyond it.
    largest = tr.groupby("recording_id")["n_samples"].sum().max()
    assert share < fraction + largest / tr["n_samples"].sum()


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_by_clip_keeps_every_recording_and_the_share(fraction):
    clips = clip_table()
    tr = clips[clips["split"] == "tr"]
    kept = tr.loc[choose_tr_clips(clips, fraction, "clip", seed=3)]
    assert set(kept["recording_id"]) == set(tr["recording_id"])
    assert kept["n_samples"].sum() / tr["n_samples"].sum() >= fraction
    if fraction == 0.5:
        assert len(kept) < len(tr)


def test_the_draw_follows_the_seed():
    clips = clip_table(n_recordings=12)
    draw = {seed: sorted(choose_tr_clips(clips, 0.5, "recording", seed)) for seed in (0, 1, 2)}
    assert sorted(choose_tr_clips(clips, 0.5, "recording", 0)) == draw[0]   # a rerun: the same
    assert len({tuple(d) for d in draw.values()}) > 1
    assert set(choose_tr_clips(clips, 1.0, "clip", 5)) == set(clips.index[clips["split"] == "tr"])


@pytest.mark.parametrize("fraction, by, message", [(0, "clip", "fraction"), (1.5, "clip", "fraction"),
                                                   (0.5, "species", "--by")])
def test_bad_arguments_are_refused(fraction, by, message):
    with pytest.raises(ValueError, match=message):
        choose_tr_clips(clip_table(), fraction, by, 0)


def test_subset_directory_feeds_dynamic_mixing(tmp_path, dm_conf):  # noqa: F811
    source = tmp_path / "data"
    write_tiny_bsd(source)
    full = write_tiny_clips(source, n_per_species=3, splits=("tr", "cv"))
    out = tmp_path / "half"
    summary = subset_clips(source, out, 0.5, by="recording", seed=1)
    assert json.loads((out / "subset.json").read_text()) == summary
    assert summary["tr_full"]["recordings"] == 9
    assert 0 < summary["tr_kept"]["recordings"] < 9
    assert not (tmp_path / "half.part").exists()
    subset = pd.read_csv(out / "clips" / "clips.csv", dtype={"recording_id": str})
    # The other splits are all kept; the stored mixtures are the source's.
    assert (subset["split"] == "cv").sum() == (full["split"] == "cv").sum()
    assert (out / "BSD-2mix").resolve() == (source / "BSD-2mix").resolve()
    dataset = DynamicMixDataset(out, 2, dm_conf, segment_s=1.0, n_items=4, min_source_share=0.2)
    assert sorted(dataset.pool.clip_ids) == sorted(subset.loc[subset["split"] == "tr", "clip_id"])
    assert dataset[(0, (17, 0))][1].shape[0] == 2
    with pytest.raises(FileExistsError, match="exists"):
        subset_clips(source, out, 0.5)
    with pytest.raises(FileNotFoundError, match="stage 1"):
        subset_clips(tmp_path / "nothing", tmp_path / "other", 0.5)
