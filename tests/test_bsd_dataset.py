"""BSDDataset: windows in which every source is heard; full-length items for evaluation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from local.bsd_dataset import BSDDataset, ResumableLoader, ShuffledEpochs

SR = 8000


def write_split(root, length_s=4.0):
    """One mixture: source 1 active throughout, source 2 only in the last second."""
    n = int(length_s * SR)
    rng = np.random.default_rng(0)
    s1 = 0.1 * rng.standard_normal(n).astype(np.float32)
    s2 = np.zeros(n, np.float32)
    s2[-SR:] = 0.1 * rng.standard_normal(SR)
    for name, audio in {"mix": s1 + s2, "s1": s1, "s2": s2}.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        sf.write(root / name / "m0.wav", audio, SR, subtype="FLOAT")
    pd.DataFrame([{"mixture_id": "m0", "mixture_path": "mix/m0.wav", "source_1_path": "s1/m0.wav",
                   "source_2_path": "s2/m0.wav", "length": n}]).to_csv(root / "tr.csv", index=False)
    return root / "tr.csv", s2


def test_windows_hold_every_source(tmp_path):
    csv, s2 = write_split(tmp_path)
    np.random.seed(0)
    picky = BSDDataset(csv, SR, segment_s=1.0, min_source_share=0.5)
    for _ in range(20):
        mixture, sources = picky[0]
        assert mixture.shape == (SR,) and sources.shape == (2, SR)
        assert (sources[1] ** 2).sum() >= 0.5 * (s2 ** 2).sum()
    fixed = BSDDataset(csv, SR, segment_s=1.0, random_segments=False, min_source_share=0.5)
    window = fixed[0][1]
    assert (window[1] ** 2).sum() >= 0.2 * (s2 ** 2).sum() and torch.equal(window, fixed[0][1])
    # Blind windows (share 0) do miss the second source: the selection is what prevents it.
    blind = BSDDataset(csv, SR, segment_s=1.0)
    assert any(float((blind[0][1][1] ** 2).sum()) == 0.0 for _ in range(40))


def test_short_mixtures_are_padded_and_full_length_items_kept(tmp_path):
    csv, _ = write_split(tmp_path, length_s=1.5)
    mixture, sources = BSDDataset(csv, SR, segment_s=2.0)[0]
    assert mixture.shape == (2 * SR,) and float(mixture[-SR // 2:].abs().max()) == 0.0
    mixture, sources, mixture_id = BSDDataset(csv, SR, return_id=True)[0]
    assert mixture.shape == (int(1.5 * SR),) and mixture_id == "m0"
    assert np.allclose(mixture.numpy(), sources.sum(0).numpy(), atol=1e-6)


def test_keyed_windows_are_the_same_in_any_process(tmp_path):
    csv, _ = write_split(tmp_path)
    blind = BSDDataset(csv, SR, segment_s=1.0)
    np.random.seed(1)
    first = blind[(0, (17, 3))][0]
    np.random.seed(2)                       # numpy's global generator plays no part
    assert torch.equal(blind[(0, (17, 3))][0], first)
    windows = {blind[(0, (17, epoch))][0].numpy().tobytes() for epoch in range(8)}
    assert len(windows) > 1                 # other epochs draw other windows


def test_shuffled_epochs_are_reproducible_and_resume_where_they_stopped():
    sampler = ShuffledEpochs(10, seed=17)
    epoch0 = list(sampler)
    assert sorted(i for i, _ in epoch0) == list(range(10)) and list(sampler) == epoch0
    assert all(key == (17, 0) for _, key in epoch0)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and all(key == (17, 1) for _, key in epoch1)
    # A new process resuming epoch 1 after 4 items: the remaining items, then whole epochs.
    resumed = ShuffledEpochs(10, seed=17)
    resumed.resume(1, 4)
    assert len(resumed) == 10 and list(resumed) == epoch1[4:] and list(resumed) == epoch1


def test_resumable_loader_saves_its_position_and_takes_it_up(tmp_path):
    csv, _ = write_split(tmp_path)
    table = pd.read_csv(csv)
    table = pd.concat([table.assign(mixture_id=f"m{i}") for i in range(6)], ignore_index=True)
    table.to_csv(csv, index=False)                       # 6 items: 3 batches of 2
    dataset = BSDDataset(csv, SR, segment_s=0.5, return_id=True)
    uninterrupted = list(ResumableLoader(dataset, batch_size=2, seed=5))
    loader = ResumableLoader(dataset, batch_size=2, seed=5)
    assert len(loader) == 3
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 2}
    again = ResumableLoader(dataset, batch_size=2, seed=5)   # as in a new process
    again.load_state_dict(state)
    (rest,) = list(again)
    assert rest[2] == uninterrupted[2][2]                           # the same mixtures
    assert torch.equal(rest[0], uninterrupted[2][0])                # in the same windows
    assert again.state_dict() == {"epoch": 0, "batches": 3}
    # Saved at the end of an epoch: the next pass is the next epoch, whole.
    again.load_state_dict({"epoch": 0, "batches": 3})
    assert again.sampler.epoch == 1 and len(list(again)) == 3


def test_training_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    csv, _ = write_split(tmp_path)
    table = pd.read_csv(csv)
    pd.concat([table.assign(mixture_id=f"m{i}") for i in range(4)], ignore_index=True).to_csv(
        csv, index=False)
    dataset = BSDDataset(csv, SR, segment_s=0.5, return_id=True)
    batches = {workers: list(ResumableLoader(dataset, batch_size=2, seed=3, num_workers=workers))
               for workers in (0, 2)}
    assert [b[2] for b in batches[0]] == [b[2] for b in batches[2]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[0], batches[2]))
