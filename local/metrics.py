"""Separation metrics and oracle masks for evaluation.

- SI-SNR (scale-invariant, zero-mean; asteroid's pairwise SI-SDR) with the best permutation
  of the estimates found by SI-SNR PIT.
- SDR as BSS Eval defines it (bss_eval_sources, 512-tap distortion filter): our Toeplitz
  implementation (toeplitz_sdr), fast_bss_eval, or mir_eval as the slow reference.
- Oracle time-frequency masks (IBM, IRM, Wiener-like) on an STFT of the mixture, the upper
  baselines of the Conv-TasNet paper, and a fixed filter: Wiener gains that do not change over
  the mixture, the best a separator can do that tells sources apart by frequency band alone.

Signals are numpy arrays: mixture (time,), references and estimates (n_src, time).
"""
from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.linalg
import torch
from asteroid.losses import PITLossWrapper

SDR_BACKENDS = ("toeplitz", "fast_bss_eval", "mir_eval")
ORACLE_MASKS = ("ibm", "irm", "wiener", "fixed")
# bss_eval_sources' distortion filter length (BSS Eval v3/v4 and mir_eval use 512 taps).
BSS_EVAL_FILTER_LENGTH = 512
# toeplitz_sdr: a fast solve whose projected energy leaves [0, energy] by more than this
# (relative) is not trusted; the reference's system is solved directly instead.
PROJECTION_TOLERANCE = 1e-8


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


def _sets_and_references(estimate_sets: np.ndarray,
                         references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (K, n_src, time) estimate sets and (n_src, time) references, shapes checked."""
    estimate_sets = np.asarray(estimate_sets, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    if estimate_sets.ndim != 3 or references.shape != estimate_sets.shape[1:]:
        raise ValueError(f"references {references.shape} do not match estimates {estimate_sets.shape}")
    return estimate_sets, references


def _toeplitz_inverse_forms(autocorr: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """b^T T^{-1} b for every row b of `rhs` (K, n), T the symmetric positive definite Toeplitz
    matrix with first column `autocorr` (n,).

    Gohberg-Semencul: with x = T^{-1} e_1, T^{-1} = (L(x) L(x)^T - L(y) L(y)^T) / x_0, where
    L(v) is the lower triangular Toeplitz matrix with first column v and y = (0, x_{n-1}, ...,
    x_1). One Levinson solve (scipy's solve_toeplitz, O(n^2)) then serves every right-hand
    side, each applied with FFTs of about 2n points; one step of iterative refinement takes
    out the rounding error of the difference of the two products. Faster than solve_toeplitz on
    each right-hand side or a Cholesky factorisation of T, for the same SDRs (RESULTS.md).
    Raises LinAlgError where Levinson's recursion breaks down (T numerically singular)."""
    n = autocorr.shape[0]
    unit = np.zeros(n)
    unit[0] = 1.0
    x = scipy.linalg.solve_toeplitz(autocorr, unit, check_finite=False)
    if not (np.isfinite(x).all() and x[0] > 0):
        raise np.linalg.LinAlgError("Levinson recursion broke down")
    m = scipy.fft.next_fast_len(2 * n - 1, real=True)  # linear convolutions of length-n rows
    x_spec = scipy.fft.rfft(x, m)
    y_spec = scipy.fft.rfft(np.concatenate(([0.0], x[:0:-1])), m)
    # T as a circulant of size m (for the residual T c of the refinement).
    t_spec = scipy.fft.rfft(np.concatenate((autocorr, np.zeros(m - 2 * n + 1), autocorr[:0:-1])), m)

    def rfft(v: np.ndarray) -> np.ndarray:
        return scipy.fft.rfft(v, m, axis=-1)

    def irfft(spec: np.ndarray) -> np.ndarray:
        return scipy.fft.irfft(spec, m, axis=-1)[..., :n]

    def inverse_times(v: np.ndarray) -> np.ndarray:
        # Transposed products are correlations: (L(x)^T v)_i = sum_k x_k v_{k+i}.
        v_spec = rfft(v)
        lx_t, ly_t = irfft(v_spec * x_spec.conj()), irfft(v_spec * y_spec.conj())
        return irfft(rfft(lx_t) * x_spec - rfft(ly_t) * y_spec) / x[0]

    solution = inverse_times(rhs)
    solution += inverse_times(rhs - irfft(rfft(solution) * t_spec))
    return np.einsum("kn,kn->k", rhs, solution)


def _direct_inverse_forms(autocorr: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """b^T T^{-1} b as mir_eval's _project solves it (LU of the explicit matrix)."""
    solution = np.linalg.solve(scipy.linalg.toeplitz(autocorr), rhs.T)
    return np.einsum("kn,nk->k", rhs, solution)


def toeplitz_sdr(estimate_sets: np.ndarray, references: np.ndarray,
                 filter_length: int = BSS_EVAL_FILTER_LENGTH) -> np.ndarray:
    """BSS Eval SDR (dB) as mir_eval's bss_eval_sources(compute_permutation=False) defines it:
    estimate_sets (K, n_src, time), references (n_src, time) -> (K, n_src), [k, j] = SDR of
    estimate_sets[k, j] against reference j.

    With the signals zero-padded by filter_length - 1 samples (as mir_eval's _project), P_j the
    orthogonal projection on the filter_length delayed copies of reference j, e an estimate:
    SDR = ||P_j e||^2 / ||e - P_j e||^2 (the interference and artifacts terms of
    bss_eval_sources add up to e - P_j e). ||P_j e||^2 = b^T R_j^{-1} b, with R_j the Toeplitz
    autocorrelation matrix of reference j (lags 0..filter_length-1) and b the correlation of
    e with reference j at those lags, and ||e - P_j e||^2 = ||e||^2 - ||P_j e||^2. So one
    solver per reference serves all K estimates, and only the (reference j, estimate j) pairs
    are computed. Correlations by FFT (of a fast length, not a power of two), then
    _toeplitz_inverse_forms; mir_eval's direct solve where that breaks down. Much faster than
    fast_bss_eval and mir_eval, and as exact as rounding allows (speed and agreement with
    mir_eval: RESULTS.md).

    Like mir_eval, silent (all-zero) references or estimates are an error (the SDR is
    undefined), and signals shorter than the filter are fine. Above ~100 dB the figure is
    rounding noise in both: a perfect estimate scores ~150 dB (or +inf) here, ~300 dB there.
    """
    estimate_sets, references = _sets_and_references(estimate_sets, references)
    n_sets, n_src, n_samples = estimate_sets.shape
    if n_samples == 0:
        raise ValueError("BSS Eval SDR of empty signals")
    silent = ~references.any(axis=-1)
    if silent.any():
        raise ValueError(f"reference(s) {np.flatnonzero(silent).tolist()} are silent (all "
                         "zeros): their BSS Eval SDR is undefined")
    silent = ~estimate_sets.any(axis=-1)
    if silent.any():
        raise ValueError(f"estimate(s) [set, source] {np.argwhere(silent).tolist()} are silent "
                         "(all zeros): their BSS Eval SDR is undefined")
    # Linear (not circular) correlations at lags 0..filter_length - 1, one signal at a time and
    # in place: multi-MB arrays come fresh from the OS at every call, and their page faults
    # slowed the whole function down.
    n_fft = scipy.fft.next_fast_len(n_samples + filter_length - 1, real=True)
    energy = np.einsum("kjt,kjt->kj", estimate_sets, estimate_sets)
    projected = np.empty((n_sets, n_src))
    cross = np.empty((n_sets, filter_length))
    for j in range(n_src):
        ref_spec = scipy.fft.rfft(references[j], n_fft)
        ref_conj = ref_spec.conj()
        for k in range(n_sets):  # cross[k, l] = sum_t estimate_sets[k, j, t] references[j, t - l]
            spec = scipy.fft.rfft(estimate_sets[k, j], n_fft)
            spec *= ref_conj
            cross[k] = scipy.fft.irfft(spec, n_fft, overwrite_x=True)[:filter_length]
        ref_spec *= ref_conj
        autocorr = scipy.fft.irfft(ref_spec, n_fft, overwrite_x=True)[:filter_length]
        try:
            forms = _toeplitz_inverse_forms(autocorr, cross)
            # A projection's energy lies in [0, energy] (NaN fails the test too).
            trusted = bool(np.all((forms >= -PROJECTION_TOLERANCE * energy[:, j])
                                  & (forms <= (1 + PROJECTION_TOLERANCE) * energy[:, j])))
        except np.linalg.LinAlgError:
            trusted = False
        projected[:, j] = forms if trusted else _direct_inverse_forms(autocorr, cross)
    projected = np.clip(projected, 0.0, energy)
    with np.errstate(divide="ignore"):  # +-inf where one of the two energies is 0, as mir_eval
        return 10 * np.log10(projected / (energy - projected))


def bss_sdr(estimate_sets: np.ndarray, references: np.ndarray, backend: str,
            device: str | torch.device = "cpu") -> np.ndarray:
    """BSS Eval SDR (dB) of aligned estimates: estimate_sets (K, n_src, time), references
    (n_src, time) -> (K, n_src), [k, j] = SDR of estimate_sets[k, j] against reference j.

    backend: "toeplitz" (toeplitz_sdr, numpy on the CPU whatever `device`), "fast_bss_eval"
    or "mir_eval" (the reference, slow). The SDR of source j depends only on reference j
    (distortion filter on reference j), so fast_bss_eval's pairwise mode is used: one
    Toeplitz system per reference, solved for all K estimates at once, instead of K systems
    per reference. fast_bss_eval runs on torch (float64) on `device`: a GPU when there is
    one, and on CPU torch's thread pool rather than OpenBLAS's, which oversubscribes a busy
    machine.
    """
    if backend == "toeplitz":
        return toeplitz_sdr(estimate_sets, references)
    estimate_sets, references = _sets_and_references(estimate_sets, references)
    n_sets, n_src, n_samples = estimate_sets.shape
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
    wiener: |S_i|^2 / sum_j |S_j|^2; fixed: Wiener gains from each source's energy per
    frequency over the whole mixture, sum_t |S_i|^2 / sum_t sum_j |S_j|^2, the same in every
    frame: a separator that filters by band alone, with the mixture's own band shares known.
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
    power = magnitude ** 2
    tiny = torch.finfo(torch.float64).tiny
    band_power = power.sum(-1, keepdim=True)   # (n_src, F, 1): each source's energy per band
    mask_makers = {
        "ibm": lambda: (magnitude == magnitude.amax(0, keepdim=True)).to(torch.float64),
        "irm": lambda: magnitude / (magnitude.sum(0, keepdim=True) + tiny),
        "wiener": lambda: power / (power.sum(0, keepdim=True) + tiny),
        "fixed": lambda: (band_power / (band_power.sum(0, keepdim=True) + tiny)).expand_as(power),
    }
    stacked_masks = torch.cat([mask_makers[name]() for name in masks])  # (n_masks * n_src, F, frames)
    # One inverse STFT for every mask and source.
    signals = torch.istft(stacked_masks * mix_spec, n_fft=win, hop_length=hop, window=window,
                          center=True, length=n_samples).numpy()
    return {name: signals[i * n_src:(i + 1) * n_src] for i, name in enumerate(masks)}


def level_over_background_db(reference: np.ndarray, sample_rate: int, frame_ms: float = 32.0,
                             quiet_fraction: float = 0.5) -> float:
    """How far a reference stands above its own background (dB): its energy over the energy
    its quietest frames would give if they filled all of it.

    A field-recording clip is its bird plus the background of its recording. The background is
    taken as the mean energy of the `quiet_fraction` quietest frames (32 ms) of the clip's own
    extent (zero padding left out), spread over every frame. A model that returned the bird
    without that background would score about this SI-SNR against the reference, so it bounds
    what a "clean" output can score under the thesis' definition."""
    support = np.flatnonzero(reference)
    if support.size == 0:
        return float("nan")
    x = np.asarray(reference[support[0]:support[-1] + 1], dtype=np.float64)
    frame = max(1, int(round(frame_ms * sample_rate / 1000)))
    n_frames = x.shape[0] // frame
    if n_frames < 2:
        return float("nan")
    energies = np.sort(np.square(x[:n_frames * frame]).reshape(n_frames, frame).sum(axis=1))
    n_quiet = max(1, int(round(quiet_fraction * n_frames)))
    background = energies[:n_quiet].mean() * n_frames
    return float(10 * np.log10(energies.sum() / max(background, 1e-20)))


def band_centroid_hz(reference: np.ndarray, sample_rate: int, frame_ms: float = 32.0,
                     loud_fraction: float = 0.2) -> float:
    """Where a reference's sound lies in frequency (Hz): the centroid of the mean power
    spectrum of its loudest `loud_fraction` of frames (32 ms, Hann). Two sources with close
    centroids share a band, and only their time-frequency structure tells them apart; a
    reference dominated by low-frequency rumble has a centroid far below any bird."""
    x = np.asarray(reference, dtype=np.float64)
    frame = max(2, int(round(frame_ms * sample_rate / 1000)))
    n_frames = x.shape[0] // frame
    if n_frames < 1:
        return float("nan")
    frames = x[:n_frames * frame].reshape(n_frames, frame)
    power = np.abs(np.fft.rfft(frames * np.hanning(frame), axis=1)) ** 2
    energy = power.sum(axis=1)
    n_loud = max(1, int(round(loud_fraction * n_frames)))
    spectrum = power[np.argsort(energy)[-n_loud:]].mean(axis=0)
    if spectrum.sum() <= 0:
        return float("nan")
    freqs = np.fft.rfftfreq(frame, 1 / sample_rate)
    return float((freqs * spectrum).sum() / spectrum.sum())
