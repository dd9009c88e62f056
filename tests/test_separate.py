"""separate.py: streamed decoding/resampling, chunked overlap-add with source alignment, files
of any rate/channels, and bad inputs that are reported while the others are still written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from asteroid.models import ConvTasNet

from conftest import TINY_MODEL

import separate
from separate import (OverlapAddSeparator, SeparationFailures, StreamingResampler,
                      separate_array, separate_files)
from utils.audio import resample
from utils.cpu import lists_bf16_flag
from utils.config import read_conf, write_conf

SR = 8000
TINY = dict(n_src=2, **TINY_MODEL, sample_rate=SR)


def tiny_model(seed: int = 0, **kwargs) -> ConvTasNet:
    torch.manual_seed(seed)
    return ConvTasNet(**{**TINY, **kwargs}).eval()


def save_experiment(exp_dir: Path, model: ConvTasNet, repo_root: Path) -> Path:
    """best_model.pth (asteroid format) and a resolved conf.yml, as training leaves them."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    package = model.serialize()
    # torch >= 2.6 loads with weights_only=True, which refuses asteroid's TorchVersion object.
    package["infos"]["software_versions"] = {
        k: str(v) for k, v in package["infos"]["software_versions"].items()}
    torch.save(package, exp_dir / "best_model.pth")
    write_conf(read_conf(repo_root / "conf.yml"), exp_dir / "conf.yml")
    return exp_dir


def birdlike(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """Two intermittent tonal 'birds' and a little noise."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    song = 0.3 * np.sin(2 * np.pi * 1500 * t + 3 * np.sin(2 * np.pi * 0.7 * t)) * \
        (np.sin(2 * np.pi * 0.3 * t) > 0)
    call = 0.2 * np.sin(2 * np.pi * 3000 * t) * (np.sin(2 * np.pi * 0.23 * t + 1) > 0)
    return (song + call + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def whole(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)[None])[0].numpy()


class SwapsEveryOtherCall(torch.nn.Module):
    """A model whose source order changes from one call to the next, as PIT allows."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.sample_rate, self.calls = model, model.sample_rate, 0

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        est = self.model(wav)
        return est.flip(1) if self.calls % 2 == 0 else est


@pytest.mark.parametrize("orig_sr,target_sr", [(44100, 8000), (8000, 44100), (22050, 8000),
                                               (8000, 8000)])
def test_streaming_resampler_equals_resampling_the_whole_signal(orig_sr, target_sr):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(orig_sr * 2 + 17).astype(np.float32)
    resampler = StreamingResampler(orig_sr, target_sr, block=orig_sr // 3)
    pieces, i = [], 0
    while i < x.size:  # irregular pieces, as blocks of a decoder arrive
        n = int(rng.integers(1, orig_sr))
        pieces.append(resampler.push(x[i:i + n]))
        i += n
    pieces.append(resampler.flush())
    streamed, reference = np.concatenate(pieces), resample(x, orig_sr, target_sr)
    assert streamed.shape == reference.shape
    np.testing.assert_allclose(streamed, reference, atol=1e-5)


def test_chunked_separation_equals_whole_separation_despite_source_order_changes():
    """20 s at 8 kHz in chunks of 4 s overlapping by 1 s. With a frame-local model (cLN;
    receptive field 15 frames = 16 ms << 1 s overlap) the only differences come from the zero
    padding at chunk edges, where the cross-fade weight is ~0: tolerance 1e-4 x peak,
    everywhere including chunk borders, although every other chunk's sources come out swapped."""
    model = tiny_model(norm_type="cLN")
    x = birdlike(20.0, SR)
    reference = whole(model, x)
    swapping = SwapsEveryOtherCall(model)
    chunked = separate_array(swapping, x, chunk=4 * SR, overlap=SR)
    assert swapping.calls == 7  # chunks start every 3 s; so about half came out swapped
    assert chunked.shape == reference.shape
    tolerance = 1e-4 * np.abs(reference).max()
    assert np.abs(chunked - reference).max() <= tolerance
    borders = np.concatenate([np.arange(k * 3 * SR - 50, k * 3 * SR + SR + 50)
                              for k in range(1, 6)])
    assert np.abs(chunked[:, borders] - reference[:, borders]).max() <= tolerance


def test_chunked_separation_with_global_layer_norm_stays_close():
    """gLN normalises over the whole input, so chunks see other statistics than the whole file;
    on this stationary signal the chunked result stays within 25 dB SNR of the whole one."""
    model = tiny_model()
    x = birdlike(20.0, SR, seed=1)
    reference = whole(model, x)
    chunked = separate_array(model, x, chunk=4 * SR, overlap=SR)
    snr = 10 * np.log10((reference ** 2).sum(1) / ((chunked - reference) ** 2).sum(1))
    assert snr.min() > 25.0


def test_short_inputs_and_invalid_overlap():
    model = tiny_model()
    for n in (5, 300, 4 * SR + 3):  # shorter than the encoder kernel, than a chunk, ~ a chunk
        x = birdlike(n / SR, SR)
        assert separate_array(model, x, chunk=4 * SR, overlap=SR).shape == (2, n)
    with pytest.raises(ValueError, match="overlap"):
        OverlapAddSeparator(model, chunk=4 * SR, overlap=3 * SR)
    with pytest.raises(ValueError, match="overlap"):
        OverlapAddSeparator(model, chunk=4 * SR, overlap=0)


def test_stereo_44k_and_other_inputs_at_model_and_input_rate(tmp_path, repo_root):
    exp = save_experiment(tmp_path / "exp", tiny_model(), repo_root)
    stereo = np.stack([birdlike(3.0, 44100), birdlike(3.0, 44100, seed=2)], axis=1)[:-7]
    sf.write(tmp_path / "stereo44k.wav", stereo, 44100, subtype="PCM_16")
    sf.write(tmp_path / "mono16k.flac", birdlike(2.5, 16000)[:, None], 16000)
    files = [tmp_path / "stereo44k.wav", tmp_path / "mono16k.flac"]
    frames = {"stereo44k": (stereo.shape[0], 44100), "mono16k": (40000, 16000)}

    written = separate_files(exp, files, tmp_path / "model_rate", chunk_s=1.0, overlap_s=0.25,
                             device="cpu")
    assert sorted(p.name for p in written) == ["mono16k_s1.wav", "mono16k_s2.wav",
                                               "stereo44k_s1.wav", "stereo44k_s2.wav"]
    for path in written:
        n, sr = frames[path.stem.rsplit("_", 1)[0]]
        info = sf.info(str(path))
        assert (info.samplerate, info.channels) == (SR, 1)
        assert info.frames == -(-n * SR // sr)  # ceil, as resampling the input gives

    written = separate_files(exp, files, tmp_path / "input_rate", chunk_s=1.0, overlap_s=0.25,
                             input_rate=True, device="cpu")
    for path in written:
        n, sr = frames[path.stem.rsplit("_", 1)[0]]
        audio, out_sr = sf.read(str(path))
        assert (out_sr, audio.shape) == (sr, (n,))
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert not list(tmp_path.glob("*/*.part"))


def test_bad_inputs_are_reported_and_the_others_still_separated(tmp_path, repo_root, capsys):
    exp = save_experiment(tmp_path / "exp", tiny_model(), repo_root)
    sf.write(tmp_path / "good.wav", birdlike(2.0, SR), SR)
    (tmp_path / "corrupt.mp3").write_bytes(b"ID3\x03\x00" + bytes(range(256)) * 20)
    (tmp_path / "empty.wav").write_bytes(b"")
    with_nan = birdlike(3.0, SR)
    with_nan[2 * SR] = np.nan  # in the second chunk: fails after outputs were started
    sf.write(tmp_path / "nan.wav", with_nan, SR, subtype="FLOAT")
    out = tmp_path / "out"
    rc = separate.main(["--conf", str(repo_root / "conf.yml"), "--exp", str(exp),
                        str(tmp_path / "corrupt.mp3"), str(tmp_path / "empty.wav"),
                        str(tmp_path / "nan.wav"), str(tmp_path / "missing.flac"),
                        str(tmp_path / "good.wav"), "--out_dir", str(out),
                        "--chunk_s", "1", "--overlap_s", "0.25"])
    err = capsys.readouterr().err
    assert rc != 0
    assert sorted(p.name for p in out.iterdir()) == ["good_s1.wav", "good_s2.wav"]  # no .part
    assert "corrupt.mp3: cannot decode audio" in err
    assert "empty.wav: empty file" in err
    assert "nan.wav: audio contains NaN" in err
    assert "missing.flac: no such file" in err
    assert "4 input(s) failed" in err

    with pytest.raises(SeparationFailures) as failure:
        separate_files(exp, [tmp_path / "good.wav", tmp_path / "empty.wav"], tmp_path / "api",
                       chunk_s=1.0, overlap_s=0.25, device="cpu")
    assert [p.name for p in failure.value.written] == ["good_s1.wav", "good_s2.wav"]
    assert list(failure.value.failed) == [tmp_path / "empty.wav"]


def test_bf16_separation_is_close_to_float32(tmp_path, repo_root):
    exp = save_experiment(tmp_path / "exp", tiny_model(), repo_root)
    sf.write(tmp_path / "rec.wav", birdlike(2.0, SR), SR, subtype="FLOAT")
    outputs = {}
    for flag in ("false", "true"):
        out_dir = tmp_path / f"bf16_{flag}"
        assert separate.main(["--conf", str(repo_root / "conf.yml"), "--exp", str(exp),
                              "--out_dir", str(out_dir), "--device", "cpu", "--bf16", flag,
                              str(tmp_path / "rec.wav")]) == 0
        outputs[flag] = np.stack([sf.read(str(out_dir / f"rec_s{k}.wav"))[0] for k in (1, 2)])
    difference = np.linalg.norm(outputs["true"] - outputs["false"]) / np.linalg.norm(outputs["false"])
    assert 0 < difference < 3e-2   # bf16 products were used, and changed little


@pytest.mark.parametrize("setting, device, native, expected", [
    ("auto", "cpu", True, True), ("auto", "cpu", False, False), ("auto", "cuda", True, False),
    ("true", "cpu", False, True), (True, "cuda", False, True), ("false", "cpu", True, False),
    (False, "cpu", True, False)])
def test_bf16_auto_means_cpus_with_bf16_instructions(setting, device, native, expected, monkeypatch):
    monkeypatch.setattr(separate, "cpu_has_native_bf16", lambda: native)
    assert separate.use_bf16(setting, device) is expected


def test_bf16_flags_are_read_from_cpuinfo():
    zen4 = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n"
    sapphire_rapids = "flags\t\t: fpu avx512f amx_bf16 amx_tile\n"
    skylake = "flags\t\t: fpu avx512f avx512bw avx512vl\n"
    assert lists_bf16_flag(zen4) and lists_bf16_flag(sapphire_rapids)
    assert not lists_bf16_flag(skylake) and not lists_bf16_flag("")


def test_separate_says_which_precision_ran_and_refuses_an_unknown_setting(tmp_path, repo_root,
                                                                          monkeypatch, capsys):
    exp = save_experiment(tmp_path / "exp", tiny_model(), repo_root)
    sf.write(tmp_path / "rec.wav", birdlike(1.0, SR), SR, subtype="FLOAT")
    argv = ["--conf", str(repo_root / "conf.yml"), "--exp", str(exp), "--out_dir",
            str(tmp_path / "out"), "--device", "cpu", str(tmp_path / "rec.wav")]
    monkeypatch.setattr(separate, "cpu_has_native_bf16", lambda: True)
    assert separate.main(argv) == 0   # conf.yml's default: auto
    assert "(bf16 products)" in capsys.readouterr().out
    monkeypatch.setattr(separate, "cpu_has_native_bf16", lambda: False)
    assert separate.main(argv) == 0
    assert "(float32 products)" in capsys.readouterr().out
    assert separate.main(argv + ["--bf16", "maybe"]) == 2
    assert "--bf16 'maybe': expected one of auto, true, false" in capsys.readouterr().err


def truncated_mp3(xc_dump: Path, dest: Path) -> Path:
    """A real xeno-canto mp3 cut to a third of its bytes (an interrupted download): its header
    still announces the whole length."""
    data = (xc_dump / "audio" / "XC100147.mp3").read_bytes()
    dest.write_bytes(data[:len(data) // 3])
    return dest


def test_truncated_mp3_is_refused_and_nothing_invented_is_written(tmp_path, repo_root, xc_dump,
                                                                  capsys):
    """soundfile's blocks() pads a short read to the header's length with its reused buffer:
    separate.py wrote 42 s for the 14 s that decode, the rest repeating the start."""
    exp = save_experiment(tmp_path / "exp", tiny_model(), repo_root)
    cut = truncated_mp3(xc_dump, tmp_path / "cut.mp3")
    sf.write(tmp_path / "good.wav", birdlike(1.0, SR), SR)
    out = tmp_path / "out"
    rc = separate.main(["--conf", str(repo_root / "conf.yml"), "--exp", str(exp), str(cut),
                        str(tmp_path / "good.wav"), "--out_dir", str(out), "--device", "cpu",
                        "--chunk_s", "4", "--overlap_s", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["good_s1.wav", "good_s2.wav"]
    assert "cut.mp3: truncated or corrupt: only 13." in err and "of the 42.02 s" in err


def test_a_directory_input_separates_the_audio_files_inside(tmp_path, repo_root):
    exp = save_experiment(tmp_path / "exp", tiny_model(), repo_root)
    recordings = tmp_path / "recordings"
    (recordings / "sub").mkdir(parents=True)
    sf.write(recordings / "a.wav", birdlike(1.0, SR), SR)
    sf.write(recordings / "b.FLAC", birdlike(1.0, SR, seed=3), SR)
    (recordings / "notes.txt").write_text("not audio")
    sf.write(recordings / "sub" / "deeper.wav", birdlike(1.0, SR), SR)
    written = separate_files(exp, [recordings], tmp_path / "out", chunk_s=1.0, overlap_s=0.25,
                             device="cpu")
    assert [p.name for p in written] == ["a_s1.wav", "a_s2.wav", "b_s1.wav", "b_s2.wav"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not audio")
    with pytest.raises(ValueError, match="empty: a directory without audio files"):
        separate_files(exp, [recordings / "a.wav", tmp_path / "empty"], tmp_path / "out2",
                       chunk_s=1.0, overlap_s=0.25, device="cpu")
    assert not (tmp_path / "out2").exists()  # refused before any work


def test_bad_out_dir_and_missing_gpu_are_refused_before_any_work(tmp_path, repo_root,
                                                                  monkeypatch, capsys):
    exp = save_experiment(tmp_path / "exp", tiny_model(), repo_root)
    sf.write(tmp_path / "rec.wav", birdlike(1.0, SR), SR)
    (tmp_path / "a_file").write_text("")
    loads = []
    monkeypatch.setattr(separate, "load_best_model",
                        lambda exp_dir: loads.append(exp_dir) or tiny_model())
    argv = ["--conf", str(repo_root / "conf.yml"), "--exp", str(exp), str(tmp_path / "rec.wav")]
    assert separate.main(argv + ["--out_dir", str(tmp_path / "a_file")]) == 2
    assert f"--out_dir {tmp_path / 'a_file'}: is a file, not a directory" in capsys.readouterr().err
    assert separate.main(argv + ["--out_dir", str(tmp_path / "a_file" / "below")]) == 2
    assert "cannot create it" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert separate.main(argv + ["--out_dir", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is available" in capsys.readouterr().err
    assert not loads and not (tmp_path / "out").exists()


class SwapsBirdsEveryOtherCall(torch.nn.Module):
    """A model with a background output (its last) whose bird outputs change order from one
    call to the next, as PIT over the birds allows; the background keeps its place."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.sample_rate, self.calls = model, model.sample_rate, 0
        self.background_output = True

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        est = self.model(wav)
        return est[:, [1, 0, 2]] if self.calls % 2 == 0 else est


def test_background_output_keeps_its_place_and_gets_its_own_file(tmp_path, repo_root):
    model = tiny_model(n_src=3, norm_type="cLN")
    x = birdlike(10.0, SR)
    reference = whole(model, x)
    swapping = SwapsBirdsEveryOtherCall(model)
    chunked = separate_array(swapping, x, chunk=4 * SR, overlap=SR)
    assert swapping.calls >= 3
    assert np.abs(chunked - reference).max() <= 1e-4 * np.abs(reference).max()

    # An experiment trained with `training.targets: background` (its conf in the package).
    exp = tmp_path / "exp"
    save_experiment(exp, model, repo_root)
    package = torch.load(exp / "best_model.pth", map_location="cpu", weights_only=True)
    conf = read_conf(repo_root / "conf.yml")
    conf["training"].update(targets="background", dynamic_mixing=True)
    package["infos"]["training_config"] = conf
    torch.save(package, exp / "best_model.pth")
    sf.write(tmp_path / "field.wav", x, SR)
    written = separate_files(exp, [tmp_path / "field.wav"], tmp_path / "out", chunk_s=4.0,
                             overlap_s=1.0, device="cpu")
    assert [p.name for p in written] == ["field_s1.wav", "field_s2.wav", "field_background.wav"]
    background, _ = sf.read(str(written[2]), dtype="float32")
    np.testing.assert_allclose(background, reference[2], atol=1e-4 * np.abs(reference).max())
