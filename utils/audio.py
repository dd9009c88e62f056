"""Audio input/output shared by every stage: decode any common format, mix to mono,
resample with a polyphase filter, and write float wav files atomically."""
from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from utils.atomic import atomic_path


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, non-finite, too short."""


def open_audio(path: str | Path) -> sf.SoundFile:
    """Open a file for decoding (wav, flac, ogg, mp3: whatever libsndfile reads); raises
    AudioError naming the file when it is missing, empty or not audio."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    try:
        return sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{path}: cannot decode audio ({err})") from None


def header_frames(audio_file: sf.SoundFile) -> int | None:
    """The number of frames the file's header announces, or None when it gives none."""
    frames = int(audio_file.frames)
    return frames if 0 < frames < 2 ** 62 else None


def short_read_message(path: str | Path, n_decoded: int, audio_file: sf.SoundFile) -> str:
    sr = audio_file.samplerate
    return (f"{path}: truncated or corrupt: only {n_decoded / sr:.2f} s decode of the "
            f"{audio_file.frames / sr:.2f} s its header announces")


def read_blocks(audio_file: sf.SoundFile, path: str | Path, block: int) -> Iterator[np.ndarray]:
    """Decode an open file in float32 (frames, channels) blocks of `block` frames (the last
    one shorter), each a new array. Raises AudioError when fewer frames decode than the header
    announces, after the blocks that did decode: unlike soundfile's `blocks()`, which then
    pads the announced length with the contents of its reused buffer (seen with mp3 files cut
    short), nothing is ever made up."""
    expected = header_frames(audio_file)
    n = 0
    try:
        while True:
            data = audio_file.read(block, dtype="float32", always_2d=True)
            if data.shape[0] == 0:
                break
            n += data.shape[0]
            yield data
            if data.shape[0] < block:
                break
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: decoding failed near {n / audio_file.samplerate:.1f} s "
                         f"({err})") from None
    if expected is not None and n < expected:
        raise AudioError(short_read_message(path, n, audio_file))


def decoded_duration_s(path: str | Path) -> float:
    """Seconds of audio that really decode from `path` (the whole file is decoded, block by
    block); raises AudioError for unreadable, empty or truncated files (read_blocks)."""
    with open_audio(path) as audio_file:
        n = sum(data.shape[0] for data in read_blocks(audio_file, path, 1 << 18))
        if n == 0:
            raise AudioError(f"{path}: no audio samples")
        return n / audio_file.samplerate


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a file (wav, flac, ogg, mp3: whatever libsndfile reads) to float32 (frames, channels).
    A file that decodes shorter than its header announces (cut short) raises AudioError."""
    path = Path(path)
    with open_audio(path) as audio_file:
        try:
            data = audio_file.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
            raise AudioError(f"{path}: cannot decode audio ({err})") from None
        expected = header_frames(audio_file)
        if data.shape[0] == 0:
            raise AudioError(f"{path}: no audio samples")
        if expected is not None and data.shape[0] < expected:
            raise AudioError(short_read_message(path, data.shape[0], audio_file))
        sr = int(audio_file.samplerate)
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return data, sr


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
