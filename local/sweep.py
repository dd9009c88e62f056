"""Stage 5: the sweeps behind the thesis' Tables IV.2, IV.3 and IV.4, then the tables.

The rows of each table are defined in one place, `local/thesis_tables/table_<name>.csv`
(name IV2, IV3, IV4; `#` lines are comments, `# title:` and `# note:` lines go into the
table's header). Columns:

  row       row id (unique in the file)
  label     the row's name in the table
  data      bsd (default), librimix or wsj0-2mix: the data set trained and evaluated on
  method    convtasnet (default), or an oracle mask of eval.py (ibm, irm, wiener): the row
            then shows the oracle's scores from the same experiment's evaluation
  <key>     any second-level conf key (n_filters, kernel_size, encoder, mask_act, n_src, ...):
            the row's override of --conf; empty means the conf's value
  thesis_si_snri, thesis_sdri, thesis_params_m, thesis_rf_s
            the thesis' published values (dB, dB, millions of parameters, seconds), typed in
            from the thesis; empty shows as n/a

Each distinct experiment is one directory `<exp_root>/<tag>`, the tag derived as stage 3
derives it: the conf file's name, then `_<key><value>` for every key (in conf order) whose
value the command line or the row changes, then `_<data>` for a data set other than BSD. Rows
that resolve to the same experiment (e.g. an oracle row and its Conv-TasNet row) share it, and
so does a stage-3 run with the same overrides. Training and evaluation are stages 3 and 4's
own scripts (train.py, eval.py), one process each, with the command line's overrides (the
budget: --epochs, --max_minutes) and the row's. A finished row (its `.done.sweep` marker
names the current best_model.pth and final_metrics.json) is skipped on rerun; an interrupted
one resumes from its last checkpoint.

    python -m local.sweep --conf conf_cpu.yml --data_dir data --exp_root exp --tables IV2 \
        [--librimix_dir DIR] [--wsj0_2mix_dir DIR] [--max_minutes 2 ...]
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from local.metrics import ORACLE_MASKS
from model import make_model
from utils.config import Conf, ConfError, apply_overrides, read_conf, split_overrides
from utils.stage_marker import clear_done, is_done, mark_done

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES_DIR = REPO_ROOT / "local" / "thesis_tables"
TABLE_NAMES = ("IV2", "IV3", "IV4")
DATA_SETS = ("bsd", "librimix", "wsj0-2mix")
# The run.sh / command-line option that gives each data set's directory.
DATA_OPTIONS = {"bsd": "--data_dir", "librimix": "--librimix_dir", "wsj0-2mix": "--wsj0_2mix_dir"}
METHODS = ("convtasnet", *ORACLE_MASKS)
META_COLUMNS = ("row", "label", "data", "method")
THESIS_COLUMNS = ("thesis_si_snri", "thesis_sdri", "thesis_params_m", "thesis_rf_s")


class SweepError(ValueError):
    """A table definition that cannot be run, or a row whose training or evaluation failed."""


@dataclass(frozen=True)
class TableRow:
    """One row of a table definition file."""
    table: str
    row: str
    label: str
    data: str
    method: str
    overrides: dict[str, str]   # conf overrides as on a command line ('' cells left out)
    thesis: dict[str, str]      # THESIS_COLUMNS as typed in ('' = not known)


@dataclass(frozen=True)
class TableDefinition:
    name: str
    path: Path
    title: str
    notes: list[str]
    conf_columns: list[str]     # the conf keys the file varies, in its column order
    rows: list[TableRow]


@dataclass(frozen=True)
class Experiment:
    """What one experiment directory is trained and evaluated with."""
    tag: str
    exp_dir: Path
    data: str
    data_dir: Path | None       # None: the data set's directory was not given
    overrides: dict[str, str]   # command line + row: what train.py and eval.py get
    conf: Conf                  # resolved
    rows: list[TableRow] = field(default_factory=list, compare=False)


def normalise_table_name(name: str) -> str:
    """'IV.2', 'iv2', 'table_IV2' -> 'IV2'."""
    short = re.sub(r"^table_?", "", name.strip(), flags=re.I).replace(".", "").upper()
    if short not in TABLE_NAMES:
        raise SweepError(f"unknown table {name!r}: expected some of {', '.join(TABLE_NAMES)}")
    return short


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_table(name: str, conf: Conf, tables_dir: str | Path = TABLES_DIR) -> TableDefinition:
    """Read and check `<tables_dir>/table_<name>.csv` against the conf's keys."""
    name = normalise_table_name(name)
    path = Path(tables_dir) / f"table_{name}.csv"
    if not path.is_file():
        raise SweepError(f"{path}: table definition not found")
    comments = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    title = next((c.split(":", 1)[1].strip() for c in comments if c.startswith("title:")),
                 f"Table {name}")
    notes = [c.split(":", 1)[1].strip() for c in comments if c.startswith("note:")]
    df = pd.read_csv(path, comment="#", dtype=str, keep_default_na=False, skipinitialspace=True)
    conf_keys = {key for values in conf.values() for key in values}
    unknown = [c for c in df.columns if c not in (*META_COLUMNS, *THESIS_COLUMNS) and c not in conf_keys]
    if unknown:
        raise SweepError(f"{path}: column(s) {', '.join(unknown)} are neither conf keys nor "
                         f"{', '.join(META_COLUMNS + THESIS_COLUMNS)}")
    if "row" not in df.columns or (df["row"] == "").any():
        raise SweepError(f"{path}: every row needs a 'row' id")
    duplicated = sorted(set(df["row"][df["row"].duplicated()]))
    if duplicated:
        raise SweepError(f"{path}: row id(s) {', '.join(duplicated)} appear more than once")
    conf_columns = [c for c in df.columns if c in conf_keys]
    rows = []
    for record in df.to_dict("records"):
        data = record.get("data") or "bsd"
        method = record.get("method") or "convtasnet"
        if data not in DATA_SETS:
            raise SweepError(f"{path}, row {record['row']}: data {data!r} is not one of {', '.join(DATA_SETS)}")
        if method not in METHODS:
            raise SweepError(f"{path}, row {record['row']}: method {method!r} is not one of {', '.join(METHODS)}")
        for column in THESIS_COLUMNS:
            if record.get(column, "") != "" and not _is_number(record[column]):
                raise SweepError(f"{path}, row {record['row']}: {column} {record[column]!r} is not "
                                 "a number (type the thesis' value as printed, e.g. 5.1)")
        rows.append(TableRow(table=name, row=record["row"], label=record.get("label") or record["row"],
                             data=data, method=method,
                             overrides={c: record[c] for c in conf_columns if record[c] != ""},
                             thesis={c: record.get(c, "") for c in THESIS_COLUMNS}))
    return TableDefinition(name, path, title, notes, conf_columns, rows)


def derive_tag(conf_path: str | Path, conf_file: Conf, overrides: dict[str, str], data: str) -> str:
    """The experiment name stage 3 (run.sh) derives: conf file name, then `_<key><value>` for
    each override, in conf order; overrides that leave the conf's value unchanged are left out
    (so that rows with the same effective settings share an experiment); `_<data>` last for a
    data set other than BSD."""
    resolved = apply_overrides(conf_file, overrides)
    parts = [Path(conf_path).stem]
    for section, values in conf_file.items():
        for key in values:
            if key in overrides and resolved[section][key] != values[key]:
                parts.append(f"{key}{overrides[key]}")
    if data != "bsd":
        parts.append(data)
    return re.sub(r"[^A-Za-z0-9_.=-]", "", "_".join(parts))


def plan_experiments(tables: Sequence[TableDefinition], conf_path: str | Path,
                     cli_overrides: dict[str, str], exp_root: str | Path,
                     data_dirs: dict[str, str | Path | None]) -> list[Experiment]:
    """The distinct experiments behind the tables' rows, in the order rows first need them
    (each row is in exactly one experiment's `rows`). Every row's conf is checked by building
    its model, so a bad row stops the sweep before anything is trained."""
    conf_file = read_conf(conf_path)
    experiments: dict[str, Experiment] = {}
    for table in tables:
        for row in table.rows:
            overrides = {**cli_overrides, **row.overrides}
            where = f"table {table.name}, row {row.row}"
            try:
                conf = apply_overrides(conf_file, overrides)
                tag = derive_tag(conf_path, conf_file, overrides, row.data)
                if tag not in experiments:
                    make_model(conf)
            except (ConfError, ValueError) as err:
                raise SweepError(f"{where} ({table.path}): {err}") from None
            if tag not in experiments:
                data_dir = data_dirs.get(row.data)
                experiments[tag] = Experiment(tag=tag, exp_dir=Path(exp_root) / tag, data=row.data,
                                              data_dir=Path(data_dir) if data_dir else None,
                                              overrides=overrides, conf=conf)
            experiments[tag].rows.append(row)
    return list(experiments.values())


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's content; None when there is no such file."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


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


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SweepError(f"{what} failed (exit {result.returncode}): {shlex.join(command)}")


def run_experiment(experiment: Experiment, conf_path: str | Path, python: str = sys.executable) -> None:
    """Train (train.py) and evaluate (eval.py) one experiment, as stages 3 and 4 do."""
    exp_dir, data_dir = experiment.exp_dir, str(experiment.data_dir)
    clear_done(exp_dir, "sweep")
    exp_dir.mkdir(parents=True, exist_ok=True)
    train_cmd = [python, str(REPO_ROOT / "train.py"), "--conf", str(conf_path), "--data_dir", data_dir,
                 "--exp_dir", str(exp_dir), *_flat(experiment.overrides)]
    with open(exp_dir / "run_command.txt", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(train_cmd)}\n")
    _run(train_cmd, f"training {exp_dir}")
    _run([python, str(REPO_ROOT / "eval.py"), "--data_dir", data_dir, "--exp_dir", str(exp_dir),
          *_flat(experiment.overrides)], f"evaluation of {exp_dir}")
    mark_done(exp_dir, "sweep", _done_params(experiment))


def _row_names(experiment: Experiment) -> str:
    return ", ".join(f"{row.table}/{row.row}" for row in experiment.rows)


def run_sweep(tables: Sequence[str], conf_path: str | Path, cli_overrides: dict[str, str],
              exp_root: str | Path, data_dirs: dict[str, str | Path | None],
              tables_dir: str | Path = TABLES_DIR, python: str = sys.executable) -> list[Experiment]:
    """Train and evaluate every experiment the tables need, skipping finished ones and those
    whose data set was not given. A failed experiment is reported and the others go on;
    SweepError lists the failures at the end. Returns the planned experiments."""
    conf_file = read_conf(conf_path)
    definitions = [read_table(name, conf_file, tables_dir) for name in tables]
    experiments = plan_experiments(definitions, conf_path, cli_overrides, exp_root, data_dirs)
    failures = []
    for i, experiment in enumerate(experiments, 1):
        head = f"sweep [{i}/{len(experiments)}] {experiment.exp_dir} ({_row_names(experiment)})"
        if experiment.data_dir is None:
            print(f"{head}: skipped, no {DATA_OPTIONS[experiment.data]} given", flush=True)
        elif is_finished(experiment):
            print(f"{head}: already trained and evaluated, skipped", flush=True)
        else:
            print(f"{head}: training and evaluation", flush=True)
            try:
                run_experiment(experiment, conf_path, python)
            except SweepError as err:
                print(f"sweep: {err}", file=sys.stderr, flush=True)
                failures.append(f"{experiment.exp_dir} ({_row_names(experiment)})")
    if failures:
        raise SweepError(f"{len(failures)} of {len(experiments)} experiment(s) failed: "
                         + "; ".join(failures) + " (their messages are above; rerun to resume)")
    return experiments


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line shared by local.sweep and local.tables (besides --key value overrides)."""
    parser.add_argument("--conf", default="conf.yml", help="base configuration of every row")
    parser.add_argument("--data_dir", default="data", help="holds BSD-{n}mix/ (stage 2)")
    parser.add_argument("--librimix_dir", default="",
                        help="a LibriMix tree for Table IV.4's LibriMix rows (empty: not run)")
    parser.add_argument("--wsj0_2mix_dir", default="",
                        help="a wsj0-2mix tree for Table IV.4's wsj0-2mix rows (empty: not run)")
    parser.add_argument("--exp_root", default="exp", help="experiments go to <exp_root>/<tag>")
    parser.add_argument("--tables", default=" ".join(TABLE_NAMES),
                        help=f"which tables, space or comma separated (default: {' '.join(TABLE_NAMES)})")
    parser.add_argument("--tables_dir", default=str(TABLES_DIR), help="where table_<name>.csv are")
    parser.add_argument("--out_dir", default="", help="where the markdown tables go "
                                                      "(default: <exp_root>/tables)")


def parse_sweep_args(description: str, argv: Sequence[str] | None
                     ) -> tuple[argparse.Namespace, dict[str, str]]:
    """Own arguments and the conf overrides (checked against --conf) of a stage-5 command line."""
    parser = argparse.ArgumentParser(description=description, epilog="Any second-level key of "
                                     "the conf file is also accepted as --key value.")
    add_sweep_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = split_overrides(rest)
        apply_overrides(read_conf(args.conf), overrides)
        args.tables = [normalise_table_name(t) for t in re.split(r"[\s,]+", args.tables) if t]
    except (ConfError, SweepError) as err:
        parser.error(str(err))
    args.data_dirs = {"bsd": args.data_dir, "librimix": args.librimix_dir or None,
                      "wsj0-2mix": args.wsj0_2mix_dir or None}
    args.out_dir = args.out_dir or str(Path(args.exp_root) / "tables")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> None:
    from local.tables import build_tables  # local.tables builds on this module

    args, overrides = parse_sweep_args("Stage 5: the thesis' table sweeps, then the tables.", argv)
    failed: SweepError | None = None
    try:
        run_sweep(args.tables, args.conf, overrides, args.exp_root, args.data_dirs, args.tables_dir)
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
