"""Markdown rows of RESULTS.md's quality comparison, one per evaluated experiment, and one
figure of their learning curves.

    python -m tools.quality_table exp/e4_plateau exp/e4_cos [--png exp/curves.png] [--against exp/e4_plateau]

Each row: the training budget used (steps, training minutes from learning_curve.csv), the
best validation SI-SNR, and eval.py's SI-SNRi / SDRi on the test split (with the 95 %
interval of the SI-SNRi over the split's recordings, eval.recording_interval; for older
evaluations, from their per_utterance.csv), on the clean yardstick, and the oracle IBM and
fixed filter (the ceiling of separation by band alone; n/a for evaluations made before it) on
the same mixtures (exp/<tag>/eval/final_metrics.json). With `--against`, one more column: the
SI-SNRi difference to that experiment on the very same mixtures, with a paired 95 % interval
over the recordings (`paired_difference`). Runs that differ by less than the intervals over a
split still differ reliably when this paired interval excludes zero."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from eval import recording_interval
from utils.training_callbacks import save_curve_figure

HEADER = ("| experiment | steps | train min | best val SI-SNR | test SI-SNRi [95 % interval] / SDRi | "
          "clean yardstick SI-SNRi / SDRi (n) | IBM SI-SNRi (test / clean) | "
          "fixed filter SI-SNRi (test) |\n"
          "|---|---|---|---|---|---|---|---|")


def paired_difference(reference: pd.DataFrame, other: pd.DataFrame, n_src: int) -> dict:
    """`other` minus `reference`, two per-utterance tables (eval.py's per_utterance.csv) of the
    same mixtures: {si_sdr_imp, sdr_imp, interval}, the mean per-source differences and
    eval.recording_interval's bootstrap of them over the recordings. Both models are scored on
    each mixture, so what the recordings share (how hard they are) cancels out of the interval."""
    ref, oth = reference.set_index("mixture_id"), other.set_index("mixture_id")
    if (ref.index.duplicated().any() or oth.index.duplicated().any()
            or set(ref.index) != set(oth.index)):
        raise ValueError("paired_difference: the two tables do not hold the same mixtures")
    oth = oth.loc[ref.index]
    diff = ref.copy()
    for k in range(1, n_src + 1):
        for metric in ("si_sdr", "sdr"):
            diff[f"source_{k}_{metric}"] = oth[f"source_{k}_{metric}"] - ref[f"source_{k}_{metric}"]
            diff[f"source_{k}_input_{metric}"] = 0.0
    means = {metric: float(np.mean([diff[f"source_{k}_{metric}"] for k in range(1, n_src + 1)]))
             for metric in ("si_sdr", "sdr")}
    return {"si_sdr_imp": means["si_sdr"], "sdr_imp": means["sdr"],
            "interval": recording_interval(diff.reset_index(), n_src)}


def _paired_text(exp_dir: Path, against: Path, n_src: int) -> str:
    tables = [pd.read_csv(d / "eval" / "per_utterance.csv") for d in (against, exp_dir)]
    diff = paired_difference(*tables, n_src)
    interval = diff["interval"]
    return f"{diff['si_sdr_imp']:+.2f}" + (f" [{interval['si_sdr_imp'][0]:+.2f}, "
                                          f"{interval['si_sdr_imp'][1]:+.2f}]" if interval else "")


def quality_row(exp_dir: Path, against: Path | None = None) -> str:
    """One markdown row for an evaluated experiment (with `against`: its paired difference)."""
    metrics = json.loads((exp_dir / "eval" / "final_metrics.json").read_text())
    curve = pd.read_csv(exp_dir / "learning_curve.csv")
    clean = metrics["breakdown"]["clean"]
    clean_text = (f"{clean['si_sdr_imp']:.2f} / {clean['sdr_imp']:.2f} ({clean['n_mixtures']})"
                  if clean["n_mixtures"] else "n/a (0)")
    clean_ibm = clean.get("oracle", {}).get("ibm", {}).get("si_sdr_imp", float("nan"))
    fixed = metrics["oracle"].get("fixed")
    fixed_text = f"{fixed['si_sdr_imp']:.2f}" if fixed else "n/a"
    per_utterance = exp_dir / "eval" / "per_utterance.csv"
    # eval.py writes the interval; evaluations made before it get it from their table.
    interval = metrics.get("interval")
    if interval is None and per_utterance.is_file():
        interval = recording_interval(pd.read_csv(per_utterance), int(metrics.get("n_src", 2)))
    interval_text = (f" [{interval['si_sdr_imp'][0]:.2f}, {interval['si_sdr_imp'][1]:.2f}]"
                     if interval else "")
    return (f"| {exp_dir.name} | {int(curve['step'].iloc[-1])} | "
            f"{curve['train_minutes'].iloc[-1]:.1f} | {curve['val_si_snr_db'].max():.2f} | "
            f"{metrics['si_sdr_imp']:.2f}{interval_text} / {metrics['sdr_imp']:.2f} | {clean_text} | "
            f"{metrics['oracle']['ibm']['si_sdr_imp']:.2f} / {clean_ibm:.2f} | {fixed_text} |"
            + (f" {_paired_text(exp_dir, against, int(metrics.get('n_src', 2)))} |"
               if against is not None else ""))


def quality_table(exp_dirs: Sequence[Path], png: Path | None = None,
                  against: Path | None = None) -> str:
    """The table's markdown (and, with `png`, the experiments' learning curves in one PNG;
    with `against`, each row's paired SI-SNRi difference to that experiment)."""
    if png is not None:
        save_curve_figure(png, {d.name: pd.read_csv(d / "learning_curve.csv") for d in exp_dirs})
    header = HEADER
    if against is not None:
        top, rule = HEADER.split("\n")
        header = f"{top} SI-SNRi against {against.name} [paired 95 % interval] |\n{rule}---|"
    return "\n".join([header, *(quality_row(d, against) for d in exp_dirs)])


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp_dirs", nargs="+", type=Path, help="evaluated experiment folders")
    parser.add_argument("--png", type=Path, default=None, help="learning curves figure")
    parser.add_argument("--against", type=Path, default=None,
                        help="evaluated experiment to compare each row with, mixture by mixture")
    args = parser.parse_args(argv)
    table = quality_table(args.exp_dirs, args.png, args.against)
    print(table)
    return table


if __name__ == "__main__":
    main()
