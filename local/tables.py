"""Stage 5's markdown tables (`<exp_root>/tables/table_IV2.md`, ...) from the experiment
directories the sweep (local/sweep.py) trains: rebuilt from whatever exists, so rows not run
yet show as "not run", and a change to the definition files' text (labels, notes, the thesis'
values) needs no retraining, only a rebuild:

    python -m local.tables --conf conf_cpu.yml --exp_root exp --tables IV2 [--max_minutes 2 ...]

(the same arguments as the sweep, so that the same experiment directories are found).

Per row: our SI-SNRi and SDRi (eval.py's final_metrics.json), the thesis' printed values and
our gap to them, the model size counted from the model and the receptive field computed from
the hyperparameters, each next to the printed one and flagged where the two disagree, where
the thesis' figure stands against the Conv-TasNet paper's, and the budget the experiment ran
under (conf.yml: epochs, max_minutes) and what it used (best_model.pth: epochs, steps, why it
stopped; checkpoints/last.ckpt: Lightning's timer).

Receptive field: one mask frame depends on F = 1 + R (P - 1) (2^X - 1) encoder frames (X
dilated convolutions of kernel P, dilations 1 .. 2^(X-1), repeated R times); an output sample
lies in up to m = ceil(L / S) decoder frames (kernel L, stride S = L/2), so it depends on
(F + m - 2) S + L mixture samples, e.g. 12264 = 1.533 s for L=16, P=3, X=8, R=3 at 8 kHz.
That is the span of the convolutions: with gLN (and BN in training) the normalisation
statistics span the whole utterance on top of it.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from local.table_defs import (DATA_OPTIONS, TABLES_DIR, THESIS_RF, THESIS_SDRI, THESIS_SI_SNRI,
                              THESIS_SIZE, Experiment, SweepError, TableDefinition, TableRow,
                              file_sha256, parse_sweep_args, plan_experiments, read_table)
from model import make_model, model_kwargs
from utils.atomic import atomic_write_text
from utils.config import ConfError, read_conf

# The thesis' symbols (Table IV.1) for the model keys of the conf, in the tables' headers.
SYMBOLS = {"n_filters": "N", "kernel_size": "L", "bn_chan": "B", "hid_chan": "H",
           "skip_chan": "Sc", "conv_kernel_size": "P", "n_blocks": "X", "n_repeats": "R",
           "norm_type": "norm", "mask_act": "mask"}
NOT_RUN = "not run"
NO_VALUE = "—"


def receptive_field_frames(kwargs: dict[str, Any]) -> int:
    """Encoder frames one mask frame depends on, from asteroid's ConvTasNet arguments."""
    return 1 + kwargs["n_repeats"] * (kwargs["conv_kernel_size"] - 1) * (2 ** kwargs["n_blocks"] - 1)


def receptive_field_samples(kwargs: dict[str, Any]) -> int:
    """Mixture samples one output sample depends on through the convolutions (module doc)."""
    kernel, stride = kwargs["kernel_size"], kwargs["stride"]
    frames_per_sample = math.ceil(kernel / stride)
    return (receptive_field_frames(kwargs) + frames_per_sample - 2) * stride + kernel


def conv_tasnet_param_count(kwargs: dict[str, Any]) -> int:
    """Parameters of asteroid's ConvTasNet with free filterbanks, counted by hand from its
    layers (every normalisation, gLN/cLN/cgLN/bN, has a gain and a bias per channel):
    encoder N L; decoder N L (none when it is the encoder's pseudo-inverse); bottleneck
    norm + 1x1 conv N -> B; X R blocks of 1x1 B -> H, PReLU, norm, depthwise P, PReLU, norm,
    1x1 H -> B (residual) and H -> Sc (skip); mask PReLU + 1x1 Sc -> n_src N."""
    n, length = kwargs["n_filters"], kwargs["kernel_size"]
    b, h, sc, p = kwargs["bn_chan"], kwargs["hid_chan"], kwargs["skip_chan"], kwargs["conv_kernel_size"]
    filterbanks = n * length * (1 if kwargs.get("who_is_pinv") else 2)
    bottleneck = 2 * n + n * b + b
    block = (b * h + h) + 1 + 2 * h + (h * p + h) + 1 + 2 * h + (h * b + b) + ((h * sc + sc) if sc else 0)
    mask_in = sc if sc else b
    mask = 1 + mask_in * kwargs["n_src"] * n + kwargs["n_src"] * n
    return filterbanks + bottleneck + kwargs["n_blocks"] * kwargs["n_repeats"] * block + mask


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters, shared ones once (a pseudo-inverse decoder shares the encoder's)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class Result:
    """What an experiment directory holds for one row."""
    status: str                    # NOT_RUN, "trained, not evaluated", ..., or "" when evaluated
    si_snri: float | None = None
    sdri: float | None = None
    n_eval: int | None = None
    budget: str = NO_VALUE
    trained: str = NO_VALUE


def _budget(exp_dir: Path) -> str:
    """The budget in the experiment's conf.yml."""
    training = read_conf(exp_dir / "conf.yml")["training"]
    budget = f"≤{training['epochs']} ep"
    if training["max_minutes"]:
        budget += f", ≤{training['max_minutes']:g} min"
    return budget


def training_minutes(exp_dir: Path) -> float | None:
    """Training time of the experiment, resumes included: Lightning's Timer (the clock of
    --max_minutes, kept in last.ckpt) when the run had a time budget, else the wall time the
    TensorBoard logs span, summed over the runs (first to last event of each)."""
    last = exp_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        timer = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("Timer")), None)
        if timer is not None:
            return timer["time_elapsed"]["train"] / 60
    event_files = sorted((exp_dir / "logs" / "tb").glob("version_*/events.out.tfevents.*"))
    if not event_files:
        return None
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seconds = 0.0
    for path in event_files:
        times = [event.wall_time for event in EventFileLoader(str(path)).Load()]
        seconds += max(times) - min(times) if times else 0.0
    return seconds / 60


def _trained(exp_dir: Path) -> str:
    """Epochs, steps, training minutes and why training stopped."""
    infos = torch.load(exp_dir / "best_model.pth", map_location="cpu", weights_only=True)["infos"]
    text = f"{infos.get('epochs_trained', '?')} ep, {infos.get('global_step', '?')} steps"
    minutes = training_minutes(exp_dir)
    if minutes is not None:
        text += f", {minutes:.1f} min"
    return f"{text} ({infos.get('stop_reason', 'stop reason not recorded')})"


def read_result(experiment: Experiment, method: str) -> Result:
    """The row's scores (the model's, or an oracle's) and budget from its experiment dir."""
    exp_dir = experiment.exp_dir
    if experiment.data_dir is None:
        return Result(f"{NOT_RUN} (no {DATA_OPTIONS[experiment.data]})")
    if not (exp_dir / "best_model.pth").is_file():
        return Result(NOT_RUN)
    result = Result("trained, not evaluated", budget=_budget(exp_dir), trained=_trained(exp_dir))
    metrics_path, marker = exp_dir / "eval" / "final_metrics.json", exp_dir / "eval" / ".done.eval"
    if not metrics_path.is_file() or not marker.is_file():
        return result
    evaluated = json.loads(marker.read_text())
    if evaluated.get("model_sha256") != file_sha256(exp_dir / "best_model.pth"):
        result.status = "evaluation out of date (model retrained)"
        return result
    if not Path(evaluated.get("csv", "")).is_relative_to(Path(experiment.data_dir).resolve()):
        # The tag does not name the data directory: a stage-3/4 run on other data may share it.
        result.status = f"evaluated on other data ({evaluated.get('csv')})"
        return result
    metrics = json.loads(metrics_path.read_text())
    scores = metrics if method == "convtasnet" else (metrics.get("oracle") or {}).get(method)
    if scores is None:
        result.status = "oracles not evaluated (--oracles true)"
        return result
    result.status, result.n_eval = "", metrics["n_utterances"]
    result.si_snri, result.sdri = scores["si_sdr_imp"], scores["sdr_imp"]
    if method != "convtasnet":
        result.budget = result.trained = NO_VALUE  # an oracle is not trained
    return result


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def agrees(ours: float, published: str) -> bool:
    """Whether our value, rounded as the thesis prints its value, is the thesis' value."""
    return abs(ours - float(published)) <= 0.5 * 10 ** -_decimals(published) + 1e-9


def _printed(value: str) -> str:
    return value if value else NO_VALUE


def _db(value: float | None) -> str:
    return NO_VALUE if value is None else f"{value:.2f}"


def _gap(result: Result, row: TableRow) -> str:
    """Ours minus the thesis', SI-SNRi / SDRi, in dB."""
    pairs = ((result.si_snri, row.thesis_value(THESIS_SI_SNRI)), (result.sdri, row.thesis_value(THESIS_SDRI)))
    if result.status or not all(published for _, published in pairs):
        return NO_VALUE
    return " / ".join(f"{ours - float(published):+.2f}" for ours, published in pairs)


def _check(row: TableRow, size_m: float | None, rf_s: float | None) -> str:
    """Model size and receptive field against the thesis' printed ones."""
    checks = []
    for name, ours, column in (("size", size_m, THESIS_SIZE), ("RF", rf_s, THESIS_RF)):
        published = row.thesis_value(column)
        if published and ours is not None:
            shown = f"{ours:.{_decimals(published) + 1}f}"
            checks.append(f"{name} ok" if agrees(ours, published)
                          else f"**{name} differs** ({shown} vs {published} printed)")
    return ", ".join(checks) if checks else NO_VALUE


def _conf_text(value: Any) -> str:
    """A conf value as it is written in conf.yml (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    # Plain pipe table: the field's converter (pandas.to_markdown) needs tabulate, which the
    # recipe does not otherwise use.
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _notes(row: TableRow, table: TableDefinition, by_row: dict[tuple[str, str], Experiment]) -> str:
    """The row's note, and the earlier row of the table it shares its experiment with."""
    notes = [row.note] if row.note else []
    experiment = by_row[(row.table, row.row)]
    twin = next((other for other in table.rows[:table.rows.index(row)]
                 if other.method == row.method and by_row[(other.table, other.row)] is experiment), None)
    if twin is not None:
        notes.append(f"same settings as {twin.label}: one experiment")
    return "; ".join(notes) if notes else NO_VALUE


FULL_HEADER = ("SI-SNRi (dB)", "thesis SI-SNRi", "SDRi (dB)", "thesis SDRi", "ours − thesis (dB)",
               "size (M)", "thesis size", "RF (s)", "thesis RF", "computed vs printed",
               "thesis vs paper (WSJ0-2mix)", "notes", "eval mixtures", "budget", "trained", "experiment")


def table_cells(table: TableDefinition, experiments: list[Experiment]) -> tuple[list[str], list[dict[str, str]]]:
    """The header of the full table (row, the row's conf keys as the thesis' symbols,
    FULL_HEADER) and each row's cells by header."""
    by_row = {(row.table, row.row): exp for exp in experiments for row in exp.rows}
    header = ["row", *(SYMBOLS.get(c, c) for c in table.conf_columns), *FULL_HEADER]
    rows = []
    for row in table.rows:
        experiment = by_row[(row.table, row.row)]
        conf = experiment.conf
        size_m = rf_s = None
        if row.method == "convtasnet":
            size_m = count_parameters(make_model(conf)) / 1e6
            rf_s = receptive_field_samples(model_kwargs(conf)) / conf["clips"]["sample_rate"]
        result = read_result(experiment, row.method)
        values = [_conf_text(next(conf[s][c] for s in conf if c in conf[s])) for c in table.conf_columns]
        rows.append(dict(zip(header, [
            row.label, *values,
            result.status or _db(result.si_snri), _printed(row.thesis_value(THESIS_SI_SNRI)),
            NO_VALUE if result.status else _db(result.sdri), _printed(row.thesis_value(THESIS_SDRI)),
            _gap(result, row),
            NO_VALUE if size_m is None else f"{size_m:.3f}", _printed(row.thesis_value(THESIS_SIZE)),
            NO_VALUE if rf_s is None else f"{rf_s:.3f}", _printed(row.thesis_value(THESIS_RF)),
            _check(row, size_m, rf_s), row.vs_paper or NO_VALUE, _notes(row, table, by_row),
            NO_VALUE if result.n_eval is None else str(result.n_eval),
            result.budget, result.trained, f"`{experiment.exp_dir.name}`"])))
    return header, rows


def _command(experiments: list[Experiment], conf_path: str | Path, cli_overrides: dict[str, str]) -> str:
    data_options = [f"{DATA_OPTIONS[e.data]} {e.data_dir}" for e in experiments if e.data_dir is not None]
    return " ".join([f"--conf {conf_path}", *dict.fromkeys(data_options),
                     *(f"--{k} {v}" for k, v in cli_overrides.items())])


def table_markdown(table: TableDefinition, experiments: list[Experiment], conf_path: str | Path,
                   cli_overrides: dict[str, str]) -> str:
    """The markdown of one table (module doc)."""
    header, rows = table_cells(table, experiments)
    header_text = [f"# {table.title}", "",
                   f"Built {time.strftime('%Y-%m-%d %H:%M')} by stage 5 (`local/tables.py`) from "
                   f"`{table.path.name}`, with `{_command(experiments, conf_path, cli_overrides)}`.", ""]
    for note in table.notes:
        header_text += [note, ""]
    header_text += [
        "Ours: SI-SNRi and SDRi on the test split (eval.py, full-length mixtures); size: "
        "parameters counted from the model, in millions; RF: receptive field of the "
        "convolutions in seconds, from L, P, X, R (`local/tables.py`); budget: the experiment's "
        "epochs / wall-time limits, and what it used. Thesis columns: its values as printed "
        f"(`{table.path.name}`, copied from the thesis' tables), — where the thesis has no such "
        "figure. \"computed vs printed\" compares our size and RF with the printed ones, "
        "rounded as printed there; \"thesis vs paper\" says where the thesis' figure is also "
        "the Conv-TasNet paper's WSJ0-2mix figure (Luo and Mesgarani, IEEE/ACM TASLP 2019).",
        ""]
    return "\n".join(header_text) + "\n" + _markdown_table(header, [[r[h] for h in header] for r in rows])


SUMMARY_HEADER = ["row", "ours SI-SNRi / SDRi", "thesis", "ours − thesis", "size (M) computed / printed",
                  "RF (s) computed / printed", "thesis vs paper (WSJ0-2mix)", "trained"]


def summary_markdown(tables: Sequence[tuple[TableDefinition, list[Experiment]]], conf_path: str | Path,
                     cli_overrides: dict[str, str]) -> str:
    """One compact table per thesis table (for RESULTS.md): scores, the thesis', the gap,
    computed / printed size and RF (flagged where they disagree), what training used."""
    def pair(a: str, b: str) -> str:
        return NO_VALUE if a == b == NO_VALUE else f"{a} / {b}"

    lines = [f"Built {time.strftime('%Y-%m-%d %H:%M')} by stage 5 (`local/tables.py`); the full "
             "tables are `table_<name>.md` beside this file. dB; ours − thesis: SI-SNRi / SDRi.", ""]
    for table, experiments in tables:
        _, rows = table_cells(table, experiments)
        cells = []
        for r in rows:
            flags = r["computed vs printed"]
            size, rf = pair(r["size (M)"], r["thesis size"]), pair(r["RF (s)"], r["thesis RF"])
            size += " **differs**" if "size differs" in flags else ""
            rf += " **differs**" if "RF differs" in flags else ""
            ours = r["SI-SNRi (dB)"] if r["SDRi (dB)"] == NO_VALUE else pair(r["SI-SNRi (dB)"], r["SDRi (dB)"])
            cells.append([r["row"], ours, pair(r["thesis SI-SNRi"], r["thesis SDRi"]),
                          r["ours − thesis (dB)"], size, rf, r["thesis vs paper (WSJ0-2mix)"],
                          r["trained"]])
        lines += [f"### {table.title}", "",
                  f"`{_command(experiments, conf_path, cli_overrides)}`", "",
                  _markdown_table(SUMMARY_HEADER, cells)]
    return "\n".join(lines)


def build_tables(tables: Sequence[str], conf_path: str | Path, cli_overrides: dict[str, str],
                 exp_root: str | Path, data_dirs: dict[str, str | Path | None],
                 out_dir: str | Path, tables_dir: str | Path = TABLES_DIR) -> list[Path]:
    """Write `<out_dir>/table_<name>.md` for each table, then `<out_dir>/summary.md` (all of
    them, compact); returns the paths, summary last."""
    conf_file = read_conf(conf_path)
    written, built = [], []
    for name in tables:
        table = read_table(name, conf_file, tables_dir)
        experiments = plan_experiments([table], conf_path, cli_overrides, exp_root, data_dirs)
        path = Path(out_dir) / f"table_{table.name}.md"
        atomic_write_text(path, table_markdown(table, experiments, conf_path, cli_overrides))
        written.append(path)
        built.append((table, experiments))
    summary = Path(out_dir) / "summary.md"
    atomic_write_text(summary, summary_markdown(built, conf_path, cli_overrides))
    return [*written, summary]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args, overrides = parse_sweep_args("Stage 5's markdown tables from existing experiments.", argv)
    written = build_tables(args.tables, args.conf, overrides, args.exp_root, args.data_dirs,
                           args.out_dir, args.tables_dir)
    print("tables: " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    try:
        main()
    except (SweepError, ConfError) as err:
        sys.exit(f"local.tables: {err}")
