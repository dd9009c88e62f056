"""Stage 5: table definitions, the sweep (train.py + eval.py per experiment, finished ones
skipped), the markdown tables, receptive field and model size against the model itself, and
the LibriMix / wsj0-2mix data layouts."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from conftest import TINY_MODEL
from local.data_layouts import DataLayoutError, open_split, split_fingerprint
from local.sweep import SweepError, derive_tag, plan_experiments, read_table, run_sweep
from local.tables import (build_tables, conv_tasnet_param_count, count_parameters,
                          receptive_field_samples)
from model import make_model, model_kwargs
from test_train import write_tiny_bsd
from utils.config import read_conf

SR = 8000
LAYOUT_SPLITS = {"librimix": ("train-100", "dev", "test"), "wsj0-2mix": ("tr", "cv", "tt")}


def write_fake_layout(root: Path, kind: str, n_src: int = 2, n_mix: int = 3,
                      with_metadata: bool = True) -> dict[str, np.ndarray]:
    """A tiny LibriMix or wsj0-2mix tree (<root>/wav8k/min/...), mixtures of different lengths;
    LibriMix also gets the metadata csvs it ships (absolute paths, as its scripts write them).
    Returns the sources of every mixture by id."""
    rng = np.random.default_rng(1)
    mix_folder = "mix_clean" if kind == "librimix" else "mix"
    base = root / "wav8k" / "min"
    written = {}
    for split in LAYOUT_SPLITS[kind]:
        rows = []
        for i in range(n_mix):
            mixture_id = f"{split}-{i}_{100 + i}"
            length = 4000 + 800 * i
            sources = (0.1 * rng.standard_normal((n_src, length))).astype(np.float32)
            for folder, audio in [(mix_folder, sources.sum(0))] + [(f"s{k + 1}", s) for k, s in enumerate(sources)]:
                (base / split / folder).mkdir(parents=True, exist_ok=True)
                sf.write(base / split / folder / f"{mixture_id}.wav", audio, SR, subtype="FLOAT")
            written[mixture_id] = sources
            rows.append({"mixture_ID": mixture_id,
                         "mixture_path": str(base / split / mix_folder / f"{mixture_id}.wav"),
                         **{f"source_{k}_path": str(base / split / f"s{k}" / f"{mixture_id}.wav")
                            for k in range(1, n_src + 1)},
                         "length": length})
        if kind == "librimix" and with_metadata:
            (base / "metadata").mkdir(exist_ok=True)
            # Listed in reverse: the metadata, not the folder listing, gives the order.
            pd.DataFrame(rows[::-1]).to_csv(base / "metadata" / f"mixture_{split}_mix_clean.csv",
                                            index=False)
    return written


# ---- data layouts ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["librimix", "wsj0-2mix"])
def test_layout_splits_read_like_bsd(tmp_path, kind):
    root = tmp_path / ("Libri2Mix" if kind == "librimix" else "2speakers")
    sources = write_fake_layout(root, kind)
    # Given the folder holding Libri2Mix/ (or 2speakers/), or the tree itself.
    for data_dir in (tmp_path, root):
        dataset = open_split(data_dir, 2, "tt", SR, return_id=True)
        assert len(dataset) == 3 and dataset.n_src == 2
        ids = [dataset[i][2] for i in range(len(dataset))]
        expected = sorted(i for i in sources if i.startswith(LAYOUT_SPLITS[kind][2]))
        assert ids == (expected[::-1] if kind == "librimix" else expected)
        for i, mixture_id in enumerate(ids):
            mixture, refs, _ = dataset[i]
            np.testing.assert_array_equal(refs.numpy(), sources[mixture_id])
            np.testing.assert_allclose(mixture.numpy(), sources[mixture_id].sum(0), atol=1e-6)
            assert int(dataset.df.iloc[i]["length"]) == refs.shape[1]
    train_windows = open_split(root, 2, "tr", SR, segment_s=0.25)
    assert train_windows[0][1].shape == (2, 2000)
    assert len(split_fingerprint(dataset)) == 64


def test_broken_layouts_fail_with_what_is_wrong(tmp_path):
    def fresh(name: str) -> Path:
        root = tmp_path / name
        write_fake_layout(root, "librimix")
        return root

    base = lambda root: root / "wav8k" / "min" / "test"  # noqa: E731
    root = fresh("no_s2")
    for wav in (base(root) / "s2").iterdir():
        wav.unlink()
    (base(root) / "s2").rmdir()
    with pytest.raises(DataLayoutError, match=r"missing source folder\(s\) s2"):
        open_split(root, 2, "tt", SR)

    root = fresh("one_missing")
    (base(root) / "s2" / "test-1_101.wav").unlink()
    with pytest.raises(DataLayoutError, match=r"test/s2/test-1_101\.wav: missing"):
        open_split(root, 2, "tt", SR)

    root = fresh("length")
    sf.write(base(root) / "s1" / "test-0_100.wav", np.zeros(3000, np.float32), SR, subtype="FLOAT")
    with pytest.raises(DataLayoutError, match=r"test-0_100: mixture and sources differ in length "
                                              r"\(mix_clean 4000, s1 3000, s2 4000 samples\)"):
        open_split(root, 2, "tt", SR)

    root = fresh("rate")
    sf.write(base(root) / "s2" / "test-2_102.wav", np.zeros(11200, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(DataLayoutError, match=r"test-2_102\.wav: 16000 Hz, expected 8000 Hz"):
        open_split(root, 2, "tt", SR)

    root = fresh("other_rate")
    (root / "wav8k").rename(root / "wav16k")
    with pytest.raises(DataLayoutError, match=r"has wav16k, no wav8k for --sample_rate 8000"):
        open_split(root, 2, "tt", SR)

    with pytest.raises(FileNotFoundError, match="run stage 2"):  # neither BSD nor a layout
        open_split(tmp_path / "empty", 2, "tt", SR)


# ---- receptive field and model size ----------------------------------------------------------

def model_conf(repo_root: Path, **model: object) -> dict:
    conf = read_conf(repo_root / "conf.yml")
    conf["model"].update(model)
    return conf


def measured_receptive_field(model: torch.nn.Module, stride: int) -> int:
    """Longest run of output samples that one changed input sample changes (float64)."""
    x = torch.randn(1, 3000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        spans = []
        for position in range(1500, 1500 + stride):  # a sample in as many frames as any
            bumped = x.clone()
            bumped[0, position] += 1.0
            changed = torch.nonzero((model(bumped) != y).any(dim=1)[0]).flatten()
            spans.append(int(changed[-1] - changed[0] + 1))
    return max(spans)


@pytest.mark.parametrize("model", [
    dict(n_filters=8, kernel_size=8, bn_chan=4, hid_chan=8, skip_chan=4, conv_kernel_size=3,
         n_blocks=3, n_repeats=2, norm_type="cLN", causal=False),
    dict(n_filters=8, kernel_size=6, bn_chan=4, hid_chan=8, skip_chan=0, conv_kernel_size=5,
         n_blocks=2, n_repeats=1, norm_type="cLN", causal=True),
    dict(n_filters=8, kernel_size=5, bn_chan=4, hid_chan=8, skip_chan=4, conv_kernel_size=3,
         n_blocks=4, n_repeats=1, norm_type="cLN", causal=True, mask_act="softmax"),
])
def test_receptive_field_formula_matches_the_model(repo_root, model):
    conf = model_conf(repo_root, **model)
    kwargs = model_kwargs(conf)
    net = make_model(conf).double().eval()
    expected = receptive_field_samples(kwargs)
    assert expected < 1000  # well inside the 3000-sample test signal
    assert measured_receptive_field(net, kwargs["stride"]) == expected


@pytest.mark.parametrize("norm_type, causal, reach", [("gLN", False, 2900), ("cgLN", True, 1400)])
def test_utterance_level_norms_reach_beyond_the_convolutions(repo_root, norm_type, causal, reach):
    """Why the tables speak of the convolutions' receptive field: gLN statistics span the
    utterance, cumulative ones (cgLN) everything after a sample (it sits at 1500 of 3000)."""
    conf = model_conf(repo_root, n_filters=8, kernel_size=8, bn_chan=4, hid_chan=8, skip_chan=4,
                      n_blocks=2, n_repeats=1, norm_type=norm_type, causal=causal)
    assert receptive_field_samples(model_kwargs(conf)) == 36
    assert measured_receptive_field(make_model(conf).double().eval(), 4) > reach


@pytest.mark.parametrize("model", [
    {},  # the thesis' best configuration (conf.yml)
    dict(encoder="pinv", mask_act="softmax"),
    dict(encoder="relu", n_src=3, skip_chan=0),
    dict(norm_type="cLN", causal=True, n_blocks=6, n_repeats=2, conv_kernel_size=5),
    dict(norm_type="bN", kernel_size=40, bn_chan=64, hid_chan=256, skip_chan=32),
])
def test_parameter_count_of_the_model_is_the_analytic_one(repo_root, model):
    conf = model_conf(repo_root, **model)
    assert count_parameters(make_model(conf)) == conv_tasnet_param_count(model_kwargs(conf))


def test_analytic_parameter_count_by_hand(repo_root):
    # TINY_MODEL (N=16, L=16, B=8, H=16, Sc=8, P=3, X=2, R=1, 2 sources): filterbanks 2*16*16,
    # bottleneck 2*16 + 16*8 + 8, per block (8*16+16) + 1 + 2*16 + (16*3+16) + 1 + 2*16
    # + (16*8+8) + (16*8+8) = 546, mask 1 + 8*32 + 32.
    conf = model_conf(repo_root, **TINY_MODEL)
    assert conv_tasnet_param_count(model_kwargs(conf)) == 512 + 168 + 2 * 546 + 289 == 2061


# ---- table definitions and tags --------------------------------------------------------------

def test_tags_are_stage_3s_and_shared_by_equal_settings(repo_root):
    conf_path = repo_root / "conf_cpu.yml"
    conf = read_conf(conf_path)
    assert derive_tag(conf_path, conf, {"max_minutes": "2"}, "bsd") == "conf_cpu_max_minutes2"
    # An override equal to the conf's value changes nothing, so it names nothing.
    assert derive_tag(conf_path, conf, {"encoder": "linear", "max_minutes": "2", "mask_act": "softmax"},
                      "librimix") == "conf_cpu_mask_actsoftmax_max_minutes2_librimix"


def test_shipped_definitions_plan_and_build(repo_root, tmp_path):
    """The repo's three definition files: rows as documented, every row's model buildable."""
    conf = read_conf(repo_root / "conf.yml")
    iv2, iv3, iv4 = (read_table(name, conf) for name in ("IV.2", "iv3", "table_IV4"))
    assert [r.label for r in iv2.rows] == ["Pinv + Softmax", "Linear + Softmax", "Linear + Sigmoid",
                                           "ReLU + Softmax", "ReLU + Sigmoid"]
    assert len(iv3.rows) == 15 and "our grid" in iv3.title
    assert {c for r in iv3.rows for c in r.overrides} == {
        "n_filters", "kernel_size", "bn_chan", "hid_chan", "skip_chan", "conv_kernel_size",
        "n_blocks", "n_repeats", "norm_type", "causal"}
    assert all(v == "" for r in (*iv2.rows, *iv3.rows, *iv4.rows) for v in r.thesis.values())
    experiments = plan_experiments([iv2, iv3, iv4], repo_root / "conf.yml", {}, tmp_path,
                                   {"bsd": "data", "librimix": None, "wsj0-2mix": None})
    tags = [e.tag for e in experiments]
    assert len(tags) == len(set(tags)) == 5 + 14 + 3  # IV.3's best and IV.4's BSD-2mix are IV.2's
    assert "conf" in tags and "conf_n_src3" in tags and "conf_librimix" in tags


@pytest.mark.parametrize("csv, message", [
    ("row,label,n_filterz\na,A,8\n", r"n_filterz are neither conf keys"),
    ("row,label,encoder\na,A,linear\na,B,relu\n", r"row id\(s\) a appear more than once"),
    ("row,label,thesis_si_snri\na,A,15.3 dB\n", r"thesis_si_snri '15.3 dB' is not a number"),
    ("row,label,data\na,A,timit\n", r"data 'timit' is not one of"),
    ("row,label,causal,norm_type\na,A,true,gLN\n", r"row a .*--causal true needs a causal normalisation"),
    ("row,label,mask_act\na,A,softmaks\n", r"row a .*softmaks"),
])
def test_bad_definitions_are_refused_before_training(repo_root, tmp_path, csv, message):
    (tmp_path / "table_IV2.csv").write_text("# a comment\n" + csv)
    with pytest.raises(SweepError, match=message):
        run_sweep(["IV2"], repo_root / "conf.yml", {}, tmp_path / "exp", {"bsd": "data"},
                  tables_dir=tmp_path, python="/nonexistent/python")


# ---- the sweep and the tables on tiny experiments ----------------------------------------------

TINY_OVERRIDES = {**{k: str(v) for k, v in TINY_MODEL.items()},
                  "epochs": "1", "batch_size": "2", "segment_s": "0.5", "num_workers": "0",
                  "num_threads": "1", "save_top_k": "1", "accelerator": "cpu", "devices": "1",
                  "n_save_examples": "0"}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, repo_root):
    """Two tiny experiments through the real sweep: BSD-2mix (shared by a Table IV.2 row and
    Table IV.4's Conv-TasNet and IBM rows) and a fake LibriMix; wsj0-2mix is not given."""
    root = tmp_path_factory.mktemp("sweep")
    write_tiny_bsd(root / "data")
    write_fake_layout(root / "Libri2Mix", "librimix")
    tables_dir = root / "tables_def"
    tables_dir.mkdir()
    (tables_dir / "table_IV2.csv").write_text(
        "# title: Tiny IV.2\nrow,label,encoder,mask_act,thesis_si_snri,thesis_sdri,thesis_params_m,thesis_rf_s\n"
        "linear_sigmoid,Linear + Sigmoid,linear,sigmoid,15.1,15.4,0.002,0.034\n")
    (tables_dir / "table_IV4.csv").write_text(
        "row,label,data,method,max_minutes,thesis_si_snri\n"
        "bsd2,BSD-2mix,bsd,convtasnet,,\nbsd2_ibm,BSD-2mix IBM,bsd,ibm,,\n"
        "libri,Libri2Mix,librimix,convtasnet,5,\nlibri_irm,Libri2Mix IRM,librimix,irm,5,\n"
        "wsj,wsj0-2mix,wsj0-2mix,convtasnet,,\n")
    args = dict(conf_path=repo_root / "conf.yml", cli_overrides=TINY_OVERRIDES,
                exp_root=root / "exp", data_dirs={"bsd": root / "data", "librimix": root,
                                                  "wsj0-2mix": None},
                tables_dir=tables_dir)
    experiments = run_sweep(["IV2", "IV4"], **args)
    return root, args, experiments


def test_sweep_trains_and_evaluates_each_experiment_once(swept):
    root, _, experiments = swept
    assert [(e.data, [r.row for r in e.rows]) for e in experiments] == [
        ("bsd", ["linear_sigmoid", "bsd2", "bsd2_ibm"]), ("librimix", ["libri", "libri_irm"]),
        ("wsj0-2mix", ["wsj"])]
    bsd, libri, wsj = experiments
    assert sorted(p.name for p in (root / "exp").iterdir()) == sorted([bsd.tag, libri.tag])
    for experiment in (bsd, libri):
        assert (experiment.exp_dir / "best_model.pth").is_file()
        assert "train.py" in (experiment.exp_dir / "run_command.txt").read_text()
    metrics = json.loads((libri.exp_dir / "eval" / "final_metrics.json").read_text())
    assert metrics["n_utterances"] == 3 and metrics["data"]["csv"].endswith("wav8k/min/test")
    assert not wsj.exp_dir.exists()


def test_rerun_skips_finished_experiments(swept, capsys):
    _, args, experiments = swept
    before = {e.tag: (e.exp_dir / "best_model.pth").stat().st_mtime_ns for e in experiments[:2]}
    # Any training or evaluation would have to start this interpreter, which does not exist.
    run_sweep(["IV2", "IV4"], **args, python="/nonexistent/python")
    log = capsys.readouterr().out
    assert log.count("already trained and evaluated, skipped") == 2
    assert "skipped, no --wsj0_2mix_dir given" in log
    assert before == {e.tag: (e.exp_dir / "best_model.pth").stat().st_mtime_ns for e in experiments[:2]}


def markdown_rows(path: Path) -> dict[str, list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def test_tables_show_scores_sizes_budget_and_missing_rows(swept, tmp_path):
    root, args, experiments = swept
    bsd, libri, _ = experiments
    tables_dir = args["tables_dir"]
    # A row added after the sweep is shown as not run.
    with open(tables_dir / "table_IV2.csv", "a") as f:
        f.write("pinv_softmax,Pinv + Softmax,pinv,softmax,,,,\n")
    iv2, iv4 = build_tables(["IV2", "IV4"], args["conf_path"], args["cli_overrides"],
                            args["exp_root"], args["data_dirs"], tmp_path / "tables", tables_dir)
    assert iv2.name == "table_IV2.md" and iv2.read_text().startswith("# Tiny IV.2")
    rows = markdown_rows(iv2)
    ours = rows["Linear + Sigmoid"]
    bsd_metrics = json.loads((bsd.exp_dir / "eval" / "final_metrics.json").read_text())
    assert ours["SI-SNRi (dB)"] == f"{bsd_metrics['si_sdr_imp']:.2f}"
    assert ours["SDRi (dB)"] == f"{bsd_metrics['sdr_imp']:.2f}"
    assert (ours["thesis SI-SNRi"], ours["thesis RF"], ours["mask"]) == ("15.1", "0.034", "sigmoid")
    size = count_parameters(make_model(bsd.conf))
    assert ours["size (M)"] == f"{size / 1e6:.3f}" and size == 2061
    rf_s = receptive_field_samples(model_kwargs(bsd.conf)) / SR
    # F = 1 + R (P - 1) (2^X - 1) = 7 frames; 7 * 8 + 16 = 72 samples = 0.009 s
    assert ours["RF (s)"] == f"{rf_s:.3f}" == "0.009"
    # The thesis' size is ours rounded as printed; its RF (typed in wrong here) is flagged.
    assert ours["vs thesis"] == "size ok, **RF differs** (0.009 vs 0.034)"
    assert ours["budget"] == "≤1 ep"  # minutes from the TensorBoard logs (no time budget)
    assert re.fullmatch(r"1 ep, 2 steps, \d+\.\d min \(max epochs\)", ours["trained"])
    assert ours["experiment"] == f"`{bsd.tag}`" and ours["eval mixtures"] == "1"
    missing = rows["Pinv + Softmax"]
    assert missing["SI-SNRi (dB)"] == "not run" and missing["size (M)"] == f"{(size - 256) / 1e6:.3f}"

    rows = markdown_rows(iv4)
    ibm = rows["BSD-2mix IBM"]
    assert ibm["SI-SNRi (dB)"] == f"{bsd_metrics['oracle']['ibm']['si_sdr_imp']:.2f}"
    assert ibm["size (M)"] == ibm["budget"] == "—" and ibm["thesis SI-SNRi"] == "n/a"
    libri_metrics = json.loads((libri.exp_dir / "eval" / "final_metrics.json").read_text())
    assert rows["Libri2Mix IRM"]["SDRi (dB)"] == f"{libri_metrics['oracle']['irm']['sdr_imp']:.2f}"
    libri_row = rows["Libri2Mix"]
    assert libri_row["eval mixtures"] == "3" and libri_row["budget"] == "≤1 ep, ≤5 min"
    # minutes from Lightning's Timer, the clock of --max_minutes
    timer = torch.load(libri.exp_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (seconds,) = [v["time_elapsed"]["train"] for k, v in timer.items() if k.startswith("Timer")]
    assert libri_row["trained"] == f"1 ep, 1 steps, {seconds / 60:.1f} min (max epochs)"
    assert rows["wsj0-2mix"]["SI-SNRi (dB)"] == "not run (no --wsj0_2mix_dir)"


def test_tables_follow_the_budget(swept, tmp_path):
    """Another budget is another experiment: not run until the sweep runs it."""
    _, args, _ = swept
    (iv4,) = build_tables(["IV4"], args["conf_path"], {**args["cli_overrides"], "epochs": "2"},
                          args["exp_root"], args["data_dirs"], tmp_path, args["tables_dir"])
    assert markdown_rows(iv4)["BSD-2mix"]["SI-SNRi (dB)"] == "not run"
