import subprocess

import pytest

from utils.config import ConfError, apply_overrides, read_conf, split_overrides


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
