"""BSDDataset: windows in which every source is heard; full-length items for evaluation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from local.bsd_dataset import BSDDataset

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
