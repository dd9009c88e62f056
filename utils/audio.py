"""Audio input/output shared by every stage: decode any common format, mix to mono,
resample with a polyphase filter, and write float wav files atomically."""
from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from utils.atomic import atomic_path


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, non-finite, too short."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a file (wav, flac, ogg, mp3: whatever libsndfile reads) to float32 (frames, channels)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{path}: cannot decode audio ({err})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return data, int(sr)


def to_mono(data: np.ndarray) -> np.ndarray:
    """(frames, channels) or (frames,) -> (frames,), averaging channels."""
    return data.mean(axis=1) if data.ndim == 2 else data


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited polyphase resampling along the first axis (scipy's Kaiser-window FIR)."""
    if orig_sr == target_sr:
        return x.astype(np.float32, copy=False)
    ratio = Fraction(target_sr, orig_sr)
    return resample_poly(x, ratio.numerator, ratio.denominator, axis=0).astype(np.float32)


def load_audio(path: str | Path, sample_rate: int, min_duration_s: float = 0.0) -> np.ndarray:
    """Decode, mix to mono and resample to `sample_rate`; returns float32 (samples,).

    Raises AudioError (with the file name and the reason) for unusable input.
    """
    data, sr = read_audio(path)
    x = resample(to_mono(data), sr, sample_rate)
    if x.shape[0] < min_duration_s * sample_rate:
        raise AudioError(f"{path}: too short ({x.shape[0] / sample_rate:.2f} s < "
                         f"{min_duration_s:.2f} s)")
    if not np.any(x):
        raise AudioError(f"{path}: digital silence")
    return x


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write float32 wav atomically (float, so that mixtures equal the sum of their sources
    exactly). `audio` is (samples,) or (samples, channels)."""
    # Encoded in memory, then written as plain bytes: libsndfile fsyncs every file it closes,
    # which made writing thousands of small wavs disk-bound (the rename is atomic all the same).
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio, dtype=np.float32), sample_rate, subtype="FLOAT",
             format="WAV")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
