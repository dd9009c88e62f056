"""Markdown rows of RESULTS.md's quality comparison, one per evaluated experiment, and one
figure of their learning curves.

    python -m tools.quality_table exp/e4_plateau exp/e4_cos [--png exp/curves.png]

Each row: the training budget used (steps, training minutes from learning_curve.csv), the
best validation SI-SNR, and eval.py's SI-SNRi / SDRi on the test split (with the 95 %
interval of the SI-SNRi over the split's recordings, eval.recording_interval; for older
evaluations, from their per_utterance.csv), on the clean yardstick, and the oracle IBM on
the same mixtures (exp/<tag>/eval/final_metrics.json)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from eval import recording_interval
from utils.training_callbacks import save_curve_figure

HEADER = ("| experiment | steps | train min | best val SI-SNR | test SI-SNRi [95 % interval] / SDRi | "
          "clean yardstick SI-SNRi / SDRi (n) | IBM SI-SNRi (test / clean) |\n"
          "|---|---|---|---|---|---|---|")


def quality_row(exp_dir: Path) -> str:
    """One markdown row for an evaluated experiment."""
    metrics = json.loads((exp_dir / "eval" / "final_metrics.json").read_text())
    curve = pd.read_csv(exp_dir / "learning_curve.csv")
    clean = metrics["breakdown"]["clean"]
    clean_text = (f"{clean['si_sdr_imp']:.2f} / {clean['sdr_imp']:.2f} ({clean['n_mixtures']})"
                  if clean["n_mixtures"] else "n/a (0)")
    clean_ibm = clean.get("oracle", {}).get("ibm", {}).get("si_sdr_imp", float("nan"))
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
            f"{metrics['oracle']['ibm']['si_sdr_imp']:.2f} / {clean_ibm:.2f} |")


def quality_table(exp_dirs: Sequence[Path], png: Path | None = None) -> str:
    """The table's markdown (and, with `png`, the experiments' learning curves in one PNG)."""
    if png is not None:
        save_curve_figure(png, {d.name: pd.read_csv(d / "learning_curve.csv") for d in exp_dirs})
    return "\n".join([HEADER, *(quality_row(d) for d in exp_dirs)])


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp_dirs", nargs="+", type=Path, help="evaluated experiment folders")
    parser.add_argument("--png", type=Path, default=None, help="learning curves figure")
    args = parser.parse_args(argv)
    table = quality_table(args.exp_dirs, args.png)
    print(table)
    return table


if __name__ == "__main__":
    main()
