"""Bird activity detection: where in a field recording is there a vocalisation?

xeno-canto recordings are mostly background between calls. A frame is active when its band
energy (in the band where birds sing, capped below Nyquist) exceeds the noise floor (a low
percentile of the frame energies around it, and at least that of the whole recording) by
`activity_threshold_db`. Active runs are merged, given context, cut into clips, and each clip
must be active often enough and loud enough over the floor as a whole, so that a noise-only
or silent recording yields no clip.

A recording that yields no clip in the whole band is searched again in each of the narrower
`fallback_bands_hz`, with the same detector and checks, and gives the clips of the band in
which the most clip time is found. The whole band sums the background below and above a
call: a faint call at 3 kHz over loud noise at 1 kHz, or song in one band all through a
short recording (which lifts the floor percentile into the song), is lost in it and stands
out in its own band.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import noisereduce
import numpy as np
from scipy.ndimage import percentile_filter
from scipy.signal import spectrogram

# Band power below this (dB re full scale) is digital silence (zero padding, muted parts):
# it says nothing about the background, so it takes no part in the noise floor.
DIGITAL_SILENCE_DB = -120.0
# The band stops short of Nyquist, where the resampler's anti-aliasing filter rolls off.
NYQUIST_MARGIN = 0.95
# Shortest noise profile for denoising: inactive frames are topped up with the quietest ones
# to this length (seconds).
MIN_NOISE_PROFILE_S = 1.0


@dataclass
class Activity:
    """Per-frame analysis of one recording; frame i covers samples [i, i+1) * frame_len."""
    frame_len: int
    energy_db: np.ndarray  # band power per frame (dB)
    floor_db: np.ndarray   # noise floor per frame (dB)
    active: np.ndarray     # bool per frame

    def frame_range(self, start: int, end: int) -> slice:
        """Frames whose centre lies in samples [start, end)."""
        first = int(np.ceil((start - self.frame_len / 2) / self.frame_len))
        last = int(np.ceil((end - self.frame_len / 2) / self.frame_len))
        n = len(self.active)
        return slice(min(max(first, 0), n), min(max(last, 0), n))

    def active_fraction(self, start: int, end: int) -> float:
        frames = self.active[self.frame_range(start, end)]
        return float(frames.mean()) if frames.size else 0.0

    def snr_db(self, start: int, end: int) -> float:
        """Band energy of samples [start, end) over the noise floor there (dB)."""
        frames = self.frame_range(start, end)
        if frames.stop <= frames.start:
            return -np.inf
        signal = np.mean(10 ** (self.energy_db[frames] / 10))
        floor = np.mean(10 ** (self.floor_db[frames] / 10))
        return float(10 * np.log10(signal / floor))


ACTIVITY_KEYS = ("sample_rate", "clip_min_s", "clip_max_s", "band_low_hz", "band_high_hz",
                 "frame_ms", "noise_floor_percentile", "noise_floor_window_s",
                 "activity_threshold_db", "merge_gap_s", "context_s", "min_active_fraction",
                 "min_clip_snr_db", "fallback_bands_hz", "highpass_hz")


def check_conf_clips(conf_clips: dict[str, Any]) -> None:
    """Raise ValueError (naming the key) for a clips section that cannot work."""
    missing = [key for key in ACTIVITY_KEYS if key not in conf_clips]
    if missing:
        raise ValueError(f"clips section lacks {', '.join(missing)}")
    sample_rate = conf_clips["sample_rate"]
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    high = min(conf_clips["band_high_hz"], NYQUIST_MARGIN * sample_rate / 2)
    if conf_clips["band_low_hz"] >= high:
        raise ValueError(f"activity band [{conf_clips['band_low_hz']}, {high:.0f}] Hz is empty "
                         f"at sample_rate {sample_rate}")
    if not 0 < conf_clips["clip_min_s"] <= conf_clips["clip_max_s"]:
        raise ValueError(f"need 0 < clip_min_s <= clip_max_s, got {conf_clips['clip_min_s']} "
                         f"and {conf_clips['clip_max_s']}")
    if conf_clips["frame_ms"] <= 0 or conf_clips["noise_floor_window_s"] <= 0:
        raise ValueError("frame_ms and noise_floor_window_s must be positive")
    if not 0 <= conf_clips["noise_floor_percentile"] <= 100:
        raise ValueError("noise_floor_percentile must be within [0, 100]")
    highpass = conf_clips["highpass_hz"]
    if (not isinstance(highpass, (int, float)) or isinstance(highpass, bool)
            or not 0 <= highpass < NYQUIST_MARGIN * sample_rate / 2):
        raise ValueError(f"highpass_hz must be 0 (off) or within (0, "
                         f"{NYQUIST_MARGIN * sample_rate / 2:.0f}) Hz at sample_rate "
                         f"{sample_rate}, got {highpass!r}")
    check_conf_denoise(conf_clips)
    bands = conf_clips["fallback_bands_hz"]
    if not isinstance(bands, list) or not all(
            isinstance(b, (list, tuple)) and len(b) == 2
            and all(isinstance(f, (int, float)) for f in b) and 0 <= b[0] < b[1] for b in bands):
        raise ValueError(f"fallback_bands_hz must be a list of [low_hz, high_hz] pairs with "
                         f"0 <= low_hz < high_hz, got {bands!r}")


DENOISE_KEYS = ("denoise", "denoise_n_std_thresh", "denoise_prop_decrease", "denoise_window_ms",
                "denoise_freq_smooth_hz", "denoise_time_smooth_ms")


def check_conf_denoise(conf_clips: dict[str, Any]) -> None:
    """Raise ValueError (naming the key) for denoising settings that cannot work."""
    missing = [key for key in DENOISE_KEYS if key not in conf_clips]
    if missing:
        raise ValueError(f"clips section lacks {', '.join(missing)}")
    if not isinstance(conf_clips["denoise"], bool):
        raise ValueError(f"denoise must be true or false, got {conf_clips['denoise']!r}")
    if not 0 < conf_clips["denoise_prop_decrease"] <= 1:
        raise ValueError("denoise_prop_decrease must be within (0, 1], got "
                         f"{conf_clips['denoise_prop_decrease']!r}")
    for key in ("denoise_window_ms", "denoise_freq_smooth_hz", "denoise_time_smooth_ms"):
        if not conf_clips[key] > 0:
            raise ValueError(f"{key} must be positive, got {conf_clips[key]!r}")
    if conf_clips["denoise_n_std_thresh"] < 0:
        raise ValueError("denoise_n_std_thresh must be non-negative, got "
                         f"{conf_clips['denoise_n_std_thresh']!r}")


def denoise(x: np.ndarray, noise: np.ndarray, sample_rate: int,
            conf_clips: dict[str, Any]) -> np.ndarray:
    """`x` with its stationary background removed: noisereduce's spectral gating with the
    noise profile (per-frequency mean and deviation) of `noise`, the recording's own
    background. A bin passes where it exceeds the noise mean by `denoise_n_std_thresh`
    deviations; the rest is attenuated by `denoise_prop_decrease`; the mask is smoothed over
    `denoise_freq_smooth_hz` and `denoise_time_smooth_ms` (at least one STFT bin and hop).
    Same length as `x`, float32."""
    n_fft = 1 << max(int(np.ceil(np.log2(conf_clips["denoise_window_ms"] * 1e-3
                                         * sample_rate))), 4)
    if len(noise) < n_fft or len(x) == 0:
        return np.zeros_like(x, dtype=np.float32) if len(x) == 0 else \
            np.asarray(x, dtype=np.float32).copy()
    hop = n_fft // 4    # noisereduce's default hop (a quarter of its window, n_fft)
    freq_smooth = max(float(conf_clips["denoise_freq_smooth_hz"]), sample_rate / (n_fft / 2))
    time_smooth = max(float(conf_clips["denoise_time_smooth_ms"]), 1000 * hop / sample_rate)
    clean = noisereduce.reduce_noise(
        y=np.asarray(x, dtype=np.float32), sr=sample_rate, stationary=True,
        y_noise=np.asarray(noise, dtype=np.float32),
        n_std_thresh_stationary=conf_clips["denoise_n_std_thresh"],
        prop_decrease=conf_clips["denoise_prop_decrease"], n_fft=n_fft, hop_length=hop,
        freq_mask_smooth_hz=freq_smooth, time_mask_smooth_ms=time_smooth,
        clip_noise_stationary=False)
    clean = np.asarray(clean, dtype=np.float32).reshape(-1)
    if clean.shape[0] != x.shape[0]:
        clean = np.pad(clean[:x.shape[0]], (0, max(0, x.shape[0] - clean.shape[0])))
    return clean


def band_energy_db(x: np.ndarray, sample_rate: int, frame_ms: float, band_low_hz: float,
                   band_high_hz: float) -> tuple[np.ndarray, int]:
    """Band power of non-overlapping Hann-windowed frames (dB re full scale), frame length."""
    frame_len = max(int(round(frame_ms * 1e-3 * sample_rate)), 16)
    high = min(band_high_hz, NYQUIST_MARGIN * sample_rate / 2)
    n_frames = len(x) // frame_len
    if n_frames == 0:
        return np.zeros(0), frame_len
    freqs, _, power = spectrogram(x[: n_frames * frame_len], fs=sample_rate, window="hann",
                                  nperseg=frame_len, noverlap=0, detrend=False,
                                  scaling="spectrum", mode="psd")
    in_band = (freqs >= band_low_hz) & (freqs <= high)
    band_power = power[in_band].sum(axis=0)
    return 10 * np.log10(np.maximum(band_power, 1e-30)), frame_len


def noise_floor_db(energy_db: np.ndarray, percentile: float, window_frames: int) -> np.ndarray:
    """Noise floor per frame: the `percentile` of the frame energies in a sliding window, but
    never below that percentile over the whole recording; digital silence is ignored.
    The local floor follows gain changes and passing noise (wind, traffic) that a single
    global floor would take for activity; the global one keeps quiet passages (a fade-in, a
    quieter stretch of background) from passing their faint noise off as activity."""
    audible = energy_db > DIGITAL_SILENCE_DB
    if not audible.any():
        return np.full_like(energy_db, np.inf)
    global_floor = np.percentile(energy_db[audible], percentile)
    filled = np.where(audible, energy_db, global_floor)
    window = max(1, min(window_frames, len(filled)))
    local_floor = percentile_filter(filled, percentile, size=window, mode="reflect")
    return np.maximum(local_floor, global_floor)


def analyse(x: np.ndarray, sample_rate: int, conf_clips: dict[str, Any]) -> Activity:
    """Band energy, noise floor and active frames of a recording."""
    energy_db, frame_len = band_energy_db(x, sample_rate, conf_clips["frame_ms"],
                                          conf_clips["band_low_hz"], conf_clips["band_high_hz"])
    window = int(round(conf_clips["noise_floor_window_s"] * sample_rate / frame_len))
    floor_db = noise_floor_db(energy_db, conf_clips["noise_floor_percentile"], window)
    active = (energy_db > floor_db + conf_clips["activity_threshold_db"]) & \
             (energy_db > DIGITAL_SILENCE_DB)
    return Activity(frame_len, energy_db, floor_db, active)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(first, stop)] of the runs of True in a boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _merge(regions: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Merge sorted regions separated by less than `gap` (overlapping ones included)."""
    merged: list[tuple[int, int]] = []
    for start, end in regions:
        if merged and start - merged[-1][1] < gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _widen(start: int, end: int, length: int, total: int) -> tuple[int, int]:
    """Widen [start, end) symmetrically to at least `length` samples within [0, total)."""
    missing = length - (end - start)
    if missing <= 0:
        return start, end
    start = max(0, start - missing // 2)
    end = min(total, start + length)
    return max(0, end - length), end


def _split(start: int, end: int, max_len: int) -> list[tuple[int, int]]:
    """Cut [start, end) into the fewest near-equal parts of at most `max_len` samples."""
    n_parts = max(1, int(np.ceil((end - start) / max_len)))
    bounds = np.linspace(start, end, n_parts + 1).round().astype(int)
    return list(zip(bounds[:-1], bounds[1:]))


def fallback_bands(conf_clips: dict[str, Any], sample_rate: int) -> list[tuple[float, float]]:
    """The conf's fallback bands at `sample_rate`, capped below Nyquist; a band that the cap
    leaves with less than half its width is skipped (a narrow band's energy varies more from
    frame to frame, so that noise passes its low percentile floor more easily)."""
    top = NYQUIST_MARGIN * sample_rate / 2
    return [(float(low), float(min(high, top))) for low, high in conf_clips["fallback_bands_hz"]
            if min(high, top) - low >= (high - low) / 2]


Clip = tuple[int, int, float]


def detect_vocalisations(x: np.ndarray, sample_rate: int, conf_clips: dict[str, Any]
                         ) -> tuple[list[Clip], Activity]:
    """Clips of `x` holding bird activity, [(start_sample, end_sample, active_fraction)],
    found in the whole band, or else in the fallback band that gives the most clip time (see
    the module doc); and the analysis of the band they were found in (the whole band's when
    there is none)."""
    check_conf_clips({**conf_clips, "sample_rate": sample_rate})
    x = np.asarray(x, dtype=np.float64)
    clips, activity = find_vocalisations_in_band(x, sample_rate, conf_clips)
    if clips:
        return clips, activity
    for low, high in fallback_bands(conf_clips, sample_rate):
        found, band_activity = find_vocalisations_in_band(
            x, sample_rate, {**conf_clips, "band_low_hz": low, "band_high_hz": high})
        if sum(e - s for s, e, _ in found) > sum(e - s for s, e, _ in clips):
            clips, activity = found, band_activity
    return clips, activity


def find_vocalisations(x: np.ndarray, sample_rate: int,
                       conf_clips: dict[str, Any]) -> list[Clip]:
    """The clips of `detect_vocalisations`."""
    return detect_vocalisations(x, sample_rate, conf_clips)[0]


def background_samples(x: np.ndarray, activity: Activity, clips: list[Clip],
                       min_samples: int) -> np.ndarray:
    """The recording's background, for a noise profile: its inactive, audible frames outside
    every clip, joined. Where these hold fewer than `min_samples`, the quietest frames (by band
    energy) are added until they do (or the recording runs out)."""
    n_frames = len(activity.active)
    frame_len = activity.frame_len
    usable = ~activity.active & (activity.energy_db > DIGITAL_SILENCE_DB)
    for start, end, _ in clips:
        usable[activity.frame_range(start, end)] = False
    chosen = np.flatnonzero(usable)
    if chosen.size * frame_len < min_samples:
        audible = np.flatnonzero(activity.energy_db > DIGITAL_SILENCE_DB)
        quietest = audible[np.argsort(activity.energy_db[audible], kind="stable")]
        extra = quietest[~np.isin(quietest, chosen)]
        need = int(np.ceil(min_samples / frame_len)) - chosen.size
        chosen = np.sort(np.concatenate([chosen, extra[:max(need, 0)]]))
    chosen = chosen[chosen < n_frames]
    if chosen.size == 0:
        return np.zeros(0, dtype=x.dtype)
    return np.concatenate([x[i * frame_len:(i + 1) * frame_len] for i in chosen])


def find_vocalisations_in_band(x: np.ndarray, sample_rate: int, conf_clips: dict[str, Any]
                               ) -> tuple[list[Clip], Activity]:
    """Clips of `x` holding activity in the band [band_low_hz, band_high_hz], and the band's
    analysis.

    Active frames closer than `merge_gap_s` are one vocalisation; each gets `context_s`
    either side and is widened to `clip_min_s` where the recording allows; overlapping
    regions are merged and cut into near-equal parts of at most `clip_max_s`. A clip is kept
    when it lasts at least `clip_min_s`, at least `min_active_fraction` of its frames are
    active, and its band energy as a whole exceeds the noise floor by `min_clip_snr_db`.
    """
    activity = analyse(np.asarray(x, dtype=np.float64), sample_rate, conf_clips)
    frame_len, total = activity.frame_len, len(x)
    min_len = int(round(conf_clips["clip_min_s"] * sample_rate))
    max_len = int(round(conf_clips["clip_max_s"] * sample_rate))
    context = int(round(conf_clips["context_s"] * sample_rate))

    runs = [(first * frame_len, stop * frame_len) for first, stop in _runs(activity.active)]
    calls = _merge(runs, int(round(conf_clips["merge_gap_s"] * sample_rate)))
    regions = [_widen(max(0, s - context), min(total, e + context), min_len, total)
               for s, e in calls]
    regions = _merge(sorted(regions), gap=0)

    clips = []
    for region in regions:
        for start, end in _split(*region, max_len):
            fraction = activity.active_fraction(start, end)
            if (end - start >= min_len and fraction >= conf_clips["min_active_fraction"]
                    and activity.snr_db(start, end) >= conf_clips["min_clip_snr_db"]):
                clips.append((int(start), int(end), fraction))
    return clips, activity
