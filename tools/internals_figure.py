"""What a trained Conv-TasNet does with one mixture (in the manner of the thesis' Figure IV.3).

    python -m tools.internals_figure --exp_dir exp/<tag> --csv data/BSD-2mix/tt.csv --mixture_id ID
    python -m tools.internals_figure --exp_dir exp/<tag> --wav FILE

One PNG (default `<exp_dir>/figures/internals_<mixture id or file stem>.png`) with
  - the encoder and decoder basis functions, each sorted by UPGMA clustering (average linkage,
    Euclidean distance; dendrogram leaf order) and shown as an image, with their magnitude
    responses and a few of them as stacked waveforms;
  - the mixture's encoder representation (filters in the encoder's sorted order x frames),
    every cell coloured by the source that dominates its power: each reference is encoded too
    (with a wav and no references, the model's own masked representations decide);
  - the estimated masks, one panel per source, in the same filter order;
  - the mixture, the separated waveforms and the references.
The excerpt shown is the most energetic `internals_max_s` seconds of the mixture (conf).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.gridspec import GridSpec  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from scipy.cluster.hierarchy import leaves_list, linkage  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from utils.atomic import atomic_path  # noqa: E402
from utils.audio import AudioError, load_audio  # noqa: E402
from utils.config import parse_stage_args  # noqa: E402

DYNAMIC_RANGE_DB = 40.0  # cells quieter than this below the loudest one are drawn white
N_STACKED = 12  # basis functions drawn as waveforms


def upgma_order(filters: np.ndarray) -> np.ndarray:
    """Leaf order of the UPGMA (average-linkage, Euclidean) dendrogram of (N, L) filters."""
    return leaves_list(linkage(filters, method="average", metric="euclidean"))


def most_energetic_window(x: np.ndarray, length: int) -> slice:
    """The `length`-sample window of `x` with the most energy."""
    if x.shape[-1] <= length:
        return slice(0, x.shape[-1])
    energy = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    start = int(np.argmax(energy[length:] - energy[:-length]))
    return slice(start, start + length)


def _match(estimates: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Order of the estimates that best matches the references (normalised correlation)."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    _, order = linear_sum_assignment(unit(references) @ unit(estimates).T, maximize=True)
    return order


def _filters(encoder_or_decoder: torch.nn.Module) -> np.ndarray:
    """(N, L) basis functions; get_filters also gives a pseudo-inverse decoder's."""
    with torch.no_grad():
        return encoder_or_decoder.get_filters().detach().cpu().numpy().reshape(
            encoder_or_decoder.filterbank.n_filters, -1)


def _dominance_image(power_mix: np.ndarray, power_sources: np.ndarray,
                     colours: np.ndarray) -> np.ndarray:
    """RGB image: each cell in the colour of its dominant source, faded by the mixture's level."""
    level_db = 10 * np.log10(power_mix + 1e-12)
    strength = np.clip((level_db - level_db.max() + DYNAMIC_RANGE_DB) / DYNAMIC_RANGE_DB, 0, 1)
    dominant = np.argmax(power_sources, axis=0)
    return 1.0 - strength[..., None] * (1.0 - colours[dominant])


def plot_internals(model: torch.nn.Module, mixture: np.ndarray,
                   references: np.ndarray | None, out_png: str | Path,
                   title: str | None = None) -> Path:
    """Draw encoder/decoder bases, encoder representation, masks and waveforms of one
    mixture (T,) with optional references (n_src, T); writes `out_png` atomically."""
    out_png = Path(out_png)
    model = model.eval().cpu()
    sample_rate = float(model.sample_rate)
    stride = int(model.encoder.filterbank.stride)
    mixture = np.asarray(mixture, dtype=np.float32)
    with torch.no_grad():
        wav = torch.from_numpy(mixture)[None, None]
        rep = model.forward_encoder(wav)                   # (1, N, frames)
        masks = model.forward_masker(rep)                  # (1, n_src, N, frames)
        estimates = model(torch.from_numpy(mixture)[None])[0].numpy()  # (n_src, T)
        masked_rep = model.apply_masks(rep, masks)[0].numpy()
        rep, masks = rep[0].numpy(), masks[0].numpy()
        if references is not None:
            references = np.asarray(references, dtype=np.float32)
            ref_rep = model.forward_encoder(torch.from_numpy(references)[:, None]).numpy()
    n_src = estimates.shape[0]
    if references is not None:
        order = _match(estimates, references)
        estimates, masks, masked_rep = estimates[order], masks[order], masked_rep[order]
        source_power, colour_note = ref_rep ** 2, "dominant reference"
    else:
        source_power, colour_note = masked_rep ** 2, "dominant estimate (no references)"

    encoder_filters, decoder_filters = _filters(model.encoder), _filters(model.decoder)
    encoder_order, decoder_order = upgma_order(encoder_filters), upgma_order(decoder_filters)
    colours = np.array([matplotlib.colors.to_rgb(f"C{k}") for k in range(n_src)])
    n_filters, n_frames = rep.shape
    extent_rep = [0, n_frames * stride / sample_rate, n_filters - 0.5, -0.5]
    time = np.arange(mixture.shape[0]) / sample_rate

    fig = plt.figure(figsize=(15, 12 + 1.6 * n_src))
    grid = GridSpec(4 + n_src, 6, figure=fig, top=0.95, bottom=0.04, hspace=0.6, wspace=0.35,
                    height_ratios=[2.2, 2.4] + [1.6] * n_src + [1.2, 1.2],
                    width_ratios=[3, 3, 1.2, 3, 3, 1.2])

    kernel_ms = encoder_filters.shape[1] / sample_rate * 1000
    for col, (name, filters, order) in enumerate((("encoder", encoder_filters, encoder_order),
                                                  ("decoder", decoder_filters, decoder_order))):
        sorted_filters = filters[order]
        ax = fig.add_subplot(grid[0, 3 * col])
        limit = np.abs(sorted_filters).max() + 1e-12
        ax.imshow(sorted_filters, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                  interpolation="nearest", extent=[0, kernel_ms, n_filters - 0.5, -0.5])
        ax.set(title=f"{name} bases (UPGMA order)", xlabel="ms",
               ylabel="filter" if col == 0 else None)
        ax = fig.add_subplot(grid[0, 3 * col + 1])
        n_fft = max(64, 2 ** int(np.ceil(np.log2(filters.shape[1]))) * 4)
        response = np.abs(np.fft.rfft(sorted_filters, n=n_fft, axis=1))
        response_db = 20 * np.log10(response / (response.max() + 1e-12) + 1e-6)
        ax.imshow(response_db, aspect="auto", cmap="magma", vmin=-40, vmax=0,
                  interpolation="nearest",
                  extent=[0, sample_rate / 2000, n_filters - 0.5, -0.5])
        ax.set(title=f"{name} |response| (dB)", xlabel="kHz", yticks=[])
        ax = fig.add_subplot(grid[0, 3 * col + 2])
        picks = np.linspace(0, n_filters - 1, min(N_STACKED, n_filters)).astype(int)
        for i, pick in enumerate(picks):
            wave = sorted_filters[pick] / (np.abs(sorted_filters[pick]).max() + 1e-12)
            ax.plot(np.linspace(0, kernel_ms, wave.size), i - 0.45 * wave, lw=0.7, color="k")
        ax.set(ylim=(len(picks) - 0.5, -0.5), yticks=range(len(picks)),
               yticklabels=[str(p) for p in picks], xlabel="ms", title="some")
        ax.tick_params(labelsize=7)

    ax = fig.add_subplot(grid[1, :])
    image = _dominance_image(rep[encoder_order] ** 2, source_power[:, encoder_order], colours)
    ax.imshow(image, aspect="auto", interpolation="nearest", extent=extent_rep)
    ax.set(title=f"encoder representation of the mixture; colour: {colour_note}, "
                 f"brightness: mixture power ({DYNAMIC_RANGE_DB:.0f} dB range)",
           xlabel="time (s)", ylabel="filter (encoder UPGMA order)")
    ax.legend(handles=[Patch(color=colours[k], label=f"source {k + 1}") for k in range(n_src)],
              loc="upper right", fontsize=8)

    for k in range(n_src):
        ax = fig.add_subplot(grid[2 + k, :])
        ax.imshow(masks[k][encoder_order], aspect="auto", cmap="viridis", vmin=0,
                  vmax=max(1.0, float(masks.max())), interpolation="nearest", extent=extent_rep)
        ax.set(title=f"estimated mask, source {k + 1}", ylabel="filter", xlabel="time (s)")

    ax = fig.add_subplot(grid[2 + n_src, :])
    ax.plot(time, mixture, color="0.3", lw=0.6)
    ax.set(title="mixture", xlim=(0, time[-1] if time.size else 1))
    ax.tick_params(labelbottom=False)
    ax = fig.add_subplot(grid[3 + n_src, :], sharex=ax)
    peak = max(np.abs(estimates).max(),
               0.0 if references is None else np.abs(references).max()) * 1.1 + 1e-12
    for k in range(n_src):
        offset = 2 * peak * k
        if references is not None:
            ax.plot(time, references[k] - offset, color="0.75", lw=0.6,
                    label="references" if k == 0 else None)
        ax.plot(time, estimates[k] - offset, color=colours[k], lw=0.6,
                label=f"estimate {k + 1}")
    ax.set(title="separated waveforms" + (" (grey: references)" if references is not None
                                           else ""), xlabel="time (s)", yticks=[])
    ax.legend(loc="upper right", fontsize=8, ncol=n_src + 1)

    if title:
        fig.suptitle(title)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out_png


def load_mixture(csv: str | Path, mixture_id: str,
                 sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """A BSD mixture and its references by id."""
    from local.bsd_dataset import BSDDataset

    dataset = BSDDataset(csv, sample_rate, return_id=True)
    ids = dataset.df["mixture_id"].astype(str)
    matches = np.flatnonzero(ids.to_numpy() == str(mixture_id))
    if matches.size == 0:
        raise KeyError(f"{csv}: no mixture '{mixture_id}' (e.g. {', '.join(ids.head(3))})")
    mixture, sources, _ = dataset[int(matches[0])]
    return mixture.numpy(), sources.numpy()


def make_figure(exp_dir: str | Path, max_s: float, csv: str | Path | None = None,
                mixture_id: str | None = None, wav: str | Path | None = None,
                out_png: str | Path | None = None) -> Path:
    """Load the experiment's model and one mixture (BSD csv + id, or a wav); plot."""
    from model import load_best_model

    exp_dir = Path(exp_dir)
    model = load_best_model(exp_dir)
    sample_rate = int(model.sample_rate)
    if wav is not None:
        name, mixture, references = Path(wav).stem, load_audio(wav, sample_rate), None
    elif csv is not None and mixture_id is not None:
        name = str(mixture_id)
        mixture, references = load_mixture(csv, mixture_id, sample_rate)
    else:
        raise ValueError("give --wav, or --csv and --mixture_id")
    window = most_energetic_window(mixture, int(round(max_s * sample_rate)))
    mixture = mixture[window]
    references = None if references is None else references[:, window]
    out_png = Path(out_png) if out_png else exp_dir / "figures" / f"internals_{name}.png"
    plot_internals(model, mixture, references, out_png,
                   title=f"{exp_dir.name}: {name}, {window.start / sample_rate:.2f}-"
                         f"{window.stop / sample_rate:.2f} s")
    print(f"internals_figure: {out_png}")
    return out_png


def main(argv: Sequence[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--exp_dir", required=True, help="exp/<tag> (holds best_model.pth)")
        parser.add_argument("--csv", help="a BSD split csv, e.g. data/BSD-2mix/tt.csv")
        parser.add_argument("--mixture_id", help="a mixture_id of --csv")
        parser.add_argument("--wav", help="any recording instead (no references)")
        parser.add_argument("--out", help="PNG path (default: <exp_dir>/figures/internals_<id>.png)")

    args, conf = parse_stage_args("Plot a trained Conv-TasNet's internals for one mixture.",
                                  argv, add_arguments)
    try:
        make_figure(args.exp_dir, conf["separation"]["internals_max_s"], args.csv,
                    args.mixture_id, args.wav, args.out)
    except (AudioError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"tools.internals_figure: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
