"""Stage 5's table definitions and experiments: the types, readers and command line shared by
the sweep (local/sweep.py, which trains) and the table builder (local/tables.py, which writes
the markdown). Neither imports the other's internals; both import this module.

The rows of each table are defined in one place, `local/thesis_tables/table_<name>.csv`
(name IV2, IV3, IV4, and the optional IV3grid; `#` lines are comments, `# title:` and
`# note:` lines go into the table's header). Cells are read as text, exactly as written: an
empty cell is "not given" (never NaN), "13.0" stays "13.0" (the printed precision is kept,
for the comparison with our figures). Columns:

  row       row id (unique in the file)
  label     the row's name in the table
  data      bsd (default), librimix or wsj0-2mix: the data set trained and evaluated on
  method    convtasnet (default), or an oracle mask of eval.py (ibm, irm, wiener): the row
            then shows the oracle's scores from the same experiment's evaluation
  vs_paper  where the thesis' figure stands against the Conv-TasNet paper's WSJ0-2mix figure
            (free text; empty: not compared)
  note      anything else about the row (free text)
  <key>     any second-level conf key (n_filters, kernel_size, encoder, mask_act, n_src, ...):
            the row's override of --conf; empty means the conf's value
  thesis_<column>
            the thesis' table as printed (../shared/thesis/table_<name>.csv, each column with
            the prefix thesis_; empty on rows the thesis does not have). Four are compared
            with ours and must be numbers: thesis_si_snri_db, thesis_sdri_db (dB),
            thesis_model_size_m (millions of parameters), thesis_receptive_field_s (seconds)

Each distinct experiment is one directory `<exp_root>/<tag>`, the tag derived as stage 3
derives it: the conf file's name, then `_<key><value>` for every key (in conf order) whose
value the command line or the row changes, then `_<data>` for a data set other than BSD. Rows
that resolve to the same experiment (an oracle row and its Conv-TasNet row; two rows printed
with the same hyperparameters) share it, and so does a stage-3 run with the same overrides.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from local.metrics import ORACLE_MASKS
from model import make_model
from utils.config import Conf, ConfError, apply_overrides, read_conf, split_overrides

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES_DIR = REPO_ROOT / "local" / "thesis_tables"
TABLE_NAMES = ("IV2", "IV3", "IV4")       # the thesis' tables: stage 5's default
OPTIONAL_TABLES = ("IV3grid",)            # ours, run only when named
DATA_SETS = ("bsd", "librimix", "wsj0-2mix")
# The run.sh / command-line option that gives each data set's directory.
DATA_OPTIONS = {"bsd": "--data_dir", "librimix": "--librimix_dir", "wsj0-2mix": "--wsj0_2mix_dir"}
METHODS = ("convtasnet", *ORACLE_MASKS)
META_COLUMNS = ("row", "label", "data", "method", "vs_paper", "note")
THESIS_PREFIX = "thesis_"
# The thesis' printed values that are compared with ours (numbers, when given).
THESIS_SI_SNRI, THESIS_SDRI = "thesis_si_snri_db", "thesis_sdri_db"
THESIS_SIZE, THESIS_RF = "thesis_model_size_m", "thesis_receptive_field_s"
THESIS_VALUES = (THESIS_SI_SNRI, THESIS_SDRI, THESIS_SIZE, THESIS_RF)


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
    thesis: dict[str, str]      # every thesis_* column as printed ('' = not in the thesis)
    vs_paper: str = ""
    note: str = ""

    def thesis_value(self, column: str) -> str:
        """A thesis_* cell as printed, '' when the file has no such column or cell."""
        return self.thesis.get(column, "")


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
    """'IV.2', 'iv2', 'table_IV2' -> 'IV2'; 'iv3grid' -> 'IV3grid'."""
    known = {n.upper(): n for n in (*TABLE_NAMES, *OPTIONAL_TABLES)}
    short = re.sub(r"^table_?", "", name.strip(), flags=re.I).replace(".", "").upper()
    if short not in known:
        raise SweepError(f"unknown table {name!r}: expected some of {', '.join(known.values())}")
    return known[short]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_definition_csv(path: str | Path) -> pd.DataFrame:
    """A definition (or thesis) csv as text cells: '' for empty cells, no NaN, no conversion."""
    return pd.read_csv(path, comment="#", dtype=str, keep_default_na=False, skipinitialspace=True)


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
    df = read_definition_csv(path)
    conf_keys = {key for values in conf.values() for key in values}
    unknown = [c for c in df.columns if c not in (*META_COLUMNS, *conf_keys)
               and not c.startswith(THESIS_PREFIX)]
    if unknown:
        raise SweepError(f"{path}: column(s) {', '.join(unknown)} are neither conf keys nor "
                         f"{', '.join(META_COLUMNS)} nor {THESIS_PREFIX}<printed column>")
    if "row" not in df.columns or (df["row"] == "").any():
        raise SweepError(f"{path}: every row needs a 'row' id")
    duplicated = sorted(set(df["row"][df["row"].duplicated()]))
    if duplicated:
        raise SweepError(f"{path}: row id(s) {', '.join(duplicated)} appear more than once")
    conf_columns = [c for c in df.columns if c in conf_keys]
    thesis_columns = [c for c in df.columns if c.startswith(THESIS_PREFIX)]
    rows = []
    for record in df.to_dict("records"):
        data = record.get("data") or "bsd"
        method = record.get("method") or "convtasnet"
        where = f"{path}, row {record['row']}"
        if data not in DATA_SETS:
            raise SweepError(f"{where}: data {data!r} is not one of {', '.join(DATA_SETS)}")
        if method not in METHODS:
            raise SweepError(f"{where}: method {method!r} is not one of {', '.join(METHODS)}")
        for column in THESIS_VALUES:
            if record.get(column, "") != "" and not _is_number(record[column]):
                raise SweepError(f"{where}: {column} {record[column]!r} is not a number "
                                 "(type the thesis' value as printed, e.g. 5.1)")
        rows.append(TableRow(table=name, row=record["row"], label=record.get("label") or record["row"],
                             data=data, method=method,
                             overrides={c: record[c] for c in conf_columns if record[c] != ""},
                             thesis={c: record[c] for c in thesis_columns},
                             vs_paper=record.get("vs_paper", ""), note=record.get("note", "")))
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
                        help=f"which tables, space or comma separated (default: {' '.join(TABLE_NAMES)}; "
                             f"also {', '.join(OPTIONAL_TABLES)})")
    parser.add_argument("--tables_dir", default=str(TABLES_DIR), help="where table_<name>.csv are")
    parser.add_argument("--out_dir", default="", help="where the markdown tables go "
                                                      "(default: <exp_root>/tables)")


def parse_sweep_args(description: str, argv: Sequence[str] | None,
                     add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                     ) -> tuple[argparse.Namespace, dict[str, str]]:
    """Own arguments and the conf overrides (checked against --conf) of a stage-5 command line;
    `add_arguments` adds a script's own options."""
    parser = argparse.ArgumentParser(description=description, epilog="Any second-level key of "
                                     "the conf file is also accepted as --key value.")
    add_sweep_arguments(parser)
    if add_arguments is not None:
        add_arguments(parser)
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
