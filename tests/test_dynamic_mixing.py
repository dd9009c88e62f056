"""Dynamic mixing (local/dynamic_mixing.py), the learning curve and the budget schedules
(utils/training_callbacks.py) on tiny synthetic clips."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from conftest import TINY_MODEL
from local.bsd_dataset import ResumableLoader
from local.dynamic_mixing import DynamicMixDataset, change_speed
from local.mixtures import BALANCE, ClipPool, MixtureError
from test_train import BATCH, N_TRAIN, SAMPLE_RATE, write_tiny_bsd
from train import make_lr_schedule, make_train_loader, train
from utils.config import ConfError, read_conf
from utils.training_callbacks import schedule_factor

SPECIES = ("Genus alpha", "Genus beta", "Genus gamma")


def write_tiny_clips(data_dir, n_per_species: int = 2, splits=("tr",)) -> pd.DataFrame:
    """clips/clips.csv and clips/wav/*.wav: chirps of 1-2 s, two recordings per species."""
    rng = np.random.default_rng(1)
    wav_dir = data_dir / "clips" / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in splits:
        for s, species in enumerate(SPECIES):
            for r in range(n_per_species):
                n = int(rng.integers(SAMPLE_RATE, 2 * SAMPLE_RATE))
                t = np.arange(n) / SAMPLE_RATE
                audio = (0.2 * np.sin(2 * np.pi * (800 + 700 * s + 200 * t) * t)
                         + 0.01 * rng.standard_normal(n)).astype(np.float32)
                clip_id = f"XC{s}{r}{split}_000000000_{n:09d}"
                sf.write(wav_dir / f"{clip_id}.wav", audio, SAMPLE_RATE, subtype="FLOAT")
                rows.append({"clip_id": clip_id, "recording_id": f"{s}{r}{split}",
                             "species": species, "english_name": species, "split": split,
                             "start_s": 0.0, "end_s": n / SAMPLE_RATE, "n_samples": n,
                             "sample_rate": SAMPLE_RATE, "active_fraction": 1.0,
                             "path": f"wav/{clip_id}.wav"})
    clips = pd.DataFrame(rows)
    clips.to_csv(data_dir / "clips" / "clips.csv", index=False)
    return clips


@pytest.fixture(scope="module")
def dm_data(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("dm_data")
    write_tiny_bsd(data_dir)
    write_tiny_clips(data_dir, splits=("tr", "tt"))
    return data_dir


@pytest.fixture
def dm_conf(repo_root):
    conf = read_conf(repo_root / "conf.yml")
    conf["model"].update(TINY_MODEL)
    conf["training"].update(epochs=1, batch_size=BATCH, num_workers=0, segment_s=1.0,
                            save_top_k=1, checkpoint_every_n_steps=1, max_minutes=0,
                            accelerator="cpu", devices=1, dynamic_mixing=True)
    return conf


def test_mixtures_are_drawn_from_seed_epoch_and_index(dm_data, dm_conf):
    clips = pd.read_csv(dm_data / "clips" / "clips.csv")
    species_of = dict(zip(clips["clip_id"], clips["species"]))
    dataset = DynamicMixDataset(dm_data, 2, dm_conf, segment_s=1.0, n_items=8,
                                min_source_share=0.2, return_id=True)
    assert len(dataset) == 8 and len(dataset.pool) == 6       # the tr clips only
    first = [dataset[(i, (17, 0))] for i in range(8)]
    for mixture, sources, mixture_id in first:
        assert mixture.shape == (SAMPLE_RATE,) and sources.shape == (2, SAMPLE_RATE)
        # The references add up to the mixture exactly, and it is protected from clipping.
        assert torch.equal(mixture, sources.sum(0))
        assert float(mixture.abs().max()) <= dm_conf["mixtures"]["max_peak"]
        assert (sources.square().sum(1) > 0).all()
        clip_ids = mixture_id.removeprefix("dm:").split("+")
        assert len({species_of[c] for c in clip_ids}) == 2     # two different species
    again = dataset[(3, (17, 0))]
    assert torch.equal(again[0], first[3][0]) and again[2] == first[3][2]
    # Another epoch, another seed: other mixtures.
    assert not torch.equal(dataset[(3, (17, 1))][0], first[3][0])
    assert not torch.equal(dataset[(3, (18, 0))][0], first[3][0])


@pytest.mark.parametrize("speed_perturb", [(), (0.9, 1.0, 1.1)])
def test_a_resumed_loader_goes_on_with_the_same_mixtures(dm_data, dm_conf, speed_perturb):
    def loader():
        dataset = DynamicMixDataset(dm_data, 2, dm_conf, segment_s=1.0, n_items=8,
                                    return_id=True, speed_perturb=speed_perturb)
        return ResumableLoader(dataset, batch_size=2, seed=17)

    whole = list(loader())
    interrupted = loader()
    batches = iter(interrupted)
    done = [next(batches) for _ in range(2)]
    state = interrupted.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    went_on = done + list(resumed)
    assert [b[2] for b in went_on] == [b[2] for b in whole]
    # The same audio too (speeds, offsets and levels are drawn from the same key).
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(went_on, whole))
    assert len(set(map(tuple, (b[2] for b in whole)))) == len(whole)


def dominant_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1 / SAMPLE_RATE)[spectrum.argmax()])


def test_change_speed_resamples_to_a_faster_higher_clip():
    n = SAMPLE_RATE * 2
    tone = np.sin(2 * np.pi * 1000 * np.arange(n) / SAMPLE_RATE).astype(np.float32)
    assert change_speed(tone, 1.0) is tone
    for factor in (0.9, 1.1, 1.25):
        faster = change_speed(tone, factor)
        assert faster.dtype == np.float32
        assert abs(faster.size - n / factor) <= 1
        assert dominant_hz(faster) == pytest.approx(1000 * factor, abs=2)
    for factor in (0.0, 0.4, 2.5):
        with pytest.raises(ValueError, match=f"speed factor {factor}"):
            change_speed(tone, factor)


def test_speed_perturbed_mixtures(dm_data, dm_conf):
    plain = DynamicMixDataset(dm_data, 2, dm_conf, segment_s=1.0, n_items=8,
                              min_source_share=0.2, return_id=True)
    perturbed = DynamicMixDataset(dm_data, 2, dm_conf, segment_s=1.0, n_items=8,
                                  min_source_share=0.2, return_id=True,
                                  speed_perturb=[0.8, 1.25])
    changed = 0
    for i in range(8):
        mixture, sources, _ = perturbed[(i, (17, 0))]
        assert torch.equal(mixture, sources.sum(0))       # still the sum of its references
        assert (sources.square().sum(1) > 0).all()
        again = perturbed[(i, (17, 0))]
        assert torch.equal(again[0], mixture) and torch.equal(again[1], sources)
        changed += not torch.equal(plain[(i, (17, 0))][0], mixture)
    assert changed == 8     # no factor is 1: every mixture differs from the recorded clips'
    with pytest.raises(ValueError, match="speed factor 3.0"):
        DynamicMixDataset(dm_data, 2, dm_conf, segment_s=1.0, n_items=4, speed_perturb=[3.0])


def test_speed_perturbation_needs_dynamic_mixing(dm_data, dm_conf):
    dm_conf["training"].update(dynamic_mixing=False, speed_perturb=[0.9, 1.1])
    with pytest.raises(ConfError, match="--speed_perturb needs --dynamic_mixing true"):
        make_train_loader(dm_conf, dm_data)
    dm_conf["training"]["dynamic_mixing"] = True
    loader = make_train_loader(dm_conf, dm_data)
    assert loader.dataset.speed_factors == [0.9, 1.1]


def skewed_pool(dm_conf, balance: str) -> ClipPool:
    """Six recordings of three species; recording "big" (species A) gave 20 clips, the others one."""
    rows = [("big", "A")] * 20 + [("a2", "A"), ("b1", "B"), ("b2", "B"), ("c1", "C"), ("c2", "C")]
    clips = pd.DataFrame({"clip_id": [f"c{i:02d}" for i in range(len(rows))],
                          "recording_id": [r for r, _ in rows], "species": [s for _, s in rows],
                          "split": "tr"})
    audio = {c: np.ones(8, dtype=np.float32) for c in clips["clip_id"]}
    return ClipPool(clips, "tr", audio, 2, dm_conf, balance=balance)


@pytest.mark.parametrize("balance", BALANCE)
def test_balanced_draws_give_every_recording_or_species_its_share(dm_conf, balance):
    pool, rng = skewed_pool(dm_conf, balance), np.random.default_rng(0)
    picks = [pool.pick(rng) for _ in range(3000)]
    for chosen in picks:       # still two species and two recordings in every mixture
        assert len({pool.species[i] for i in chosen}) == len({pool.recordings[i] for i in chosen}) == 2
    first = pd.Series([pool.recordings[c[0]] for c in picks]).value_counts(normalize=True)
    first_species = pd.Series([pool.species[c[0]] for c in picks]).value_counts(normalize=True)
    if balance == "clip":          # uniform over clips: the big recording holds 20 of 25
        assert first["big"] == pytest.approx(0.8, abs=0.03)
    elif balance == "recording":   # uniform over the six recordings
        assert first.to_numpy() == pytest.approx(np.full(6, 1 / 6), abs=0.03)
    else:                          # uniform over the three species; within A, by clips
        assert first_species.to_numpy() == pytest.approx(np.full(3, 1 / 3), abs=0.03)
        assert first["big"] == pytest.approx(20 / 21 / 3, abs=0.03)
    again = skewed_pool(dm_conf, balance)
    assert again.pick(np.random.default_rng(0)) == picks[0]


def test_balance_is_checked(dm_data, dm_conf):
    with pytest.raises(MixtureError, match="balance 'speaker'"):
        skewed_pool(dm_conf, "speaker")
    dm_conf["training"]["dm_balance"] = "speaker"
    with pytest.raises(ConfError, match="--dm_balance 'speaker'"):
        make_train_loader(dm_conf, dm_data)
    dm_conf["training"].update(dm_balance="recording", dynamic_mixing=False)
    with pytest.raises(ConfError, match="--dm_balance needs --dynamic_mixing true"):
        make_train_loader(dm_conf, dm_data)
    dm_conf["training"]["dynamic_mixing"] = True
    loader = make_train_loader(dm_conf, dm_data)
    assert loader.dataset.pool.balance == "recording"
    # Drawn from the seed, the epoch and the index, as the uniform draw is.
    first, again = loader.dataset[(3, (17, 1))], loader.dataset[(3, (17, 1))]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_too_few_species_or_no_clips_are_clear_errors(tmp_path, dm_conf):
    with pytest.raises(FileNotFoundError, match="run stage 1"):
        DynamicMixDataset(tmp_path, 2, dm_conf, segment_s=1.0, n_items=4)
    write_tiny_clips(tmp_path)
    with pytest.raises(MixtureError, match="3 species"):
        DynamicMixDataset(tmp_path, 4, dm_conf, segment_s=1.0, n_items=4)


def test_training_with_dynamic_mixing_writes_and_resumes_the_learning_curve(dm_data, dm_conf,
                                                                           tmp_path):
    exp_dir = tmp_path / "exp"
    dm_conf["optim"].update(lr_schedule="cosine", warmup_steps=1)
    train(dm_conf, dm_data, exp_dir)
    curve = pd.read_csv(exp_dir / "learning_curve.csv")
    assert list(curve["epoch"]) == [0] and list(curve["step"]) == [N_TRAIN // BATCH]
    assert np.isfinite(curve["val_si_snr_db"]).all() and (curve["train_minutes"] > 0).all()
    assert (exp_dir / "learning_curve.png").stat().st_size > 0
    dm_conf["training"]["epochs"] = 2
    train(dm_conf, dm_data, exp_dir)     # resumes: the curve goes on, its clock too
    curve = pd.read_csv(exp_dir / "learning_curve.csv")
    assert list(curve["epoch"]) == [0, 1] and curve["train_minutes"].is_monotonic_increasing
    # The cosine of the 2-epoch budget: lr ends near 0 at its last step.
    assert curve["lr"].iloc[-1] < 0.5 * dm_conf["optim"]["lr"]


def test_schedule_factors():
    assert schedule_factor("constant", 0.3, step=0, warmup_steps=4, final_fraction=0) == 0.25
    assert schedule_factor("constant", 0.9, step=10, warmup_steps=4, final_fraction=0) == 1.0
    assert schedule_factor("cosine", 0.0, step=10, warmup_steps=0, final_fraction=0.1) == 1.0
    assert schedule_factor("cosine", 0.5, step=10, warmup_steps=0, final_fraction=0.0) == \
        pytest.approx(0.5)
    assert schedule_factor("cosine", 1.0, step=10, warmup_steps=0, final_fraction=0.1) == \
        pytest.approx(0.1)
    assert schedule_factor("cosine", 3.0, step=10, warmup_steps=0, final_fraction=0.0) == \
        pytest.approx(0.0)
    assert math.isclose(schedule_factor("cosine", 0.5, step=1, warmup_steps=4,
                                        final_fraction=0.0), 0.25)


def test_unknown_schedule_is_refused(dm_conf):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    dm_conf["optim"]["lr_schedule"] = "step"
    with pytest.raises(ConfError, match="lr_schedule 'step'"):
        make_lr_schedule(dm_conf, optimizer)
    dm_conf["optim"].update(lr_schedule="cosine", lr_final_fraction=2.0)
    with pytest.raises(ConfError, match="lr_final_fraction"):
        make_lr_schedule(dm_conf, optimizer)


def test_expected_time_is_printed_with_the_cpu_hint(monkeypatch, capsys):
    from types import SimpleNamespace

    import utils.training_callbacks as callbacks

    trainer = SimpleNamespace(is_global_zero=True, global_step=0, max_epochs=10,
                              num_training_batches=653)
    # A stand-in clock that advances two seconds a step.
    monkeypatch.setattr(callbacks, "time",
                        SimpleNamespace(monotonic=lambda: 2.0 * trainer.global_step))
    module = SimpleNamespace(device=torch.device("cpu"))

    def run(max_minutes: float) -> str:
        expected = callbacks.ExpectedTime(max_minutes, "use the preset", after_steps=3)
        for step in range(1, 6):
            trainer.global_step = step
            expected.on_train_batch_end(trainer, module, None, None, step - 1)
        return capsys.readouterr().out

    out = run(0)
    assert out.count("train:") == 1 and "2.00 s per step" in out
    assert f"remaining {6530 - 4} steps" in out and "3.6 h" in out and "use the preset" in out
    # A 30-minute budget: no hint, the budget is said.
    out = run(30)
    assert "after 30 min" in out and "use the preset" not in out


def write_clean_clips(data_dir) -> None:
    """Denoised versions of write_tiny_clips' clips (the chirp without its noise, scaled)."""
    clips_csv = data_dir / "clips" / "clips.csv"
    clips = pd.read_csv(clips_csv)
    (data_dir / "clips" / "clean").mkdir(exist_ok=True)
    for row in clips.itertuples():
        audio, sr = sf.read(data_dir / "clips" / row.path, dtype="float32")
        sf.write(data_dir / "clips" / "clean" / f"{row.clip_id}.wav", 0.9 * audio, sr,
                 subtype="FLOAT")
    clips["clean_path"] = "clean/" + clips["clip_id"] + ".wav"
    clips.to_csv(clips_csv, index=False)


def test_denoised_and_background_targets(tmp_path, dm_conf):
    write_tiny_clips(tmp_path)
    with pytest.raises(MixtureError, match="needs stage 1's denoised clips"):
        DynamicMixDataset(tmp_path, 2, dm_conf, segment_s=1.0, n_items=4, targets="denoised")
    write_clean_clips(tmp_path)
    kinds = {t: DynamicMixDataset(tmp_path, 2, dm_conf, segment_s=1.0, n_items=4,
                                  min_source_share=0.2, targets=t)
             for t in ("recorded", "denoised", "background")}
    for i in range(4):
        key = (i, (17, 0))
        (mix_r, rec), (mix_d, den), (mix_b, bg) = (kinds[t][key] for t in kinds)
        # The same mixture (the recorded sum) and window whatever the targets.
        assert torch.equal(mix_r, mix_d) and torch.equal(mix_r, mix_b)
        assert torch.equal(mix_r, rec.sum(0))
        assert den.shape == (2, SAMPLE_RATE) and bg.shape == (3, SAMPLE_RATE)
        assert torch.allclose(den, 0.9 * rec, atol=1e-6)
        assert torch.equal(bg[:2], den)
        # Speed-perturbed: each denoised clip at its recorded clip's speed.
        _, rec_sp = DynamicMixDataset(tmp_path, 2, dm_conf, segment_s=1.0, n_items=4,
                                      min_source_share=0.2, speed_perturb=[0.8, 1.25])[key]
        _, den_sp = DynamicMixDataset(tmp_path, 2, dm_conf, segment_s=1.0, n_items=4,
                                      min_source_share=0.2, targets="denoised",
                                      speed_perturb=[0.8, 1.25])[key]
        assert torch.allclose(den_sp, 0.9 * rec_sp, atol=1e-6)
        assert torch.allclose(bg.sum(0), mix_b, atol=1e-6)       # the references add up
        assert torch.allclose(bg[2], 0.1 * rec.sum(0), atol=1e-6)
        again = kinds["background"][key]
        assert torch.equal(again[1], bg)                          # deterministic


def test_targets_conf_and_model_outputs(dm_conf):
    from local.targets import BirdsAndBackgroundLoss, check_targets, n_outputs
    from model import make_model
    dm_conf["training"]["targets"] = "clean"
    with pytest.raises(ConfError, match="--targets 'clean'"):
        check_targets(dm_conf)
    dm_conf["training"].update(targets="background", dynamic_mixing=False)
    with pytest.raises(ConfError, match="needs --dynamic_mixing true"):
        check_targets(dm_conf)
    dm_conf["training"]["dynamic_mixing"] = True
    assert n_outputs(dm_conf) == 3 and dm_conf["model"]["n_src"] == 2
    model = make_model(dm_conf)
    est = model(torch.randn(2, SAMPLE_RATE // 4))
    assert est.shape[1] == 3
    refs = torch.randn(2, 3, SAMPLE_RATE // 4)
    loss = BirdsAndBackgroundLoss()
    swapped = refs[:, [1, 0, 2]]
    assert torch.allclose(loss(refs, swapped), loss(refs, refs))   # birds in any order
    assert loss(refs, refs[:, [2, 1, 0]]) > loss(refs, refs)      # background in place


def test_training_with_a_background_output_end_to_end(tmp_path, dm_conf):
    """targets background: 3 outputs trained on dynamic mixtures, validated on fixed draws
    from the cv clips; the saved model says its last output is the background."""
    from model import load_best_model
    data_dir = tmp_path / "data"
    write_tiny_bsd(data_dir)
    write_tiny_clips(data_dir, splits=("tr", "cv"))
    write_clean_clips(data_dir)
    dm_conf["training"]["targets"] = "background"
    best = train(dm_conf, data_dir, tmp_path / "exp")
    model = load_best_model(best.parent)
    assert model.background_output and model.get_model_args()["n_src"] == 3
    curve = pd.read_csv(tmp_path / "exp" / "learning_curve.csv")
    assert np.isfinite(curve["val_si_snr_db"]).all()
