"""Separation metrics and oracle masks for evaluation.

- SI-SNR (scale-invariant, zero-mean; asteroid's pairwise SI-SDR) with the best permutation
  of the estimates found by SI-SNR PIT.
- SDR as BSS Eval defines it (bss_eval_sources, 512-tap distortion filter): fast_bss_eval,
  or mir_eval as the slow reference implementation.
- Oracle time-frequency masks (IBM, IRM, Wiener-like) on an STFT of the mixture, the upper
  baselines of the Conv-TasNet paper.

Signals are numpy arrays: mixture (time,), references and estimates (n_src, time).
"""
from __future__ import annotations

import numpy as np
import torch
from asteroid.losses import PITLossWrapper

SDR_BACKENDS = ("fast_bss_eval", "mir_eval")
ORACLE_MASKS = ("ibm", "irm", "wiener")
# bss_eval_sources' distortion filter length (BSS Eval v3/v4 and mir_eval use 512 taps).
BSS_EVAL_FILTER_LENGTH = 512


def pairwise_si_snr(estimates: np.ndarray, references: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """SI-SNR in dB of every estimate against every reference: (n_est, n_ref), [i, j] = est i
    vs ref j. Zero-mean, target = projection of the estimate on the reference; the same
    definition (and eps) as asteroid's pairwise_neg_sisdr, computed from inner products
    (one matrix product instead of an (n_est, n_ref, time) tensor)."""
    est = np.asarray(estimates, dtype=np.float64)
    ref = np.asarray(references, dtype=np.float64)
    est = est - est.mean(axis=-1, keepdims=True)
    ref = ref - ref.mean(axis=-1, keepdims=True)
    dot = est @ ref.T
    ref_energy = np.sum(ref ** 2, axis=-1) + eps
    target_energy = dot ** 2 * np.sum(ref ** 2, axis=-1) / ref_energy ** 2
    # |est - target|^2 = |est|^2 - 2 a <est, ref> + a^2 |ref|^2 with a = <est, ref> / (|ref|^2 + eps)
    scale = dot / ref_energy
    noise_energy = (np.sum(est ** 2, axis=-1)[:, None] - 2 * scale * dot + target_energy)
    noise_energy = np.maximum(noise_energy, 0.0)
    return 10 * np.log10(target_energy / (noise_energy + eps) + eps)


def best_permutation(pairwise_scores: np.ndarray) -> np.ndarray:
    """perm maximising the mean score, with estimate perm[j] assigned to reference j.

    `pairwise_scores` is (n_est, n_ref), [i, j] = score of estimate i against reference j."""
    losses = -torch.as_tensor(pairwise_scores)[None]
    _, perm = PITLossWrapper.find_best_perm(losses)
    return perm[0].numpy()


def bss_sdr(estimate_sets: np.ndarray, references: np.ndarray, backend: str,
            device: str | torch.device = "cpu") -> np.ndarray:
    """BSS Eval SDR (dB) of aligned estimates: estimate_sets (K, n_src, time), references
    (n_src, time) -> (K, n_src), [k, j] = SDR of estimate_sets[k, j] against reference j.

    The SDR of source j depends only on reference j (distortion filter on reference j), so
    fast_bss_eval's pairwise mode is used: one Toeplitz system per reference, solved for
    all K estimates at once, instead of K systems per reference. fast_bss_eval runs on torch
    (float64) on `device`: a GPU when there is one, and on CPU torch's thread pool rather
    than OpenBLAS's, which oversubscribes a busy machine.
    """
    estimate_sets = np.asarray(estimate_sets, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    n_sets, n_src, n_samples = estimate_sets.shape
    if references.shape != (n_src, n_samples):
        raise ValueError(f"references {references.shape} do not match estimates {estimate_sets.shape}")
    if backend == "fast_bss_eval":
        import fast_bss_eval

        # Identical rows (the mixture, as the estimate of every source) are scored once.
        flat = estimate_sets.reshape(n_sets * n_src, n_samples)
        unique_index: dict[bytes, int] = {}  # row content -> index among the distinct rows
        row_of = np.array([unique_index.setdefault(row.tobytes(), len(unique_index)) for row in flat])
        unique = flat[np.unique(row_of, return_index=True)[1]]
        # (n_ref, n_unique): SDR of every distinct estimate against every reference.
        # Batched float64 torch.linalg.solve fails on more than one CPU thread in this torch
        # build (pytorch/pytorch#142815, reproduced here): solve on one thread.
        threads = torch.get_num_threads()
        if torch.device(device).type == "cpu":
            torch.set_num_threads(1)
        try:
            sdr_all = -fast_bss_eval.sdr_loss(torch.from_numpy(unique).to(device),
                                              torch.from_numpy(references).to(device),
                                              filter_length=BSS_EVAL_FILTER_LENGTH, pairwise=True)
        finally:
            torch.set_num_threads(threads)
        sdr_all = sdr_all.cpu().numpy()
        ref_index = np.tile(np.arange(n_src), n_sets)
        return sdr_all[ref_index, row_of.reshape(-1)].reshape(n_sets, n_src)
    if backend == "mir_eval":
        import warnings

        from mir_eval.separation import bss_eval_sources

        with warnings.catch_warnings():  # bss_eval_sources is deprecated (still the reference)
            warnings.simplefilter("ignore", FutureWarning)
            return np.stack([bss_eval_sources(references, est, compute_permutation=False)[0]
                             for est in estimate_sets])
    raise ValueError(f"unknown SDR backend '{backend}'; expected one of {', '.join(SDR_BACKENDS)}")


def score_estimates(mixture: np.ndarray, references: np.ndarray,
                    estimates: dict[str, np.ndarray], sdr_backend: str,
                    device: str | torch.device = "cpu") -> dict[str, dict[str, np.ndarray]]:
    """Metrics of the mixture (input) and of each named estimate set, per reference.

    Returns {"input": {"si_sdr", "sdr"}, name: {"si_sdr", "sdr", "si_sdr_imp", "sdr_imp",
    "perm"}}; every value is (n_src,) in reference order. Each estimate set is reordered by
    its best SI-SNR permutation (perm[j] = estimate assigned to reference j) before scoring.
    All SDRs of one utterance are computed in one batch.
    """
    mixture = np.asarray(mixture, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    n_src = references.shape[0]
    mixture_as_estimates = np.tile(mixture, (n_src, 1))
    input_si_sdr = np.diag(pairwise_si_snr(mixture_as_estimates, references))

    aligned, results = [mixture_as_estimates], {}
    for name, est in estimates.items():
        est = np.asarray(est, dtype=np.float64)
        if est.shape != references.shape:
            raise ValueError(f"{name}: estimates {est.shape}, references {references.shape}")
        pairwise = pairwise_si_snr(est, references)
        perm = best_permutation(pairwise)
        si_sdr = pairwise[perm, np.arange(n_src)]
        results[name] = {"si_sdr": si_sdr, "si_sdr_imp": si_sdr - input_si_sdr, "perm": perm}
        aligned.append(est[perm])

    sdr = bss_sdr(np.stack(aligned), references, sdr_backend, device)
    scores = {"input": {"si_sdr": input_si_sdr, "sdr": sdr[0]}}
    for k, name in enumerate(estimates, start=1):
        results[name]["sdr"] = sdr[k]
        results[name]["sdr_imp"] = sdr[k] - sdr[0]
        scores[name] = results[name]
    return scores


def stft_sizes(sample_rate: int, win_ms: float, hop_ms: float) -> tuple[int, int]:
    """Window and hop lengths in samples for a duration in ms at `sample_rate`."""
    win = int(round(win_ms * sample_rate / 1000))
    hop = int(round(hop_ms * sample_rate / 1000))
    if win < 2 or not 0 < hop <= win:
        raise ValueError(f"bad STFT sizes: window {win_ms} ms, hop {hop_ms} ms at {sample_rate} Hz")
    return win, hop


def oracle_estimates(mixture: np.ndarray, references: np.ndarray, win: int, hop: int,
                     masks: tuple[str, ...] = ORACLE_MASKS) -> dict[str, np.ndarray]:
    """Estimates obtained by masking the mixture's STFT with oracle masks computed from the
    references (Hann window `win`, hop `hop` samples); each (n_src, time).

    ibm: 1 where the source dominates the bin; irm: |S_i| / sum_j |S_j|;
    wiener: |S_i|^2 / sum_j |S_j|^2.
    """
    unknown = set(masks) - set(ORACLE_MASKS)
    if unknown:
        raise ValueError(f"unknown oracle mask(s) {sorted(unknown)}; expected {ORACLE_MASKS}")
    n_src, n_samples = references.shape
    window = torch.hann_window(win, dtype=torch.float64)

    def stft(x: np.ndarray) -> torch.Tensor:
        return torch.stft(torch.as_tensor(np.asarray(x, dtype=np.float64)), n_fft=win,
                          hop_length=hop, window=window, center=True, return_complex=True)

    mix_spec, src_spec = stft(mixture), stft(references)
    magnitude = src_spec.abs()
    tiny = torch.finfo(torch.float64).tiny
    mask_makers = {
        "ibm": lambda: (magnitude == magnitude.amax(0, keepdim=True)).to(torch.float64),
        "irm": lambda: magnitude / (magnitude.sum(0, keepdim=True) + tiny),
        "wiener": lambda: magnitude ** 2 / ((magnitude ** 2).sum(0, keepdim=True) + tiny),
    }
    stacked_masks = torch.cat([mask_makers[name]() for name in masks])  # (n_masks * n_src, F, frames)
    # One inverse STFT for every mask and source.
    signals = torch.istft(stacked_masks * mix_spec, n_fft=win, hop_length=hop, window=window,
                          center=True, length=n_samples).numpy()
    return {name: signals[i * n_src:(i + 1) * n_src] for i, name in enumerate(masks)}
