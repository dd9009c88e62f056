import subprocess
import sys

import pytest

from utils.config import ConfError, apply_overrides, read_conf, split_overrides, write_conf


def test_conf_keys_unique_and_overridable(repo_root):
    conf = read_conf(repo_root / "conf.yml")
    out = apply_overrides(conf, split_overrides(["--sample_rate", "16000", "--causal=true",
                                                 "--lr", "1e-4", "--species", "Coereba flaveola"]))
    assert out["clips"]["sample_rate"] == 16000
    assert out["model"]["causal"] is True
    assert out["optim"]["lr"] == pytest.approx(1e-4)
    assert out["download"]["species"] == ["Coereba flaveola"]
    assert conf["clips"]["sample_rate"] == 8000  # original untouched


def test_bad_overrides_are_errors(repo_root):
    conf = read_conf(repo_root / "conf.yml")
    with pytest.raises(ConfError, match="unknown option --no_such_key"):
        apply_overrides(conf, {"no_such_key": "1"})
    with pytest.raises(ConfError, match="expected true or false"):
        apply_overrides(conf, {"causal": "maybe"})
    with pytest.raises(ConfError, match="expected int"):
        apply_overrides(conf, {"sample_rate": "fast"})


def test_duplicate_second_level_key_rejected(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("a:\n  x: 1\nb:\n  x: 2\n")
    with pytest.raises(ConfError, match="unique"):
        read_conf(path)


def test_run_sh_help_and_unknown_option(repo_root):
    out = subprocess.run(["./run.sh", "--help"], cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0 and "Stages:" in out.stdout
    out = subprocess.run(["./run.sh", "--no_such_option", "1"], cwd=repo_root,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "unknown option --no_such_option" in out.stderr


def test_preset_is_its_base_with_the_values_it_sets(repo_root, tmp_path):
    base, preset = read_conf(repo_root / "conf.yml"), read_conf(repo_root / "conf_cpu.yml")
    # Same sections and keys in the same order (run.sh derives tags in that order).
    assert [(s, list(v)) for s, v in preset.items()] == [(s, list(v)) for s, v in base.items()]
    assert preset["model"]["hid_chan"] < base["model"]["hid_chan"]
    assert preset["optim"] == base["optim"]          # not set by the preset: the base's
    # A resolved preset is a complete conf (what train.py saves in the experiment).
    write_conf(preset, tmp_path / "saved.yml")
    assert read_conf(tmp_path / "saved.yml") == preset


@pytest.mark.parametrize("text, message", [
    ("base: conf.yml\nmodel:\n  hid_chans: 64\n", "key 'hid_chans' is not in section 'model'"),
    ("base: conf.yml\nmodels:\n  hid_chan: 64\n", "section 'models' is not in its base"),
    ("base: conf.yml\ntraining:\n  lr: 0.1\n", "key 'lr' is not in section 'training'"),
    ("base: conf.yml\ntraining:\n  epochs: 2o\n", "bad.yml: epochs: expected int, got '2o'"),
    ("base: conf.yml\nmodel:\n  causal: 1\n", "bad.yml: causal: expected true or false"),
    ("base: missing.yml\nmodel:\n  hid_chan: 64\n", "configuration file not found"),
    ("base: [conf.yml]\n", "'base' must name a conf file"),
    ("base: preset.yml\n", "names a base of its own"),
])
def test_bad_presets_are_errors(repo_root, tmp_path, text, message):
    (tmp_path / "conf.yml").write_text((repo_root / "conf.yml").read_text())
    (tmp_path / "preset.yml").write_text("base: conf.yml\nmodel:\n  hid_chan: 64\n")
    (tmp_path / "bad.yml").write_text(text)
    with pytest.raises(ConfError, match=message):
        read_conf(tmp_path / "bad.yml")


def test_run_sh_takes_the_keys_of_a_presets_base(repo_root, tmp_path):
    # --lr is set in conf.yml only; stage 4 on an empty experiment root then fails at once.
    out = subprocess.run(["./run.sh", "--conf", "conf_cpu.yml", "--lr", "0.002", "--stage", "4",
                          "--stop_stage", "4", "--exp_root", str(tmp_path)],
                         cwd=repo_root, capture_output=True, text=True)
    assert "Stage 4" in out.stdout and "unknown option" not in out.stderr, out.stderr
    out = subprocess.run(["./run.sh", "--conf", "conf_cpu.yml", "--hid_chans", "64"],
                         cwd=repo_root, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown option --hid_chans" in out.stderr


def test_keys_cli_prints_a_presets_keys_from_its_base(repo_root, tmp_path):
    preset = tmp_path / "p.yml"
    preset.write_text(f"base: {repo_root / 'conf.yml'}\nmodel:\n  n_filters: 24\n")
    out = subprocess.run([sys.executable, "-m", "utils.config", "--keys", str(preset)],
                         cwd=repo_root, capture_output=True, text=True)
    keys = out.stdout.split()
    conf = read_conf(repo_root / "conf.yml")
    assert out.returncode == 0 and keys == [k for values in conf.values() for k in values]
    out = subprocess.run([sys.executable, "-m", "utils.config", "--keys", str(tmp_path / "no.yml")],
                         cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 1 and f"configuration file not found: {tmp_path / 'no.yml'}" in out.stderr
