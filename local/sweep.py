"""Stage 5: the sweeps behind the thesis' Tables IV.2, IV.3 and IV.4, then the tables.

The rows are defined in `local/thesis_tables/table_<name>.csv` (local/table_defs.py documents
the columns and how rows become experiments). Training and evaluation are stages 3 and 4's own
scripts (train.py, eval.py), one process each, with the command line's overrides (the budget:
--epochs, --max_minutes) and the row's.

Resumable across calls: a finished experiment (its `.done.sweep` marker names the current
best_model.pth and final_metrics.json) is skipped on rerun; one cut short (killed, or stopped
by --time_limit_minutes) resumes on the next call from its last checkpoint (train.py writes
`last.ckpt` every `checkpoint_every_n_steps` steps), and an evaluation cut short is redone.
`--first` names rows whose experiments run before the others (e.g. the best row), and
`--time_limit_minutes` bounds one call: the experiment running when it expires is stopped, no
other starts, and the tables are built from what is finished.

    python -m local.sweep --conf conf_cpu.yml --data_dir data --exp_root exp --tables IV2 \
        [--librimix_dir DIR] [--wsj0_2mix_dir DIR] [--first IV3/r14] [--time_limit_minutes 9] \
        [--max_minutes 2 ...]
"""
from __future__ import annotations

import argparse
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from local.table_defs import (DATA_OPTIONS, REPO_ROOT, TABLES_DIR, Experiment, SweepError,
                              file_sha256, parse_sweep_args, plan_experiments, read_table)
from local.tables import build_tables
from utils.config import ConfError, read_conf
from utils.stage_marker import clear_done, is_done, mark_done

# After the time limit, a stopped experiment's processes get this long to exit on SIGTERM.
STOP_GRACE_S = 5.0


class TimeLimitReached(Exception):
    """The call's --time_limit_minutes expired while an experiment ran (it resumes next call)."""


def _done_params(experiment: Experiment) -> dict:
    """What a finished row is: this conf and data, and the model and scores now on disk."""
    return {"conf": experiment.conf, "data_dir": str(Path(experiment.data_dir).resolve()),
            "best_model_sha256": file_sha256(experiment.exp_dir / "best_model.pth"),
            "final_metrics_sha256": file_sha256(experiment.exp_dir / "eval" / "final_metrics.json")}


def is_finished(experiment: Experiment) -> bool:
    """Trained and evaluated by the sweep, and neither changed since."""
    return (experiment.data_dir is not None
            and (experiment.exp_dir / "eval" / "final_metrics.json").is_file()
            and is_done(experiment.exp_dir, "sweep", _done_params(experiment)))


def _flat(overrides: dict[str, str]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in (f"--{key}", value)]


def _run(command: list[str], what: str, deadline: float | None) -> None:
    """Run one stage script; at the deadline (time.monotonic()) it is stopped (_stop). It stays
    in the sweep's process group, so a signal to the group (Ctrl-C, timeout(1)) reaches it too."""
    process = subprocess.Popen(command)
    try:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        returncode = process.wait(timeout=timeout)
    except BaseException as err:  # the time limit, or Ctrl-C / SIGTERM of the sweep itself
        _stop(process)
        if isinstance(err, subprocess.TimeoutExpired):
            raise TimeLimitReached(f"{what} stopped by the time limit") from None
        raise
    if returncode != 0:
        raise SweepError(f"{what} failed (exit {returncode}): {shlex.join(command)}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL after STOP_GRACE_S (its DataLoader workers exit with it)."""
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through _run, which stops the running script


def run_experiment(experiment: Experiment, conf_path: str | Path, python: str = sys.executable,
                   deadline: float | None = None) -> None:
    """Train (train.py) and evaluate (eval.py) one experiment, as stages 3 and 4 do; both
    resume or skip what an earlier call finished. TimeLimitReached at the deadline."""
    exp_dir, data_dir = experiment.exp_dir, str(experiment.data_dir)
    clear_done(exp_dir, "sweep")
    exp_dir.mkdir(parents=True, exist_ok=True)
    train_cmd = [python, str(REPO_ROOT / "train.py"), "--conf", str(conf_path), "--data_dir", data_dir,
                 "--exp_dir", str(exp_dir), *_flat(experiment.overrides)]
    # train.py records the command in run_command.txt once it accepts the run.
    train_cmd += ["--run_command", shlex.join(train_cmd)]
    _run(train_cmd, f"training {exp_dir}", deadline)
    _run([python, str(REPO_ROOT / "eval.py"), "--data_dir", data_dir, "--exp_dir", str(exp_dir),
          *_flat(experiment.overrides)], f"evaluation of {exp_dir}", deadline)
    mark_done(exp_dir, "sweep", _done_params(experiment))


def _row_names(experiment: Experiment) -> str:
    return ", ".join(f"{row.table}/{row.row}" for row in experiment.rows)


def order_experiments(experiments: list[Experiment], first: Sequence[str]) -> list[Experiment]:
    """The experiments of the rows named in `first` (`TABLE/row`, or a row id found in one
    table only), in that order, then the others in table order."""
    by_name: dict[str, list[Experiment]] = {}
    for experiment in experiments:
        for row in experiment.rows:
            by_name.setdefault(f"{row.table}/{row.row}", []).append(experiment)
            by_name.setdefault(row.row, []).append(experiment)
    chosen: list[Experiment] = []
    for name in first:
        found = {e.tag: e for e in by_name.get(name, [])}
        if len(found) != 1:
            known = sorted(n for n in by_name if "/" in n)
            raise SweepError(f"--first {name}: " + (
                "a row id of several tables: name it as TABLE/row" if found else
                f"no such row in the tables swept (rows: {', '.join(known)})"))
        (experiment,) = found.values()
        if experiment not in chosen:
            chosen.append(experiment)
    return chosen + [e for e in experiments if e not in chosen]


def run_sweep(tables: Sequence[str], conf_path: str | Path, cli_overrides: dict[str, str],
              exp_root: str | Path, data_dirs: dict[str, str | Path | None],
              tables_dir: str | Path = TABLES_DIR, python: str = sys.executable,
              first: Sequence[str] = (), time_limit_minutes: float = 0) -> list[Experiment]:
    """Train and evaluate every experiment the tables need (those of the `first` rows first),
    skipping finished ones and those whose data set was not given. A failed experiment is
    reported and the others go on; SweepError lists the failures at the end. With a time
    limit (minutes, 0 = none) the experiment running when it expires is stopped and no other
    starts: a rerun goes on from there. Returns the planned experiments, in the order run."""
    conf_file = read_conf(conf_path)
    definitions = [read_table(name, conf_file, tables_dir) for name in tables]
    experiments = order_experiments(
        plan_experiments(definitions, conf_path, cli_overrides, exp_root, data_dirs), first)
    deadline = time.monotonic() + 60 * time_limit_minutes if time_limit_minutes > 0 else None
    failures, left = [], 0
    for i, experiment in enumerate(experiments, 1):
        head = f"sweep [{i}/{len(experiments)}] {experiment.exp_dir} ({_row_names(experiment)})"
        if experiment.data_dir is None:
            print(f"{head}: skipped, no {DATA_OPTIONS[experiment.data]} given", flush=True)
        elif is_finished(experiment):
            print(f"{head}: already trained and evaluated, skipped", flush=True)
        elif deadline is not None and time.monotonic() >= deadline:
            print(f"{head}: not started, the time limit has passed", flush=True)
            left += 1
        else:
            print(f"{head}: training and evaluation", flush=True)
            try:
                run_experiment(experiment, conf_path, python, deadline)
            except TimeLimitReached as err:
                print(f"sweep: {err}; the next call resumes it", flush=True)
                left += 1
            except SweepError as err:
                print(f"sweep: {err}", file=sys.stderr, flush=True)
                failures.append(f"{experiment.exp_dir} ({_row_names(experiment)})")
    if left:
        print(f"sweep: time limit ({time_limit_minutes:g} min) reached, {left} experiment(s) "
              "still to run: rerun the same command to go on", flush=True)
    elif not failures:
        runnable = sum(e.data_dir is not None for e in experiments)
        print(f"sweep: all {runnable} experiment(s) with data finished", flush=True)
    if failures:
        raise SweepError(f"{len(failures)} of {len(experiments)} experiment(s) failed: "
                         + "; ".join(failures) + " (their messages are above; rerun to resume)")
    return experiments


def add_call_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's own options, besides the ones it shares with local.tables."""
    parser.add_argument("--first", default="", help="rows whose experiments run first, in this "
                        "order, space or comma separated: TABLE/row (e.g. IV3/r14) or a row id")
    parser.add_argument("--time_limit_minutes", type=float, default=0.0,
                        help="wall-clock limit of this call (0: none): the experiment running "
                             "then is stopped (the next call resumes it), no other starts, and "
                             "the tables are built")


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_sweep_args("Stage 5: the thesis' table sweeps, then the tables.", argv,
                                       add_call_arguments)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    failed: SweepError | None = None
    try:
        run_sweep(args.tables, args.conf, overrides, args.exp_root, args.data_dirs, args.tables_dir,
                  first=[r for r in re.split(r"[\s,]+", args.first) if r],
                  time_limit_minutes=args.time_limit_minutes)
    except SweepError as err:
        failed = err  # the tables still show what did finish
    written = build_tables(args.tables, args.conf, overrides, args.exp_root, args.data_dirs,
                           args.out_dir, args.tables_dir)
    print("sweep: tables " + ", ".join(str(p) for p in written))
    if failed is not None:
        sys.exit(f"local.sweep: {failed}")


if __name__ == "__main__":
    try:
        main()
    except (SweepError, ConfError) as err:
        sys.exit(f"local.sweep: {err}")
