"""run.sh's command line: only its declared options and the conf keys (read by utils/config.py,
a preset's from its base) are accepted, stage numbers are checked, and a relative --conf is
found from the caller's directory."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from utils.config import read_conf


def run_sh(repo_root: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(repo_root / "run.sh"), "--python", sys.executable, *args],
                          cwd=cwd or repo_root, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--PATH", "/x"], "unknown option --PATH"),
    (["--no_such_key", "1"], "unknown option --no_such_key"),
    (["--stage", "abc", "--stop_stage", "0"], "--stage abc: expected a stage number, 0 to 5"),
    (["--stage", "abc"], "--stage abc: expected a stage number, 0 to 5"),
    (["--stage", "1", "--stop_stage", "x"], "--stop_stage x: expected a stage number"),
    (["--stage", "3", "--stop_stage", "1"], "--stage 3 is after --stop_stage 1: no stage to run"),
    (["--conf", "no_such.yml"], "configuration file not found"),
])
def test_bad_arguments_are_refused_before_any_stage(repo_root, tmp_path, args, message):
    # Stage 4 on an empty experiment root fails at once should the arguments get through.
    out = run_sh(repo_root, "--stage", "4", "--stop_stage", "4", "--exp_root", str(tmp_path), *args)
    assert out.returncode != 0 and message in out.stderr, out.stdout + out.stderr
    assert "Stage" not in out.stdout


def test_help_needs_no_python(repo_root):
    out = subprocess.run([str(repo_root / "run.sh"), "--python", "/no/such/python", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--stop_stage N" in out.stdout, out.stderr


def trained_conf(out: subprocess.CompletedProcess, exp_dir: Path) -> dict:
    """The resolved conf stage 3 wrote before it found no data."""
    assert out.returncode != 0 and "Stage 3" in out.stdout, out.stdout + out.stderr
    return read_conf(exp_dir / "conf.yml")


@pytest.mark.parametrize("absolute_base", [False, True])
def test_relative_conf_is_found_from_the_callers_directory(repo_root, tmp_path, absolute_base):
    presets = tmp_path / "presets"
    presets.mkdir()
    (tmp_path / "conf.yml").write_text((repo_root / "conf.yml").read_text())
    base = tmp_path / "conf.yml" if absolute_base else "../conf.yml"
    (presets / "small.yml").write_text(f"base: {base}\nmodel:\n  n_filters: 24\n")
    out = run_sh(repo_root, "--conf", "presets/small.yml", "--stage", "3", "--stop_stage", "3",
                 "--data_dir", str(tmp_path / "data"), "--exp_root", str(tmp_path / "exp"),
                 "--tag", "t", "--bn_chan", "8", cwd=tmp_path)
    conf = trained_conf(out, tmp_path / "exp" / "t")
    assert conf["model"]["n_filters"] == 24 and conf["model"]["bn_chan"] == 8


def test_absolute_base_is_not_looked_for_next_to_the_preset(repo_root, tmp_path):
    preset = tmp_path / "small.yml"
    preset.write_text(f"base: {repo_root / 'conf.yml'}\nmodel:\n  n_filters: 24\n")
    out = run_sh(repo_root, "--conf", str(preset), "--stage", "3", "--stop_stage", "3",
                 "--data_dir", str(tmp_path / "data"), "--exp_root", str(tmp_path / "exp"),
                 "--tag", "t", "--hid_chan", "12")
    conf = trained_conf(out, tmp_path / "exp" / "t")
    assert conf["model"]["n_filters"] == 24 and conf["model"]["hid_chan"] == 12
