import subprocess
import sys

import pytest
import yaml

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
    # What the preset does not set is the base's.
    raw = yaml.safe_load((repo_root / "conf_cpu.yml").read_text())
    for section, values in base.items():
        for key, value in values.items():
            if key not in raw.get(section, {}):
                assert preset[section][key] == value, key
    assert preset["optim"]["lr"] == base["optim"]["lr"]
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


def full_conf_with(repo_root, tmp_path, name: str, **changes) -> "Path":
    """A complete conf file (conf.yml's text) with some `key: value` lines replaced."""
    lines = []
    for line in (repo_root / "conf.yml").read_text().splitlines():
        key = line.strip().split(":", 1)[0]
        if line.startswith("  ") and key in changes:
            line = f"  {key}: {changes[key]}"
        lines.append(line)
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("changes, message", [
    (dict(causal='"no"'), "full.yml: causal: expected true or false, got 'no'"),
    (dict(epochs="ten"), "full.yml: epochs: expected int, got 'ten'"),
    (dict(epochs="true"), "full.yml: epochs: expected a number, got 'True'"),
    (dict(query="[a, b]"), "full.yml: query: expected str, got"),
    (dict(lr="fast"), "full.yml: lr: expected a number, got 'fast'"),
    (dict(early_stop="1"), "full.yml: early_stop: expected true or false, got '1'"),
    (dict(sample_rate="[8000]"), "full.yml: sample_rate: expected int, got '\\[8000\\]'"),
])
def test_full_conf_files_are_type_checked_against_conf_yml(repo_root, tmp_path, changes,
                                                           message):
    """Only presets and --key overrides were checked: `causal: "no"` trained a causal model,
    `lr: "1e-3"` crashed in torch's Adam, `epochs: ten` was a bare AssertionError."""
    with pytest.raises(ConfError, match=message):
        read_conf(full_conf_with(repo_root, tmp_path, "full.yml", **changes))


def test_exponent_numbers_read_as_floats_and_types_follow_conf_yml(repo_root, tmp_path):
    conf = read_conf(full_conf_with(repo_root, tmp_path, "full.yml", lr="1e-3",
                                    weight_decay='"1E-5"', clip_min_s="2"))
    assert conf["optim"]["lr"] == 1e-3 and type(conf["optim"]["lr"]) is float
    assert conf["optim"]["weight_decay"] == 1e-5
    assert type(conf["clips"]["clip_min_s"]) is float
    # A preset's base that is not conf.yml is checked too, and names itself.
    full_conf_with(repo_root, tmp_path, "other_base.yml", n_blocks="eight")
    (tmp_path / "preset.yml").write_text("base: other_base.yml\noptim:\n  lr: 5e-4\n")
    with pytest.raises(ConfError, match="other_base.yml: n_blocks: expected int"):
        read_conf(tmp_path / "preset.yml")
    (tmp_path / "preset.yml").write_text("base: full.yml\noptim:\n  lr: 5e-4\n")
    assert read_conf(tmp_path / "preset.yml")["optim"]["lr"] == 5e-4
    assert apply_overrides(conf, {"lr": "2e-4"})["optim"]["lr"] == 2e-4
