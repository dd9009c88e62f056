"""Separation metrics: closed-form SI-SNR, BSS Eval SDR against mir_eval, oracle masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import lfilter

import local.metrics
from local.metrics import (best_permutation, bss_sdr, oracle_estimates, pairwise_si_snr,
                           score_estimates, stft_sizes, toeplitz_sdr)

SR = 8000


def band_noise(rng: np.random.Generator, n: int, low_hz: float, high_hz: float) -> np.ndarray:
    """Noise whose spectrum lies only in [low_hz, high_hz): signals in disjoint bands are
    exactly orthogonal, and without the DC bin they are zero-mean."""
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spectrum = rng.standard_normal(freqs.shape) + 1j * rng.standard_normal(freqs.shape)
    spectrum[(freqs < low_hz) | (freqs >= high_hz) | (freqs == 0)] = 0
    x = np.fft.irfft(spectrum, n)
    return x / np.sqrt(np.mean(x ** 2))


def test_si_snr_closed_form():
    """est = a * ref + n with n zero-mean, orthogonal to ref: SI-SNR = 10 log10(a^2 |ref|^2 / |n|^2),
    and the mixture s1 + s2 of orthogonal sources has input SI-SNR 10 log10(|s1|^2 / |s2|^2)."""
    rng = np.random.default_rng(0)
    n = SR
    s1 = 0.5 * band_noise(rng, n, 200, 1500)
    s2 = 0.2 * band_noise(rng, n, 2000, 3500)
    noise = 0.05 * band_noise(rng, n, 1500, 2000)  # orthogonal to s1 and s2
    references = np.stack([s1, s2])
    mixture = s1 + s2
    # Estimates in swapped order: the permutation must put them back.
    estimates = np.stack([0.7 * s2 - noise, 3.0 * s1 + noise])
    scores = score_estimates(mixture, references, {"model": estimates}, "toeplitz")

    def energy(x: np.ndarray) -> float:
        return float(np.sum(x ** 2))

    expected_input = [10 * np.log10(energy(s1) / energy(s2)), 10 * np.log10(energy(s2) / energy(s1))]
    expected_output = [10 * np.log10(energy(3.0 * s1) / energy(noise)),
                       10 * np.log10(energy(0.7 * s2) / energy(noise))]
    np.testing.assert_allclose(scores["input"]["si_sdr"], expected_input, atol=1e-6)
    np.testing.assert_array_equal(scores["model"]["perm"], [1, 0])
    np.testing.assert_allclose(scores["model"]["si_sdr"], expected_output, atol=1e-6)
    np.testing.assert_allclose(scores["model"]["si_sdr_imp"],
                               np.subtract(expected_output, expected_input), atol=1e-6)
    # SI-SNR ignores the offset (zero-mean) and the scale.
    shifted = pairwise_si_snr(estimates * 5 + 0.3, references)
    np.testing.assert_allclose(shifted, pairwise_si_snr(estimates, references), atol=1e-6)


def test_pairwise_si_snr_matches_asteroid():
    from asteroid.losses import pairwise_neg_sisdr

    rng = np.random.default_rng(1)
    references = rng.standard_normal((3, 4000)) + 0.1
    estimates = 0.5 * references[[2, 0, 1]] + 0.3 * rng.standard_normal((3, 4000))
    expected = -pairwise_neg_sisdr(torch.tensor(estimates)[None], torch.tensor(references)[None])[0]
    np.testing.assert_allclose(pairwise_si_snr(estimates, references), expected.numpy(), atol=1e-6)


def test_best_permutation_of_three():
    scores = np.array([[0.0, 1.0, 9.0],
                       [8.0, 0.0, 2.0],
                       [1.0, 7.0, 0.0]])  # [est, ref]
    np.testing.assert_array_equal(best_permutation(scores), [1, 2, 0])


def _sdr_test_signals(seed: int, n_src: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """References with some colour, and estimates that are filtered references + leakage + noise."""
    rng = np.random.default_rng(seed)
    references = np.stack([lfilter([1.0], [1.0, -rng.uniform(0.3, 0.95)], rng.standard_normal(n))
                           for _ in range(n_src)])
    mixing = np.eye(n_src) + 0.3 * rng.random((n_src, n_src))
    estimates = mixing @ references
    estimates = np.stack([lfilter([1.0, rng.uniform(-0.5, 0.5), 0.2], [1.0], e) for e in estimates])
    estimates += 0.1 * rng.standard_normal(estimates.shape)
    return references, estimates


# toeplitz solves the same least-squares problem as mir_eval: equal up to rounding.
SDR_AGREEMENT_DB = {"toeplitz": 1e-6, "fast_bss_eval": 0.05}


@pytest.mark.parametrize("seed,n_src", [(0, 2), (1, 2), (2, 3)])
def test_fast_sdr_matches_mir_eval(seed: int, n_src: int):
    references, estimates = _sdr_test_signals(seed, n_src, SR // 2)
    mixture = references.sum(0)
    estimate_sets = np.stack([estimates, np.tile(mixture, (n_src, 1)), np.roll(estimates, 1, axis=0)])
    reference = bss_sdr(estimate_sets, references, "mir_eval")
    for backend, tolerance in SDR_AGREEMENT_DB.items():
        fast = bss_sdr(estimate_sets, references, backend)
        assert fast.shape == (3, n_src)
        np.testing.assert_allclose(fast, reference, atol=tolerance, err_msg=backend)
        # Sanity: the aligned estimates score far above the misaligned ones.
        assert fast[0].min() > fast[2].max()


@pytest.mark.parametrize("n_samples", [1, 100, 511, 700])
def test_toeplitz_sdr_short_signals_match_mir_eval(n_samples: int):
    """Shorter than the 512-tap filter: the zero-padded system is still well posed (a single
    sample is its own filtered reference: +inf in both)."""
    rng = np.random.default_rng(n_samples)
    references = rng.standard_normal((2, n_samples))
    estimates = references + 0.5 * rng.standard_normal((2, n_samples))
    fast = toeplitz_sdr(estimates[None], references)
    reference = bss_sdr(estimates[None], references, "mir_eval")
    if n_samples == 1:
        assert np.all(fast > 100) and np.all(reference > 100)
    else:
        np.testing.assert_allclose(fast, reference, atol=1e-6)


def test_toeplitz_sdr_narrowband_reference_matches_mir_eval():
    """Whistle-like tones in faint noise: badly conditioned (~1e8) Toeplitz systems."""
    rng = np.random.default_rng(6)
    t = np.arange(SR)
    references = np.stack([np.sin(2 * np.pi * 0.1 * t), np.sin(2 * np.pi * 0.23 * t + 1) * np.hanning(SR)])
    references += 1e-3 * rng.standard_normal(references.shape)
    estimates = references + 0.3 * references[::-1] + 0.01 * rng.standard_normal(references.shape)
    np.testing.assert_allclose(toeplitz_sdr(estimates[None], references),
                               bss_sdr(estimates[None], references, "mir_eval"), atol=1e-6)


@pytest.mark.parametrize("failure", ["breakdown", "out_of_range"])
def test_toeplitz_sdr_falls_back_to_a_direct_solve(monkeypatch, failure: str):
    """Where the fast solver breaks down or its projected energy is impossible (outside
    [0, |estimate|^2]), the reference's system is solved directly, as mir_eval does."""
    references, estimates = _sdr_test_signals(7, 2, 2000)

    def broken(autocorr, rhs):
        if failure == "breakdown":
            raise np.linalg.LinAlgError("Levinson recursion broke down")
        return np.full(rhs.shape[0], 1e30)

    expected = toeplitz_sdr(estimates[None], references)  # equal to mir_eval's (tests above)
    monkeypatch.setattr(local.metrics, "_toeplitz_inverse_forms", broken)
    np.testing.assert_allclose(toeplitz_sdr(estimates[None], references), expected, atol=1e-6)


def test_sdr_edge_cases_like_mir_eval():
    rng = np.random.default_rng(8)
    references = rng.standard_normal((2, 1000))
    # A perfect estimate: only rounding is left of the residual (+inf or >100 dB in both).
    assert np.all(toeplitz_sdr(references[None], references) > 100)
    assert np.all(bss_sdr(references[None], references, "mir_eval") > 100)
    # Silent references or estimates leave the SDR undefined: both refuse them.
    silent_reference = references * [[1.0], [0.0]]
    silent_estimate = references[None] * [[[0.0], [1.0]]]
    for backend in ("toeplitz", "mir_eval"):
        with pytest.raises(ValueError, match="silent"):
            bss_sdr(references[None], silent_reference, backend)
        with pytest.raises(ValueError, match="silent"):
            bss_sdr(silent_estimate, references, backend)
    with pytest.raises(ValueError, match="empty"):
        toeplitz_sdr(np.zeros((1, 2, 0)), np.zeros((2, 0)))


@pytest.mark.parametrize("backend", ["toeplitz", "fast_bss_eval"])
def test_sdr_allows_a_short_distortion_filter(backend: str):
    """BSS Eval SDR allows a 512-tap filter of the reference: a filtered copy scores high
    (only the filter's tail cut at the signal's end counts as error, ~-36 dB here), while
    SI-SNR (no filter: 10 log10(0.25 / 0.13) = 2.8 dB) penalises the filtering."""
    rng = np.random.default_rng(3)
    references = np.stack([rng.standard_normal(SR), rng.standard_normal(SR)])
    filtered = np.stack([lfilter([0.5, 0.3, -0.2], [1.0], r) for r in references])
    sdr = bss_sdr(filtered[None], references, backend)[0]
    si_snr = np.diag(pairwise_si_snr(filtered, references))
    assert sdr.min() > 30
    np.testing.assert_allclose(si_snr, 10 * np.log10(0.25 / 0.13), atol=0.2)


def test_unknown_sdr_backend():
    references, estimates = _sdr_test_signals(0, 2, 1000)
    with pytest.raises(ValueError, match="unknown SDR backend"):
        bss_sdr(estimates[None], references, "museval")


def test_oracle_masks_separate_disjoint_bands():
    rng = np.random.default_rng(4)
    n = 2 * SR
    references = np.stack([band_noise(rng, n, 300, 1200), 0.5 * band_noise(rng, n, 2200, 3600)])
    mixture = references.sum(0)
    win, hop = stft_sizes(SR, 32, 8)
    assert (win, hop) == (256, 64)
    estimates = oracle_estimates(mixture, references, win, hop)
    assert set(estimates) == {"ibm", "irm", "wiener", "fixed"}
    scores = score_estimates(mixture, references, estimates, "toeplitz")
    for name in ("ibm", "irm", "wiener", "fixed"):
        assert estimates[name].shape == references.shape
        np.testing.assert_array_equal(scores[name]["perm"], [0, 1])
        # Disjoint bands: the masks are ~exact, far above the input SI-SNR (+6/-6 dB).
        assert scores[name]["si_sdr"].min() > 25, (name, scores[name]["si_sdr"])
        assert scores[name]["si_sdr_imp"].min() > 19
        assert scores[name]["sdr_imp"].min() > 19
    # The masks of all sources sum to one: the oracle estimates add up to the mixture.
    np.testing.assert_allclose(estimates["irm"].sum(0), mixture, atol=1e-9)
    np.testing.assert_allclose(estimates["ibm"].sum(0), mixture, atol=1e-9)
    np.testing.assert_allclose(estimates["fixed"].sum(0), mixture, atol=1e-9)


def test_fixed_filter_cannot_separate_one_band_taken_in_turns():
    """Two birds on the same pitch, one after the other: the time-frequency masks follow the
    turns, the fixed filter (one gain per frequency for the whole mixture) cannot."""
    n = 2 * SR
    t = np.arange(n) / SR
    tone = np.sin(2 * np.pi * 1500 * t)
    first = np.where(t < 1.0, 1.0, 0.0)
    references = np.stack([tone * first, 0.8 * tone * (1 - first)])
    mixture = references.sum(0)
    estimates = oracle_estimates(mixture, references, *stft_sizes(SR, 32, 8))
    scores = score_estimates(mixture, references, estimates, "toeplitz")
    assert scores["ibm"]["si_sdr_imp"].min() > 15, scores["ibm"]["si_sdr_imp"]
    # Each fixed output is the mixture scaled by one gain at 1.5 kHz: no better than the input.
    assert abs(scores["fixed"]["si_sdr_imp"]).max() < 1.0, scores["fixed"]["si_sdr_imp"]
    # ... and that gain is the first source's share of the band's energy.
    gain = estimates["fixed"][0] @ mixture / (mixture @ mixture)
    assert gain == pytest.approx(1 / (1 + 0.8 ** 2), abs=0.02)


def test_oracle_masks_on_overlapping_sources_are_imperfect():
    """White noises sharing every bin: no mask separates them well (IRM/Wiener a few dB)."""
    rng = np.random.default_rng(5)
    references = rng.standard_normal((2, SR))
    mixture = references.sum(0)
    estimates = oracle_estimates(mixture, references, *stft_sizes(SR, 32, 8))
    scores = score_estimates(mixture, references, estimates, "toeplitz")
    for name in ("ibm", "irm", "wiener"):
        assert 0 < scores[name]["si_sdr_imp"].mean() < 15
