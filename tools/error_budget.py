"""Where separation quality is lost, under the thesis' definition (each bird output scored
against its reference clip as recorded: the bird plus the background of its recording).

    python -m tools.error_budget --data_dir data [--exp_dir exp/TAG] [--split tt] [--json PATH]

Each reference is split, with stage 1's denoised clips (`clips.denoise`, clips/clean/), into
its bird b_k (the denoised clip at the mixture's gain and offset) and its background
n_k = reference - b_k. Two parts:

- **Bounds** (no model): the SI-SNRi of estimates built from these parts, which say how much of
  the score depends on handing each recording's background to the right output:
  `birds_only` (each bird without background: what a perfect "clean" separator scores),
  `background_shared` (each bird plus an equal share of all the backgrounds), `background_by_power`
  (shares in proportion to the birds' energies), `background_swapped` (each bird with the
  others' backgrounds). Bounds are scored in the references' order, not re-permuted.
- **Model budget** (with `--exp_dir`): each of the model's outputs (in the mixture's best
  permutation) is projected, at zero lag, on the span of all birds and backgrounds. Its error
  splits into the other birds' leak, background error (backgrounds not at the output's own
  bird's scale) and a residual (what no scaling of the parts explains: distortion, artefacts).
  For each part, the SI-SNRi the output would score without it. `swapped_blocks` is the share
  of 1-s blocks (both references audible) whose best permutation differs from the mixture's.

Only as good as the denoising: a denoised clip that keeps some hiss, or loses some song, moves
a part of the error from one column to another. The split of a mixture's sources comes from its
csv (`source_k_clip_id`, `_gain`, `_offset`), so the split must be one stage 2 wrote.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from local.metrics import best_permutation, pairwise_si_snr
from local.mixtures import render_sources
from utils.atomic import atomic_write_text
from utils.audio import load_audio

BOUNDS = ("birds_only", "background_shared", "background_by_power", "background_swapped")
BUDGET = ("model", "without_bird_leak", "without_background_error", "without_residual")
BLOCK_S = 1.0
# A block counts for the swap rate when its quietest reference holds at least this fraction
# of its loudest one's energy (both birds audible).
BLOCK_MIN_ENERGY_RATIO = 1e-3

Separator = Callable[[np.ndarray], np.ndarray]


class ErrorBudgetError(RuntimeError):
    """Missing or unusable inputs (no denoised clips, unknown split, ...)."""


def matched_si_snr(estimates: np.ndarray, references: np.ndarray) -> np.ndarray:
    """SI-SNR (dB) of estimate k against reference k, for every k."""
    return np.array([pairwise_si_snr(e[None], r[None])[0, 0]
                     for e, r in zip(estimates, references)])


def bound_estimates(birds: np.ndarray, backgrounds: np.ndarray) -> dict[str, np.ndarray]:
    """The estimate sets of BOUNDS, each (n_src, time), from the birds and their backgrounds."""
    n_src = birds.shape[0]
    total = backgrounds.sum(axis=0)
    energy = np.sum(birds ** 2, axis=1)
    weights = energy / energy.sum() if energy.sum() > 0 else np.full(n_src, 1.0 / n_src)
    others = (total[None] - backgrounds) / max(n_src - 1, 1)
    return {"birds_only": birds,
            "background_shared": birds + total[None] / n_src,
            "background_by_power": birds + weights[:, None] * total[None],
            "background_swapped": birds + others}


def budget_estimates(estimates: np.ndarray, birds: np.ndarray,
                     backgrounds: np.ndarray) -> dict[str, np.ndarray]:
    """The model's estimates (in the references' order) with one error part removed at a time.

    Each output e_k is fitted by least squares as sum_j a_j b_j + sum_j c_j n_j + r. Bird leak:
    sum_{j != k} a_j b_j. Background error: (c_k - a_k) n_k + sum_{j != k} c_j n_j, so that a
    reference scaled as a whole (c_k = a_k) has none. Residual: r."""
    n_src = birds.shape[0]
    basis = np.concatenate([birds, backgrounds])            # (2 n_src, time)
    coef, *_ = np.linalg.lstsq(basis.T, estimates.T, rcond=None)
    out = {name: np.array(estimates, dtype=np.float64, copy=True) for name in BUDGET}
    for k in range(n_src):
        a, c = coef[:n_src, k], coef[n_src:, k]
        leak = sum(a[j] * birds[j] for j in range(n_src) if j != k)
        c_err = c.copy()
        c_err[k] -= a[k]
        out["without_bird_leak"][k] -= leak
        out["without_background_error"][k] -= c_err @ backgrounds
        out["without_residual"][k] -= estimates[k] - coef[:, k] @ basis
    return out


def swapped_blocks(estimates: np.ndarray, references: np.ndarray, block: int) -> tuple[int, int]:
    """(blocks whose best permutation differs from the given order, blocks counted)."""
    swapped = counted = 0
    for start in range(0, references.shape[1] - block + 1, block):
        ref = references[:, start:start + block]
        energy = np.sum(ref ** 2, axis=1)
        if energy.min() < BLOCK_MIN_ENERGY_RATIO * energy.max():
            continue
        perm = best_permutation(pairwise_si_snr(estimates[:, start:start + block], ref))
        counted += 1
        swapped += int(np.any(perm != np.arange(len(perm))))
    return swapped, counted


def _split_table(data_dir: Path, n_src: int, split: str) -> tuple[pd.DataFrame, Path, str]:
    ds_dir = data_dir / f"BSD-{n_src}mix"
    csv_path = ds_dir / f"{split}.csv"
    if not csv_path.is_file():
        raise ErrorBudgetError(f"{csv_path} not found: run stage 2 (local/mixtures.py) first")
    mode = json.loads((ds_dir / "dataset.json").read_text())["mode"]
    dtypes = {f"source_{k}_clip_id": str for k in range(1, n_src + 1)}
    return pd.read_csv(csv_path, dtype=dtypes), ds_dir, mode


def _clean_paths(data_dir: Path) -> dict[str, Path]:
    clips_csv = data_dir / "clips" / "clips.csv"
    if not clips_csv.is_file():
        raise ErrorBudgetError(f"{clips_csv} not found: run stage 1 (local/clips.py) first")
    clips = pd.read_csv(clips_csv, dtype={"clip_id": str})
    if "clean_path" not in clips.columns or clips["clean_path"].isna().any():
        raise ErrorBudgetError(f"{clips_csv} lacks denoised clips (clean_path): rerun stage 1 "
                               "with --denoise true")
    return {cid: clips_csv.parent / path for cid, path in zip(clips["clip_id"], clips["clean_path"])}


def error_budget(data_dir: str | Path, sample_rate: int, n_src: int = 2, split: str = "tt",
                 separate: Separator | None = None) -> dict:
    """Mean per-source SI-SNRi (dB) of the BOUNDS over the split, and with `separate` (mixture
    (time,) -> estimates (n_src, time)) the model's BUDGET and block swap rate."""
    data_dir = Path(data_dir)
    table, ds_dir, mode = _split_table(data_dir, n_src, split)
    clean = _clean_paths(data_dir)
    scores: dict[str, list[np.ndarray]] = {name: [] for name in BOUNDS + (BUDGET if separate else ())}
    swaps = blocks = 0
    for _, row in tqdm(table.iterrows(), total=len(table), desc=f"error budget {split}"):
        ks = range(1, n_src + 1)
        references = np.stack([load_audio(ds_dir / row[f"source_{k}_path"], sample_rate)
                               for k in ks]).astype(np.float64)
        mixture = references.sum(axis=0)
        birds = render_sources([load_audio(clean[row[f"source_{k}_clip_id"]], sample_rate) for k in ks],
                               [float(row[f"source_{k}_gain"]) for k in ks],
                               [int(row[f"source_{k}_offset"]) for k in ks],
                               references.shape[1], mode).astype(np.float64)
        backgrounds = references - birds
        # The mixture's own SI-SNR against each reference: the same for every estimate set.
        baseline = matched_si_snr(np.broadcast_to(mixture, references.shape), references)
        for name, est in bound_estimates(birds, backgrounds).items():
            scores[name].append(matched_si_snr(est, references) - baseline)
        if separate is None:
            continue
        estimates = np.asarray(separate(mixture), dtype=np.float64)[:n_src]
        estimates = estimates[best_permutation(pairwise_si_snr(estimates, references))]
        for name, est in budget_estimates(estimates, birds, backgrounds).items():
            scores[name].append(matched_si_snr(est, references) - baseline)
        s, b = swapped_blocks(estimates, references, int(BLOCK_S * sample_rate))
        swaps, blocks = swaps + s, blocks + b
    result = {"split": split, "n_mixtures": int(len(table)), "n_src": n_src,
              "si_sdr_imp": {name: float(np.mean(np.concatenate(v))) for name, v in scores.items()},
              "si_sdr_imp_median": {name: float(np.median(np.concatenate(v)))
                                    for name, v in scores.items()}}
    if separate is not None:
        result["swapped_blocks"] = {"swapped": swaps, "blocks": blocks,
                                    "share": swaps / blocks if blocks else float("nan")}
    return result


def model_separator(exp_dir: str | Path) -> tuple[Separator, int | None]:
    """The experiment's best model as a CPU separator, and its sample rate (None when the
    model file does not say)."""
    from model import load_best_model   # imported here: the bounds need no model code

    model = load_best_model(exp_dir).eval()

    def separate(mixture: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(mixture.astype(np.float32))[None])[0].double().numpy()

    rate = getattr(model, "sample_rate", None)
    return separate, int(rate) if rate else None


def format_budget(result: dict) -> str:
    """Markdown lines of one error budget."""
    means, medians = result["si_sdr_imp"], result["si_sdr_imp_median"]
    lines = [f"{result['split']}, {result['n_mixtures']} mixtures: SI-SNRi mean / median (dB)"]
    lines += [f"- {name}: {means[name]:.2f} / {medians[name]:.2f}" for name in means]
    if "swapped_blocks" in result:
        sb = result["swapped_blocks"]
        lines.append(f"- swapped 1-s blocks: {sb['swapped']} of {sb['blocks']} ({100 * sb['share']:.1f} %)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, required=True, help="the recipe's data folder")
    parser.add_argument("--exp_dir", type=Path, default=None, help="a trained experiment (optional)")
    parser.add_argument("--split", default="tt", help="tr, cv or tt")
    parser.add_argument("--n_src", type=int, default=2, help="BSD-{n}mix")
    parser.add_argument("--sample_rate", type=int, default=8000,
                        help="the data's rate (the model's, with --exp_dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here too")
    args = parser.parse_args(argv)
    separate, sample_rate = (model_separator(args.exp_dir) if args.exp_dir
                             else (None, args.sample_rate))
    sample_rate = sample_rate or args.sample_rate
    result = error_budget(args.data_dir, sample_rate, args.n_src, args.split, separate)
    print(format_budget(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
