"""Share a trained model: `<out_dir>/model.pth` and a model card `<out_dir>/README.md`.

    python -m tools.publish --exp_dir exp/<tag> --data_dir data --out_dir exp/<tag>/publish

model.pth is asteroid's serialised model (model_name, model_args, state_dict, infos) extended
the way asteroid's publisher (asteroid.models.publisher) extends it: `dataset`, `task`,
`licenses` (one entry per training recording: title, author, licence and links,
non_commercial) and `infos` (recipe name, training config, final metrics), so that both
`asteroid.models.ConvTasNet.from_pretrained(path)` and `asteroid-upload` accept it.

The card lists the data set's figures (dataset.json), the recordings the model was trained
on with their recordists and licences (clips of the `tr` split, joined with the download's
recordings.csv), what those licences imply for the model, the hyperparameters (the
experiment's resolved conf.yml) and the test metrics (eval/final_metrics.json, if evaluated).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import torch
import yaml

from utils.atomic import atomic_path, atomic_write_text
from utils.config import ConfError, read_conf

RECIPE_NAME = "BirdSep"
TRAIN_SPLIT = "tr"
SELECTION_SPLIT = "cv"  # chose the checkpoint (early stopping, best model)


class PublishError(RuntimeError):
    """An input of the publication is missing or inconsistent."""


def _require(path: Path, how_to_make: str) -> Path:
    if not path.is_file():
        raise PublishError(f"{path} not found: {how_to_make}")
    return path


def licence_info(url: str) -> dict[str, Any]:
    """A Creative Commons licence URL -> short name and its conditions."""
    url = str(url).strip()
    full = "https:" + url if url.startswith("//") else url
    parts = [p for p in full.split("/") if p]
    try:
        i = parts.index("licenses")
        terms, version = parts[i + 1], (parts[i + 2] if len(parts) > i + 2 else "")
        name = f"CC {terms.upper()} {version}".strip()
    except (ValueError, IndexError):
        if "publicdomain" in full:
            terms, name = "cc0", "CC0 / public domain"
        else:
            terms, name = "", url or "unknown"
    conditions = set(terms.lower().split("-"))
    return {"name": name, "url": full, "non_commercial": "nc" in conditions,
            "share_alike": "sa" in conditions, "no_derivatives": "nd" in conditions}


def _recording_key(value: Any) -> str:
    """'XC123', 123 and '123' name the same recording."""
    text = str(value).strip()
    return text[2:] if text.upper().startswith("XC") else text


def split_recordings(data_dir: str | Path, splits: Iterable[str]) -> pd.DataFrame:
    """The recordings (rows of raw/recordings.csv) whose clips are in `splits`, with the
    number of their clips per recording (`n_clips`)."""
    data_dir = Path(data_dir)
    clips_csv = _require(data_dir / "clips" / "clips.csv", "run stage 1 (local/clips.py) first")
    recordings_csv = _require(data_dir / "raw" / "recordings.csv",
                              "run stage 0 (local/download.py) first")
    clips = pd.read_csv(clips_csv, dtype={"recording_id": str, "split": str})
    recordings = pd.read_csv(recordings_csv, dtype={"id": str})
    for name, table, columns in (("clips.csv", clips, {"recording_id", "split"}),
                                 ("recordings.csv", recordings,
                                  {"id", "species", "recordist", "licence", "url"})):
        missing = columns - set(table.columns)
        if missing:
            raise PublishError(f"{name} lacks column(s) {', '.join(sorted(missing))}")
    used = clips[clips["split"].isin(list(splits))]
    counts = used.groupby(used["recording_id"].map(_recording_key)).size().rename("n_clips")
    recordings = recordings.assign(key=recordings["id"].map(_recording_key)).set_index("key")
    unknown = sorted(set(counts.index) - set(recordings.index))
    if unknown:
        raise PublishError(f"{clips_csv}: recording(s) {', '.join(unknown[:5])} are not in "
                           f"{recordings_csv}; the clips and the download do not match")
    table = recordings.loc[counts.index].assign(n_clips=counts)
    return table.reset_index(drop=True).sort_values(["species", "id"], ignore_index=True)


def licence_summary(recordings: pd.DataFrame) -> pd.DataFrame:
    """Recordings per licence, with the licence's conditions."""
    infos = recordings["licence"].map(licence_info)
    table = pd.DataFrame({"licence": infos.map(lambda i: i["name"]),
                          "url": infos.map(lambda i: i["url"]),
                          "non_commercial": infos.map(lambda i: i["non_commercial"]),
                          "share_alike": infos.map(lambda i: i["share_alike"]),
                          "no_derivatives": infos.map(lambda i: i["no_derivatives"]),
                          "recordist": recordings["recordist"]})
    return (table.groupby(["licence", "url", "non_commercial", "share_alike", "no_derivatives"])
            .agg(recordings=("recordist", "size"), recordists=("recordist", "nunique"))
            .reset_index().sort_values("recordings", ascending=False, ignore_index=True))


def licence_implications(summary: pd.DataFrame) -> list[str]:
    """Plain-language consequences of the training licences for sharing the model."""
    nc = bool(summary["non_commercial"].any())
    sa = summary[summary["share_alike"]]
    nd = summary[summary["no_derivatives"]]
    lines = ["Whether trained weights are a derivative (adapted material) of their training "
             "recordings is legally unsettled; the notes below take the conservative reading "
             "that they are, and are not legal advice."]
    if nc:
        n = int(summary.loc[summary["non_commercial"], "recordings"].sum())
        lines.append(f"**NonCommercial**: {n} training recording(s) are NC-licensed, so the model "
                     "(and, conservatively, what it separates) may not be used or shared for "
                     "commercial purposes.")
    if len(sa):
        names = ", ".join(sa["licence"])
        lines.append(f"**ShareAlike** ({names}): a shared model must carry the same licence "
                     "(or a compatible later version), with attribution of every recordist below.")
        if len(set(sa["non_commercial"])) > 1:
            lines.append("**Licence conflict**: the training set mixes BY-SA and BY-NC-SA "
                         "recordings; no single licence satisfies both ShareAlike clauses. Keep "
                         "the model for private research, or retrain on a compatible subset "
                         "(e.g. exclude one family with `--exclude_licences`).")
        elif sa["licence"].str.split().str[-1].nunique() > 1:
            lines.append("ShareAlike licences of several versions: share under the latest version "
                         "(ShareAlike allows a later version of the same licence).")
    if len(nd):
        lines.append("**NoDerivatives**: some recordings forbid adaptations; mixtures and a model "
                     "trained on them should not be shared. Rebuild the data without them.")
    if not (nc or len(sa) or len(nd)):
        lines.append("Only attribution licences (or public domain): share the model under any "
                     "licence, crediting the recordists below.")
    suggested = ("none consistent (see the conflict above)" if len(sa) and
                 len(set(sa["non_commercial"])) > 1 else
                 "CC BY-NC-SA 4.0" if nc and len(sa) else "CC BY-NC 4.0" if nc else
                 "CC BY-SA 4.0" if len(sa) else "CC BY 4.0")
    lines.append(f"Suggested licence for the model: **{suggested}**" +
                 (" (asteroid's default notice, CC BY-SA 3.0, does not fit non-commercial "
                  "training data)." if nc else "."))
    return lines


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}/" if isinstance(value, dict)
                                 else f"{prefix}{key}"))
        return flat
    return {prefix.rstrip("/"): values}


def _md_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(tag: str, conf: dict, dataset: dict, dataset_name: str,
               recordings: pd.DataFrame, selection_recordings: pd.DataFrame,
               metrics: dict | None, versions: dict) -> str:
    """The README.md of a published model."""
    summary = licence_summary(recordings)
    n_src = conf["model"]["n_src"]
    sample_rate = conf["clips"]["sample_rate"]
    out = [f"# {RECIPE_NAME} Conv-TasNet, {dataset_name} (`{tag}`)", "",
           f"Separates a mixture of {n_src} overlapping bird vocalisations (mono, "
           f"{sample_rate} Hz) into {n_src} sources. Trained with the {RECIPE_NAME} recipe "
           "(asteroid ConvTasNet, permutation-invariant SI-SNR) on xeno-canto recordings.", "",
           "```python", "from asteroid.models import ConvTasNet",
           'model = ConvTasNet.from_pretrained("model.pth")  # (batch, time) -> '
           "(batch, n_src, time)", "```", "",
           "Long recordings of any format and rate: `python separate.py --exp <dir with "
           "best_model.pth> FILE --out_dir DIR`.", ""]

    out += ["## Data", "", f"{dataset_name}: mixtures of clips of different species "
            "(`data/" + dataset_name + "/dataset.json`).", ""]
    params = {k: v for k, v in dataset.items() if k != "splits"}
    if params:
        out += [_md_table(list(params.items()), ["parameter", "value"]), ""]
    splits = dataset.get("splits", {})
    if isinstance(splits, dict) and splits:
        columns = sorted({k for s in splits.values() if isinstance(s, dict) for k in s})
        preferred = [c for c in ("n_mixtures", "hours", "n_species", "n_recordings", "n_clips")
                     if c in columns]
        columns = preferred + [c for c in columns if c not in preferred]
        out += [_md_table([[split] + [figures.get(c, "") for c in columns]
                           for split, figures in splits.items()], ["split"] + columns), ""]

    out += ["## Training recordings", "",
            f"{len(recordings)} xeno-canto recordings ({int(recordings['n_clips'].sum())} clips "
            f"of the `{TRAIN_SPLIT}` split) by {recordings['recordist'].nunique()} recordists, "
            f"{recordings['species'].nunique()} species. Another {len(selection_recordings)} "
            f"recordings (`{SELECTION_SPLIT}` split) chose the checkpoint.", "",
            _md_table([[f"[{r.licence}]({r.url})", r.recordings, r.recordists,
                        "yes" if r.non_commercial else "no", "yes" if r.share_alike else "no"]
                       for r in summary.itertuples()],
                      ["licence", "recordings", "recordists", "non-commercial", "share-alike"]),
            "", "### Licence implications", ""]
    out += [f"- {line}" for line in licence_implications(summary)]
    if len(selection_recordings):
        sel = licence_summary(selection_recordings)
        out += ["", f"Licences of the `{SELECTION_SPLIT}` recordings: " +
                ", ".join(f"{r.licence} ({r.recordings})" for r in sel.itertuples()) + "."]
    out += ["", "### Recordists and recordings", "",
            _md_table([[f"[XC{_recording_key(r.id)}]({r.url})", r.species, r.recordist,
                        licence_info(r.licence)["name"], r.n_clips]
                       for r in recordings.itertuples()],
                      ["recording", "species", "recordist", "licence", "clips"]), ""]

    out += ["## Hyperparameters", ""]
    for section in ("model", "training", "optim"):
        if section in conf:
            out += [f"**{section}**", "", _md_table(list(conf[section].items()),
                                                    ["key", "value"]), ""]
    out += ["<details><summary>Full resolved configuration (conf.yml)</summary>", "",
            "```yaml", yaml.safe_dump(conf, sort_keys=False).rstrip(), "```", "", "</details>",
            ""]

    out += ["## Metrics", ""]
    if metrics:
        out += ["On the test split (`eval/final_metrics.json`):", "",
                _md_table(list(_flatten(metrics).items()), ["metric", "value"]), ""]
    else:
        out += ["Not evaluated yet (no `eval/final_metrics.json`): run stage 4 and publish "
                "again.", ""]
    out += ["## Software", "", _md_table(list(versions.items()), ["package", "version"]), ""]
    return "\n".join(out)


def licence_entries(recordings: pd.DataFrame) -> list[dict[str, Any]]:
    """asteroid publisher's `licenses` entries, one per training recording."""
    entries = []
    for r in recordings.itertuples():
        info = licence_info(r.licence)
        entries.append({"title": f"XC{_recording_key(r.id)} {r.species}", "title_link": r.url,
                        "author": r.recordist, "author_link": r.url, "license": info["name"],
                        "license_link": info["url"], "non_commercial": info["non_commercial"]})
    return entries


def publish(exp_dir: str | Path, data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `<out_dir>/model.pth` and `<out_dir>/README.md`; returns out_dir."""
    exp_dir, data_dir, out_dir = Path(exp_dir), Path(data_dir), Path(out_dir)
    conf_path = _require(exp_dir / "conf.yml", "not an experiment directory (train first)")
    _require(exp_dir / "best_model.pth", "train first (run.sh stage 3)")
    try:
        conf = read_conf(conf_path)
    except ConfError as err:
        raise PublishError(str(err)) from None
    n_src = int(conf["model"]["n_src"])
    dataset_name = f"BSD-{n_src}mix"
    dataset_json = _require(data_dir / dataset_name / "dataset.json",
                            "run stage 2 (local/mixtures.py) first")
    dataset = json.loads(dataset_json.read_text())
    recordings = split_recordings(data_dir, [TRAIN_SPLIT])
    if recordings.empty:
        raise PublishError(f"{data_dir / 'clips' / 'clips.csv'}: no clip in split '{TRAIN_SPLIT}'")
    selection = split_recordings(data_dir, [SELECTION_SPLIT])
    metrics_path = exp_dir / "eval" / "final_metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None

    from model import load_best_model

    model_dict = load_best_model(exp_dir).serialize()
    # torch.load(weights_only=True), which from_pretrained uses, refuses TorchVersion objects.
    versions = {k: str(v) for k, v in model_dict["infos"]["software_versions"].items()}
    model_dict["infos"]["software_versions"] = versions
    model_dict.update(dataset=dataset_name, task=f"sep_{n_src}birds",
                      licenses=licence_entries(recordings))
    model_dict["infos"].update(recipe_name=RECIPE_NAME, training_config=conf,
                               final_metrics=metrics or {})
    model_path = out_dir / "model.pth"
    with atomic_path(model_path) as tmp:
        torch.save(model_dict, tmp)
    card = model_card(exp_dir.name, conf, dataset, dataset_name, recordings, selection,
                      metrics, versions)
    atomic_write_text(out_dir / "README.md", card)
    summary = licence_summary(recordings)
    print(f"publish: {model_path} and README.md in {out_dir} ({len(recordings)} training "
          f"recordings, {int(summary['non_commercial'].mul(summary['recordings']).sum())} "
          f"non-commercial; metrics {'included' if metrics else 'missing'})")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a shareable model and its model card.")
    parser.add_argument("--exp_dir", required=True, type=Path, help="exp/<tag>")
    parser.add_argument("--data_dir", required=True, type=Path, help="the recipe's data dir")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="where model.pth and README.md go (default: <exp_dir>/publish)")
    args = parser.parse_args(argv)
    try:
        publish(args.exp_dir, args.data_dir, args.out_dir or args.exp_dir / "publish")
    except (PublishError, FileNotFoundError) as err:
        print(f"tools.publish: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
