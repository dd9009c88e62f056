"""Stage 4: evaluate a trained separation model on a BSD-{n}mix split.

Writes `<exp_dir>/eval/per_utterance.csv`, `<exp_dir>/eval/final_metrics.json` (SI-SNR and
BSS Eval SDR, their improvements over the mixture, and oracle-mask baselines on the same
mixtures) and a few listening examples with spectrograms under `<exp_dir>/eval/examples/`.

    python eval.py --data_dir data --exp_dir exp/tag [--key value ...]

The configuration is the experiment's resolved `<exp_dir>/conf.yml` (written by training)
with the command-line overrides applied.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm import tqdm

from local.bsd_dataset import BSDDataset
from local.data_layouts import DataLayoutError, open_split, split_fingerprint
from local.metrics import (ORACLE_MASKS, SDR_BACKENDS, band_centroid_hz,
                           level_over_background_db, oracle_estimates, score_estimates,
                           stft_sizes)
from model import load_best_model
from utils.allocator import keep_freed_memory
from utils.atomic import atomic_path, atomic_write_text
from utils.audio import write_wav
from utils.config import Conf, ConfError, parse_stage_args, read_conf
from utils.stage_marker import clear_done, is_done, mark_done

REPO_ROOT = Path(__file__).resolve().parent
# Per-source columns of the split csv copied to the per-utterance table.
SOURCE_INFO_COLUMNS = ("clip_id", "recording_id", "species", "snr_db")
# Utterance-level metric columns summarised in final_metrics.json.
SUMMARY_METRICS = ("input_si_sdr", "si_sdr", "si_sdr_imp", "input_sdr", "sdr", "sdr_imp")
ORACLE_SUMMARY_METRICS = ("si_sdr", "si_sdr_imp", "sdr", "sdr_imp")
ORACLE_TITLES = {"ibm": "IBM", "irm": "IRM", "wiener": "Wiener", "fixed": "fixed filter"}
# Bins (dB) of a reference's level over its own background, for the breakdown.
BACKGROUND_BINS = (-np.inf, 6.0, 10.0, 15.0, 20.0, np.inf)
# Bins (Hz) of the distance between a reference's band centroid and the nearest other
# reference's of its mixture: how far apart in frequency the birds are.
BAND_DISTANCE_BINS = (0.0, 250.0, 500.0, 1000.0, 2000.0, np.inf)
# The interval of the mean SI-SNRi / SDRi over the split's recordings (recording_interval):
# bootstrap resamples, confidence level, and the seed that makes it reproducible.
INTERVAL_RESAMPLES = 2000
INTERVAL_CONFIDENCE = 0.95
INTERVAL_SEED = 0

Separator = Callable[[torch.Tensor], np.ndarray]


def _model_separator(model: torch.nn.Module) -> Separator:
    """Full-length separation on the model's device: mixture (time,) -> (outputs, time)
    float64: the birds, then the background with `model.background_output`."""
    device = next(model.parameters()).device

    def separate(mixture: torch.Tensor) -> np.ndarray:
        estimates = model(mixture[None].to(device))[0]
        return estimates.detach().cpu().double().numpy()

    return separate


def _device() -> torch.device:
    """Where the model and the SDRs run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eval_settings(conf: Conf) -> dict:
    """The conf's evaluation section; keys added to the recipe since an experiment was trained
    (its conf.yml lacks them) take conf.yml's defaults."""
    settings = {**read_conf(REPO_ROOT / "conf.yml")["evaluation"], **conf["evaluation"]}
    if settings["sdr_backend"] not in SDR_BACKENDS:
        raise ConfError(f"--sdr_backend: '{settings['sdr_backend']}' is not one of "
                        f"{', '.join(SDR_BACKENDS)}")
    return settings


def _dataset_description(csv_path: Path) -> dict:
    """What was evaluated: the split csv and the data set's dataset.json (when present)."""
    info_path = csv_path.parent / "dataset.json"
    return {"csv": str(csv_path),
            "dataset": json.loads(info_path.read_text()) if info_path.is_file() else None}


def _utterance_row(row: pd.Series, n_src: int, sample_rate: int, scores: dict,
                   references: np.ndarray) -> dict:
    """One line of the per-utterance table: ids, each reference's level over its own
    background and band centroid, per-source and utterance-mean metrics."""
    out = {"mixture_id": str(row["mixture_id"]), "length": int(row["length"]),
           "duration_s": int(row["length"]) / sample_rate}
    for k in range(1, n_src + 1):
        for info in SOURCE_INFO_COLUMNS:
            column = f"source_{k}_{info}"
            if column in row.index:
                out[column] = row[column]
        out[f"source_{k}_level_over_background_db"] = level_over_background_db(
            references[k - 1], sample_rate)
        out[f"source_{k}_centroid_hz"] = band_centroid_hz(references[k - 1], sample_rate)
    for metric in ("si_sdr", "sdr"):
        for k in range(n_src):
            out[f"source_{k + 1}_input_{metric}"] = float(scores["input"][metric][k])
        out[f"input_{metric}"] = float(np.mean(scores["input"][metric]))
    model_scores = scores.get("model")
    if model_scores is not None:
        for k in range(n_src):
            out[f"source_{k + 1}_estimate"] = int(model_scores["perm"][k]) + 1
            out[f"source_{k + 1}_si_sdr"] = float(model_scores["si_sdr"][k])
            out[f"source_{k + 1}_sdr"] = float(model_scores["sdr"][k])
        for metric in ("si_sdr", "si_sdr_imp", "sdr", "sdr_imp"):
            out[metric] = float(np.mean(model_scores[metric]))
    for name in ORACLE_MASKS:
        if name in scores:
            for metric in ORACLE_SUMMARY_METRICS:
                out[f"{name}_{metric}"] = float(np.mean(scores[name][metric]))
    return out


def _spectrogram_db(audio: np.ndarray, win: int, hop: int) -> np.ndarray:
    window = torch.hann_window(win, dtype=torch.float64)
    spec = torch.stft(torch.as_tensor(audio, dtype=torch.float64), n_fft=win, hop_length=hop,
                      window=window, return_complex=True).abs()
    return (20 * torch.log10(spec + 1e-8)).numpy()


def save_spectrogram_figure(path: Path, mixture: np.ndarray, references: np.ndarray,
                            estimates: np.ndarray, sample_rate: int, win: int, hop: int) -> None:
    """PNG: the mixture on top, then one row per source (reference | estimate), same dB scale."""
    from matplotlib.figure import Figure  # Agg canvas; no pyplot state, no display needed

    n_src = references.shape[0]
    specs = [_spectrogram_db(x, win, hop) for x in (mixture, *references, *estimates)]
    vmax = max(float(s.max()) for s in specs)
    extent = (0, mixture.shape[-1] / sample_rate, 0, sample_rate / 2000)
    fig = Figure(figsize=(10, 2.2 * (n_src + 1)), layout="constrained")
    grid = fig.add_gridspec(n_src + 1, 2)
    panels = [(grid[0, :], "mixture", specs[0])]
    for k in range(n_src):
        panels.append((grid[k + 1, 0], f"reference s{k + 1}", specs[1 + k]))
        panels.append((grid[k + 1, 1], f"estimate s{k + 1}", specs[1 + n_src + k]))
    for cell, title, spec in panels:
        ax = fig.add_subplot(cell)
        image = ax.imshow(spec, origin="lower", aspect="auto", extent=extent, cmap="magma",
                          vmin=vmax - 80, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("kHz")
    ax.set_xlabel("time (s)")
    fig.colorbar(image, ax=fig.axes, label="dB", shrink=0.6)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def save_example(example_dir: Path, mixture: np.ndarray, references: np.ndarray,
                 estimates: np.ndarray, sample_rate: int, win: int, hop: int,
                 background: np.ndarray | None = None) -> None:
    """mixture.wav, s<k>.wav, s<k>_estimate.wav (estimates aligned to the references),
    background_estimate.wav for a model with a background output, and spectrograms.png."""
    write_wav(example_dir / "mixture.wav", mixture, sample_rate)
    if background is not None:
        write_wav(example_dir / "background_estimate.wav", background, sample_rate)
    for k in range(references.shape[0]):
        write_wav(example_dir / f"s{k + 1}.wav", references[k], sample_rate)
        write_wav(example_dir / f"s{k + 1}_estimate.wav", estimates[k], sample_rate)
    save_spectrogram_figure(example_dir / "spectrograms.png", mixture, references, estimates,
                            sample_rate, win, hop)


def _score_split(dataset: BSDDataset, separate: Separator | None, settings: dict,
                 sample_rate: int, with_oracles: bool, examples_dir: Path | None,
                 device: torch.device, desc: str) -> pd.DataFrame:
    """Score every mixture of `dataset`; the input metrics are computed once and shared by
    the model and the oracles, all SDRs of a mixture in one batch."""
    win, hop = stft_sizes(sample_rate, settings["oracle_win_ms"], settings["oracle_hop_ms"])
    n_save = settings["n_save_examples"] if examples_dir is not None else 0
    rows = []
    with torch.inference_mode():
        for idx in tqdm(range(len(dataset)), desc=desc, unit="mix", dynamic_ncols=True):
            mixture_t, references_t, mixture_id = dataset[idx]
            mixture = mixture_t.double().numpy()
            references = references_t.double().numpy()
            estimates: dict[str, np.ndarray] = {}
            background = None
            if separate is not None:
                # The birds are scored; a background output (the model's last) is only saved.
                outputs = separate(mixture_t)
                estimates["model"], background = outputs[:dataset.n_src], outputs[dataset.n_src:]
            if with_oracles:
                estimates.update(oracle_estimates(mixture, references, win, hop))
            if not np.isfinite(mixture).all() or not all(np.isfinite(e).all()
                                                          for e in estimates.values()):
                raise ValueError(f"{mixture_id}: non-finite mixture or estimates")
            scores = score_estimates(mixture, references, estimates, settings["sdr_backend"],
                                     device)
            rows.append(_utterance_row(dataset.df.iloc[idx], dataset.n_src, sample_rate, scores,
                                       references))
            if separate is not None and idx < n_save:
                aligned = estimates["model"][scores["model"]["perm"]]
                save_example(examples_dir / mixture_id, mixture, references, aligned,
                             sample_rate, win, hop, background[0] if len(background) else None)
    return pd.DataFrame(rows)


def _band_distance_hz(df: pd.DataFrame, n_src: int) -> pd.DataFrame:
    """Per mixture and source, the distance (Hz) from the source's band centroid to the
    nearest other source's (NaN where the table has no centroids: older evaluations)."""
    columns = [f"source_{k}_centroid_hz" for k in range(1, n_src + 1)]
    if not set(columns) <= set(df.columns):
        return pd.DataFrame(np.nan, index=df.index, columns=range(n_src))
    centroids = df[columns].to_numpy(dtype=float)
    gaps = np.abs(centroids[:, :, None] - centroids[:, None, :])
    gaps[:, np.arange(n_src), np.arange(n_src)] = np.inf
    return pd.DataFrame(gaps.min(axis=2), index=df.index)


def _per_source(df: pd.DataFrame, n_src: int) -> pd.DataFrame:
    """The per-utterance table with one row per source: its species, recording, level over
    background, band distance to the other birds, SI-SNRi and SDRi (columns an older table
    lacks come out as "?" or NaN)."""
    band_distance = _band_distance_hz(df, n_src)
    unknown = pd.Series(["?"] * len(df), index=df.index)
    nan = pd.Series(np.nan, index=df.index)
    return pd.concat([pd.DataFrame({
        "species": df.get(f"source_{k}_species", unknown),
        "recording": df.get(f"source_{k}_recording_id", unknown).astype(str),
        "level_db": df.get(f"source_{k}_level_over_background_db", nan),
        "band_distance_hz": band_distance[k - 1],
        "si_sdr_imp": df[f"source_{k}_si_sdr"] - df[f"source_{k}_input_si_sdr"],
        "sdr_imp": df.get(f"source_{k}_sdr", nan) - df.get(f"source_{k}_input_sdr", nan)})
        for k in range(1, n_src + 1)], ignore_index=True)


def _mean_by(per_source: pd.DataFrame, groups: pd.Series) -> dict:
    """{group: {n_sources, si_sdr_imp}} of the sources' SI-SNRi by `groups`."""
    return {str(name): {"n_sources": int(len(group)),
                        "si_sdr_imp": float(group["si_sdr_imp"].mean())}
            for name, group in per_source.groupby(groups, observed=True)}


def breakdown(df: pd.DataFrame, n_src: int, clean_level_db: float) -> dict:
    """Where the model's SI-SNRi comes from: per source, by the reference's level over its own
    background, by how far its band lies from the other birds' (band centroids), and by
    species; and the clean yardstick, the mixtures whose every reference
    stands at least `clean_level_db` above its background (scored against those references,
    as everywhere), next to the oracle masks on the same mixtures."""
    per_source = _per_source(df, n_src)
    by_level = _mean_by(per_source, pd.cut(per_source["level_db"], BACKGROUND_BINS, right=False))
    by_distance = _mean_by(per_source, pd.cut(per_source["band_distance_hz"],
                                              BAND_DISTANCE_BINS, right=False))
    by_species = _mean_by(per_source, per_source["species"])
    levels = df[[f"source_{k}_level_over_background_db" for k in range(1, n_src + 1)]]
    clean = df[levels.min(axis=1) >= clean_level_db]
    clean_summary: dict = {"clean_level_db": clean_level_db, "n_mixtures": int(len(clean))}
    if len(clean):
        clean_summary.update({m: float(clean[m].mean()) for m in ("si_sdr_imp", "sdr_imp")})
        clean_summary["oracle"] = {name: {m: float(clean[f"{name}_{m}"].mean())
                                          for m in ("si_sdr_imp", "sdr_imp")}
                                   for name in ORACLE_MASKS if f"{name}_si_sdr_imp" in clean}
    return {"correlation_level_si_sdr_imp": float(per_source["level_db"].corr(
                per_source["si_sdr_imp"])),
            "median_level_over_background_db": float(per_source["level_db"].median()),
            "by_level_over_background_db": by_level, "by_band_distance_hz": by_distance,
            "by_species": by_species,
            "clean": clean_summary}


def recording_interval(df: pd.DataFrame, n_src: int, n_resamples: int = INTERVAL_RESAMPLES,
                       confidence: float = INTERVAL_CONFIDENCE, seed: int = INTERVAL_SEED
                       ) -> dict | None:
    """How far the split's mean SI-SNRi and SDRi could move with another draw of its
    recordings: a percentile bootstrap (scipy.stats.bootstrap) that resamples recordings, not
    mixtures. A split's mixtures reuse a few recordings (BSD-2mix tt: 496 mixtures from 24),
    and scores cluster by recording, so resampling mixtures would claim a precision the split
    does not have. Each source counts for its own recording; the mean over the resampled
    recordings' sources is the split's mean (every mixture has n_src sources).

    Returns {n_recordings, confidence, n_resamples, si_sdr_imp: [low, high], sdr_imp: [low,
    high]}, or None when the table has no recording ids or fewer than two recordings."""
    if not {f"source_{k}_recording_id" for k in range(1, n_src + 1)} <= set(df.columns):
        return None
    per_recording = _per_source(df, n_src).groupby("recording").agg(
        n=("si_sdr_imp", "size"), si_sdr_imp=("si_sdr_imp", "sum"), sdr_imp=("sdr_imp", "sum"))
    if len(per_recording) < 2:
        return None

    def pooled_mean(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sum(sums, axis=axis) / np.sum(counts, axis=axis)

    result: dict = {"n_recordings": int(len(per_recording)), "confidence": confidence,
                    "n_resamples": n_resamples}
    for metric in ("si_sdr_imp", "sdr_imp"):
        ci = stats.bootstrap((per_recording[metric].to_numpy(), per_recording["n"].to_numpy()),
                             pooled_mean, paired=True, vectorized=True,
                             n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", random_state=np.random.default_rng(seed)
                             ).confidence_interval
        result[metric] = [float(ci.low), float(ci.high)]
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _summary(df: pd.DataFrame, with_model: bool, with_oracles: bool) -> dict:
    summary: dict = {}
    if with_model:
        summary.update({m: float(df[m].mean()) for m in SUMMARY_METRICS})
    else:
        summary.update({m: float(df[m].mean()) for m in ("input_si_sdr", "input_sdr")})
    summary["n_utterances"] = int(len(df))
    summary["oracle"] = ({name: {m: float(df[f"{name}_{m}"].mean()) for m in ORACLE_SUMMARY_METRICS}
                          for name in ORACLE_MASKS} if with_oracles else None)
    return summary


def evaluate(conf: Conf, data_dir: str | Path, exp_dir: str | Path) -> dict:
    """Evaluate `<exp_dir>`'s best model on `<data_dir>/BSD-{n_src}mix/{eval_on}.csv`.

    Returns the content of final_metrics.json."""
    exp_dir = Path(exp_dir)
    settings = _eval_settings(conf)
    n_src, sample_rate = conf["model"]["n_src"], conf["clips"]["sample_rate"]
    dataset = open_split(data_dir, n_src, settings["eval_on"], sample_rate, segment_s=None,
                         return_id=True)
    csv_path = dataset.csv_path
    if dataset.n_src != n_src:
        raise ConfError(f"{csv_path} has {dataset.n_src} sources, the model {n_src} (--n_src)")

    keep_freed_memory()   # large activations reused, not page-faulted again (utils/allocator.py)
    model = load_best_model(exp_dir)
    n_outputs = model.get_model_args()["n_src"]
    if n_outputs != n_src + int(model.background_output):
        raise ConfError(f"{exp_dir / 'best_model.pth'} has {n_outputs} outputs (background "
                        f"output: {model.background_output}), {csv_path} {n_src} sources")
    if getattr(model, "sample_rate", sample_rate) != sample_rate:
        raise ConfError(f"model trained at {model.sample_rate} Hz, data at {sample_rate} Hz "
                        "(--sample_rate)")
    eval_dir = exp_dir / "eval"
    # Done-marker: the same model, data and settings are not evaluated twice.
    marker_params = {**settings, "n_src": n_src, "sample_rate": sample_rate,
                     "csv": str(csv_path.resolve()), "csv_sha256": split_fingerprint(dataset),
                     "model_sha256": _sha256(exp_dir / "best_model.pth")}
    if is_done(eval_dir, "eval", marker_params) and (eval_dir / "final_metrics.json").is_file():
        metrics = json.loads((eval_dir / "final_metrics.json").read_text())
        print(f"eval: already done for this model, data and settings -> {eval_dir} "
              f"(SI-SNRi {metrics['si_sdr_imp']:.2f} dB, SDRi {metrics['sdr_imp']:.2f} dB)")
        return metrics
    clear_done(eval_dir, "eval")
    shutil.rmtree(eval_dir / "examples", ignore_errors=True)  # none left from another run
    device = _device()
    model = model.to(device).eval()

    df = _score_split(dataset, _model_separator(model), settings, sample_rate,
                      settings["oracles"], eval_dir / "examples", device, desc=f"eval {exp_dir.name}")
    with atomic_path(eval_dir / "per_utterance.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")

    metrics = _summary(df, with_model=True, with_oracles=settings["oracles"])
    metrics["breakdown"] = breakdown(df, n_src, settings["clean_level_db"])
    metrics["interval"] = recording_interval(df, n_src)
    metrics.update({"checkpoint": str(exp_dir / "best_model.pth"), "split": settings["eval_on"],
                    "n_src": n_src, "sample_rate": sample_rate,
                    "sdr_backend": settings["sdr_backend"], "device": str(device),
                    "data": _dataset_description(csv_path)})
    atomic_write_text(eval_dir / "final_metrics.json", json.dumps(metrics, indent=2) + "\n")

    line = (f"eval: {metrics['n_utterances']} mixtures of {csv_path}: SI-SNRi "
            f"{metrics['si_sdr_imp']:.2f} dB, SDRi {metrics['sdr_imp']:.2f} dB")
    if metrics["interval"]:
        interval = metrics["interval"]
        line += (f" ({interval['confidence']:.0%} interval over its {interval['n_recordings']} "
                 f"recordings: SI-SNRi {interval['si_sdr_imp'][0]:.2f} to "
                 f"{interval['si_sdr_imp'][1]:.2f} dB)")
    if metrics["oracle"]:
        line += " (oracle SI-SNRi " + ", ".join(
            f"{ORACLE_TITLES[name]} {metrics['oracle'][name]['si_sdr_imp']:.2f}" for name in ORACLE_MASKS) + ")"
    clean = metrics["breakdown"]["clean"]
    if clean["n_mixtures"]:
        line += (f"; clean yardstick ({clean['n_mixtures']} mixtures, references >= "
                 f"{clean['clean_level_db']:g} dB over their background): SI-SNRi "
                 f"{clean['si_sdr_imp']:.2f} dB, SDRi {clean['sdr_imp']:.2f} dB")
    print(f"{line} -> {eval_dir}")
    mark_done(eval_dir, "eval", marker_params)
    return metrics


def evaluate_oracles(data_dir: str | Path, n_src: int, split: str, sample_rate: int,
                     conf: Conf | None = None) -> dict:
    """Oracle-mask baselines (IBM, IRM, Wiener-like) on `<data_dir>/BSD-{n_src}mix/{split}.csv`;
    no model needed. STFT sizes and SDR backend come from `conf` (default: the recipe's
    conf.yml). Returns {input_si_sdr, input_sdr, n_utterances, oracle: {ibm: {...}, ...}, data}."""
    settings = _eval_settings(conf if conf is not None else read_conf(REPO_ROOT / "conf.yml"))
    dataset = open_split(data_dir, n_src, split, sample_rate, segment_s=None, return_id=True)
    csv_path = dataset.csv_path
    device = _device()
    df = _score_split(dataset, None, settings, sample_rate, with_oracles=True, examples_dir=None,
                      device=device, desc=f"oracles BSD-{n_src}mix/{split}")
    result = _summary(df, with_model=False, with_oracles=True)
    result.update({"split": split, "n_src": n_src, "sample_rate": sample_rate,
                   "sdr_backend": settings["sdr_backend"], "data": _dataset_description(csv_path)})
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data_dir", required=True, help="data directory (holds BSD-{n}mix), "
                            "or a LibriMix or wsj0-2mix tree (local/data_layouts.py)")
        parser.add_argument("--exp_dir", required=True, help="experiment directory (exp/<tag>)")

    # The default configuration is the experiment's resolved conf.yml, not the recipe's.
    if not any(a == "--conf" or a.startswith("--conf=") for a in argv):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--exp_dir")
        exp_dir = pre.parse_known_args(argv)[0].exp_dir
        if exp_dir is not None:
            argv = ["--conf", str(Path(exp_dir) / "conf.yml"), *argv]
    args, conf = parse_stage_args(__doc__.split("\n\n")[0], argv, add_arguments)
    try:
        return evaluate(conf, args.data_dir, args.exp_dir)
    except (ConfError, FileNotFoundError, DataLayoutError) as err:
        sys.exit(f"eval.py: {err}")


if __name__ == "__main__":
    main()
