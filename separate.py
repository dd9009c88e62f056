"""Separate users' recordings with a trained BirdSep model.

    python separate.py --exp exp/<tag> FILE [FILE ...] --out_dir DIR [--input_rate]
                       [--chunk_s S] [--overlap_s S] [--device cpu|cuda]

Each input (a file, or a directory: the audio files directly inside it; any format libsndfile
decodes: wav, flac, ogg, mp3; any sample rate; mono or stereo, mixed to mono; any length) gives
one wav per source, `<stem>_s1.wav`, ... (and `<stem>_background.wav` from a model with a
background output) in DIR, at the model's sample rate or, with --input_rate, at the input's
rate and length.

What bounds memory: nothing ever holds a whole file. The decoder reads blocks of about one
chunk, each block is resampled with enough real context on both sides that the stream equals
resampling the whole file (StreamingResampler), the model sees one chunk of `chunk_s` seconds
at a time, and separated samples are written as soon as no later chunk can change them. Peak
memory is therefore the model's activations for one chunk plus a few chunk-sized buffers,
whatever the file's length.

Long inputs are separated chunk by chunk with overlap-add: consecutive chunks overlap by
`overlap_s` seconds and are cross-faded there with complementary Hann (sin^2/cos^2) ramps that
sum to one. A permutation-invariant model may output its sources in any order in each chunk,
so every chunk's sources are first matched to the previous chunk's on their common overlap
(the assignment with the highest summed normalised correlation).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import soundfile as sf
import torch
from scipy.optimize import linear_sum_assignment
from scipy.signal import resample_poly
from tqdm import tqdm

from utils.cpu import cpu_has_native_bf16
from model import load_best_model
from utils.allocator import keep_freed_memory
from utils.atomic import atomic_path
from utils.audio import AudioError, open_audio, read_blocks
from utils.config import ConfError, apply_overrides, auto_setting, parse_stage_args


class SeparationFailures(RuntimeError):
    """Some inputs could not be separated; the others were. Holds both lists."""

    def __init__(self, written: list[Path], failed: dict[Path, str]):
        self.written = written
        self.failed = failed
        super().__init__(f"{len(failed)} input(s) failed:\n" +
                         "\n".join(f"  {reason}" for reason in failed.values()))


class StreamingResampler:
    """Polyphase resampling of a signal that arrives in pieces.

    The concatenated output equals utils.audio.resample of the whole signal (to float
    rounding): every block is filtered together with `margin` real input samples on each side
    (more than the half-length of scipy's Kaiser FIR), and blocks start on multiples of
    `down`, so each maps onto a whole number of output samples.
    """

    def __init__(self, orig_sr: int, target_sr: int, block: int):
        ratio = Fraction(int(target_sr), int(orig_sr))
        self.up, self.down = ratio.numerator, ratio.denominator
        # resample_poly's filter has half-length 10 * max(up, down) at the upsampled rate.
        half_length_in = 10 * max(self.up, self.down) // self.up + 1
        self.margin_steps = math.ceil((half_length_in + 1) / self.down) + 1
        self.margin = self.margin_steps * self.down
        self.block = max(1, math.ceil(block / self.down)) * self.down
        # The signal is zero before it starts, as resample_poly assumes.
        self._buffer = np.zeros(self.margin, dtype=np.float32)
        self._n_in = 0
        self._n_out = 0

    @property
    def identity(self) -> bool:
        return self.up == self.down

    def _resample_block(self, context: np.ndarray, n_out: int) -> np.ndarray:
        y = resample_poly(context, self.up, self.down)
        start = self.margin_steps * self.up
        return y[start:start + n_out].astype(np.float32)

    def push(self, x: np.ndarray) -> np.ndarray:
        """Add input samples; return the output samples that are now final."""
        x = np.asarray(x, dtype=np.float32)
        self._n_in += x.shape[0]
        if self.identity:
            self._n_out += x.shape[0]
            return x
        self._buffer = np.concatenate([self._buffer, x])
        outputs = []
        n_block_out = self.block // self.down * self.up
        while self._buffer.shape[0] >= 2 * self.margin + self.block:
            outputs.append(self._resample_block(self._buffer[:2 * self.margin + self.block],
                                                n_block_out))
            self._buffer = self._buffer[self.block:]
        out = np.concatenate(outputs) if outputs else np.zeros(0, dtype=np.float32)
        self._n_out += out.shape[0]
        return out

    def flush(self) -> np.ndarray:
        """The remaining output; the total is ceil(n_in * up / down), as for the whole signal."""
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        n_total = -(-self._n_in * self.up // self.down)
        remaining = self._buffer.shape[0] - self.margin
        if remaining <= 0 or n_total <= self._n_out:
            return np.zeros(0, dtype=np.float32)
        padded = math.ceil(remaining / self.down) * self.down + 2 * self.margin
        context = np.pad(self._buffer, (0, padded - self._buffer.shape[0]))
        out = self._resample_block(context, n_total - self._n_out)
        self._n_out += out.shape[0]
        self._buffer = np.zeros(self.margin, dtype=np.float32)
        return out


def stream_mono(audio_file: sf.SoundFile, path: Path, block: int) -> Iterator[np.ndarray]:
    """Decode an open file block by block, mixed to mono; bad data raises AudioError, and so
    does a file that decodes shorter than its header announces (utils.audio.read_blocks), so
    that nothing is written for it."""
    position = 0
    for data in read_blocks(audio_file, path, block):
        if not np.isfinite(data).all():
            raise AudioError(f"{path}: audio contains NaN or infinite samples "
                             f"near {position / audio_file.samplerate:.1f} s")
        position += data.shape[0]
        yield data.mean(axis=1)
    if position == 0:
        raise AudioError(f"{path}: no audio samples")


class OverlapAddSeparator:
    """Separates a stream chunk by chunk (see the module docstring).

    `push` and `flush` return the (n_src, samples) output that no later chunk can change;
    together they return exactly as many samples as were pushed.
    """

    MIN_INPUT = 1024  # samples

    def __init__(self, model: torch.nn.Module, chunk: int, overlap: int,
                 device: str | torch.device = "cpu", fixed_last: bool = False):
        """`fixed_last`: the model's last output (a background track) keeps its place; only
        the others are reordered between chunks."""
        if not 0 < overlap <= chunk // 2:
            raise ValueError(f"overlap ({overlap} samples) must be > 0 and at most half a chunk "
                             f"({chunk} samples): the overlap aligns the sources of consecutive "
                             "chunks, and no sample may lie in three chunks")
        self.model, self.fixed_last = model, fixed_last
        self.chunk, self.overlap, self.hop = chunk, overlap, chunk - overlap
        self.device = torch.device(device)
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        self.fade_in = ramp.astype(np.float32)
        self.fade_out = (1.0 - ramp).astype(np.float32)
        self._buffer = np.zeros(0, dtype=np.float32)  # starts where the next chunk starts
        self._tail: np.ndarray | None = None  # previous chunk's last `overlap` samples

    def _separate_chunk(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        # A last chunk shorter than the encoder's kernel would fail in conv1d; a few ms of
        # zeros after it are harmless.
        x = np.pad(x, (0, max(0, self.MIN_INPUT - n)))
        with torch.inference_mode():
            wav = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)[None]
            est = self.model(wav)[0]
        return est.float().cpu().numpy()[:, :n]

    def _align(self, est: np.ndarray) -> np.ndarray:
        """Reorder `est`'s sources to match the previous chunk's on the overlap."""
        new = est[:, :self.overlap].astype(np.float64)
        prev = self._tail.astype(np.float64)
        similarity = (prev @ new.T) / (np.linalg.norm(prev, axis=1)[:, None] *
                                        np.linalg.norm(new, axis=1)[None, :] + 1e-12)
        n_free = est.shape[0] - 1 if self.fixed_last else est.shape[0]
        _, order = linear_sum_assignment(similarity[:n_free, :n_free], maximize=True)
        return est[[*order, *range(n_free, est.shape[0])]]

    def _process(self, x: np.ndarray, last: bool) -> np.ndarray:
        est = self._separate_chunk(x)
        parts = []
        body_start = 0
        if self._tail is not None:
            est = self._align(est)
            parts.append(self._tail * self.fade_out + est[:, :self.overlap] * self.fade_in)
            body_start = self.overlap
        body_end = est.shape[1] if last else self.hop
        parts.append(est[:, body_start:body_end])
        self._tail = None if last else est[:, self.hop:]
        return np.concatenate(parts, axis=1)

    def push(self, x: np.ndarray) -> list[np.ndarray]:
        self._buffer = np.concatenate([self._buffer, np.asarray(x, dtype=np.float32)])
        outputs = []
        while self._buffer.shape[0] >= self.chunk:
            outputs.append(self._process(self._buffer[:self.chunk], last=False))
            self._buffer = self._buffer[self.hop:]
        return outputs

    def flush(self) -> list[np.ndarray]:
        started = self._tail is not None
        if self._buffer.shape[0] > (self.overlap if started else 0):
            out = [self._process(self._buffer, last=True)]
        elif started:  # nothing after the last chunk: its tail stands alone
            out = [self._tail]
        else:
            out = []
        self._buffer = np.zeros(0, dtype=np.float32)
        self._tail = None
        return out


def separate_array(model: torch.nn.Module, x: np.ndarray, chunk: int, overlap: int,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """Separate a mono signal at the model's rate, chunk by chunk: (T,) -> (outputs, T) (the
    birds, then the background for a model with `background_output`)."""
    separator = OverlapAddSeparator(model, chunk, overlap, device,
                                    getattr(model, "background_output", False))
    blocks = separator.push(x) + separator.flush()
    return np.concatenate(blocks, axis=1)


class _SourceWriters:
    """The separated output of one input: one float wav per source, written through `.part`
    files that are renamed when `stack` closes without error. At the model's rate, or
    resampled back to the input's rate and cut to the input's length."""

    def __init__(self, stack: contextlib.ExitStack, stem_path: Path, n_src: int, model_sr: int,
                 input_sr: int | None, block: int, background: bool = False):
        n_birds = n_src - 1 if background else n_src
        names = [f"s{k + 1}" for k in range(n_birds)] + (["background"] if background else [])
        self.paths = [stem_path.with_name(f"{stem_path.name}_{name}.wav") for name in names]
        self.files = []
        for path in self.paths:
            tmp = stack.enter_context(atomic_path(path))
            self.files.append(stack.enter_context(
                sf.SoundFile(str(tmp), "w", samplerate=input_sr or model_sr, channels=1,
                             subtype="FLOAT", format="WAV")))
        self.back = (None if input_sr is None else
                     [StreamingResampler(model_sr, input_sr, block) for _ in range(n_src)])
        self.n_written = 0

    def _write(self, sources: Sequence[np.ndarray], limit: int | None) -> None:
        n = sources[0].shape[0]
        if limit is not None:  # never past the input's length (back-resampling rounds up)
            n = max(0, min(n, limit - self.n_written))
        for f, source in zip(self.files, sources):
            f.write(source[:n])
        self.n_written += n

    def write(self, block: np.ndarray, n_input: int) -> None:
        """Write (n_src, samples) at the model's rate; `n_input`: input samples read so far."""
        if self.back is None:
            self._write(list(block), None)
        else:
            self._write([r.push(s) for r, s in zip(self.back, block)], n_input)

    def finish(self, n_input: int) -> None:
        if self.back is not None:
            self._write([r.flush() for r in self.back], n_input)
            if self.n_written < n_input:
                pad = np.zeros(n_input - self.n_written, dtype=np.float32)
                self._write([pad] * len(self.files), n_input)


def separate_file(model: torch.nn.Module, path: str | Path, out_dir: str | Path,
                  chunk_s: float, overlap_s: float, input_rate: bool = False,
                  device: str | torch.device = "cpu", progress: bool = True) -> list[Path]:
    """Separate one file into `<out_dir>/<stem>_s<k>.wav` (and `<stem>_background.wav` for a
    model with `background_output`); raises AudioError for bad input."""
    path, out_dir = Path(path), Path(out_dir)
    model_sr = int(model.sample_rate)
    chunk = int(round(chunk_s * model_sr))
    background = getattr(model, "background_output", False)
    separator = OverlapAddSeparator(model, chunk, int(round(overlap_s * model_sr)), device,
                                    background)
    with open_audio(path) as audio_file, contextlib.ExitStack() as stack:
        in_sr = int(audio_file.samplerate)
        block_in = max(1, int(round(chunk_s * in_sr)))
        to_model = StreamingResampler(in_sr, model_sr, block_in)
        known_length = 0 < audio_file.frames < 2 ** 62
        bar = stack.enter_context(tqdm(
            total=audio_file.frames / in_sr if known_length else None, unit="s",
            desc=path.name, disable=not progress, leave=False,
            bar_format=("{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]"
                        if known_length else None)))
        writers: _SourceWriters | None = None
        n_in = 0

        def write(blocks: list[np.ndarray]) -> None:
            nonlocal writers
            for block in blocks:
                if writers is None:  # the number of sources is known from the first output
                    writers = _SourceWriters(stack, out_dir / path.stem, block.shape[0],
                                             model_sr, in_sr if input_rate else None, chunk,
                                             background)
                writers.write(block, n_in)

        for x in stream_mono(audio_file, path, block_in):
            n_in += x.shape[0]
            write(separator.push(to_model.push(x)))
            bar.update(x.shape[0] / in_sr)
        write(separator.push(to_model.flush()))
        write(separator.flush())
        writers.finish(n_in)
        return writers.paths


def use_bf16(setting: bool | str, device: str) -> bool:
    """Whether to separate with bf16 matrix products: `setting` true, or auto on a CPU with bf16
    instructions (utils.cpu.cpu_has_native_bf16; there it is faster with the same quality:
    RESULTS.md, Speed). On GPUs auto stays float32: inference is not what costs there."""
    setting = auto_setting("--bf16", setting)
    if setting == "auto":
        return torch.device(device).type == "cpu" and cpu_has_native_bf16()
    return setting == "true"


def audio_extensions() -> set[str]:
    """File name extensions of the formats libsndfile reads (lower case, with the dot)."""
    # RAW (header-less) is left out: without a header it cannot be opened as audio.
    return ({f".{name.lower()}" for name in sf.available_formats() if name != "RAW"} |
            {".mp3", ".oga", ".opus", ".aif", ".aiff"})


def expand_inputs(files: Sequence[str | Path]) -> list[Path]:
    """The inputs, with each directory replaced by the audio files directly inside it (those
    whose extension is a format libsndfile reads, sorted by name). A directory without any
    raises ValueError naming it; missing files are left for separate_file to report."""
    inputs: list[Path] = []
    extensions = audio_extensions()
    for path in map(Path, files):
        if not path.is_dir():
            inputs.append(path)
            continue
        inside = sorted(p for p in path.iterdir()
                        if p.is_file() and p.suffix.lower() in extensions)
        if not inside:
            raise ValueError(f"{path}: a directory without audio files directly inside "
                             f"(looked for {', '.join(sorted(extensions))}; subdirectories "
                             "are not searched)")
        inputs += inside
    return inputs


def checked_out_dir(out_dir: str | Path) -> Path:
    """`out_dir`, created if needed; ValueError before any work when it is a file (or under
    one) or cannot be created."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out_dir {out_dir}: is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out_dir {out_dir}: cannot create it ({err.strerror})") from None
    return out_dir


def separate_files(exp_dir: str | Path, files: Sequence[str | Path], out_dir: str | Path,
                   chunk_s: float, overlap_s: float, input_rate: bool = False,
                   device: str | None = None, bf16: bool | str = False) -> list[Path]:
    """Separate every file with the experiment's best model; returns the written wavs.

    Inputs that cannot be separated (unreadable, corrupt, NaN, output name clash) are
    reported and skipped; the others are still written. If any failed, raises
    SeparationFailures (holding `written` and `failed`) after all files were tried.
    With `bf16` true, the model runs under bf16 autocast; "auto" (conf `separation.bf16`'s
    default) does so on a CPU with bf16 instructions (use_bf16).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available to torch "
                         f"{torch.__version__} here; use --device cpu")
    files = expand_inputs(files)
    out_dir = checked_out_dir(out_dir)
    bf16 = use_bf16(bf16, device)
    keep_freed_memory()   # large activations reused, not page-faulted again (utils/allocator.py)
    model = load_best_model(exp_dir).to(device).eval()
    written: list[Path] = []
    failed: dict[Path, str] = {}
    stems: dict[str, Path] = {}
    # Autocast is per thread: it covers every model call below (outputs come back as float32).
    precision = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    for path in tqdm(files, desc="files", unit="file", disable=len(files) < 2):
        if path.stem in stems:
            failed[path] = (f"{path}: output names clash with {stems[path.stem]} "
                            "(same file name stem); separate it into another --out_dir")
            tqdm.write(f"skipped: {failed[path]}", file=sys.stderr)
            continue
        stems[path.stem] = path
        try:
            with precision:
                written += separate_file(model, path, out_dir, chunk_s, overlap_s, input_rate,
                                         device)
        except AudioError as err:
            failed[path] = str(err)
            tqdm.write(f"skipped: {err}", file=sys.stderr)
    print(f"separate: {len(files) - len(failed)}/{len(files)} file(s) separated into "
          f"{len(written)} wav(s) in {out_dir} ({'bf16' if bf16 else 'float32'} products)"
          + (f"; {len(failed)} failed" if failed else ""))
    if failed:
        raise SeparationFailures(written, failed)
    return written


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exp", "--exp_dir", dest="exp_dir", required=True,
                        help="experiment directory holding best_model.pth (exp/<tag>)")
    parser.add_argument("files", nargs="+", type=Path,
                        help="recordings to separate, or directories of them")
    parser.add_argument("--out_dir", required=True, type=Path, help="where the wavs go")
    parser.add_argument("--input_rate", action="store_true",
                        help="write at each input's sample rate and length "
                             "(default: the model's rate)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available")
    # Declared here (not left to the generic --key value overrides) so that their values are
    # never mistaken for input files; their defaults come from the conf's separation section.
    parser.add_argument("--chunk_s", default=None, help="chunk length in seconds")
    parser.add_argument("--overlap_s", default=None, help="overlap of consecutive chunks (s)")
    parser.add_argument("--bf16", default=None, help="true: bf16 matrix products (faster on "
                        "GPUs and on CPUs with bf16 instructions); auto: on such CPUs; false")


def main(argv: Sequence[str] | None = None) -> int:
    args, conf = parse_stage_args(__doc__.split("\n\n")[0], argv, _add_arguments)
    if "separation" not in conf:
        sys.exit(f"{args.conf}: no 'separation' section (chunk_s, overlap_s)")
    try:
        conf = apply_overrides(conf, {key: getattr(args, key)
                                      for key in ("chunk_s", "overlap_s", "bf16")
                                      if getattr(args, key) is not None})
    except ConfError as err:
        sys.exit(f"separate.py: {err}")
    try:
        separate_files(args.exp_dir, args.files, args.out_dir,
                       chunk_s=conf["separation"]["chunk_s"],
                       overlap_s=conf["separation"]["overlap_s"],
                       input_rate=args.input_rate, device=args.device,
                       bf16=conf["separation"]["bf16"])
    except SeparationFailures as err:
        print(f"separate.py: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:
        print(f"separate.py: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
