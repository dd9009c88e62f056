"""Done-markers: a stage writes `<dir>/.done.<name>` holding the parameters it ran with.
A rerun with the same parameters skips the stage; different parameters redo it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from utils.atomic import atomic_write_text


def _marker(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f".done.{name}"


def _canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str, indent=1)


def is_done(out_dir: str | Path, name: str, params: dict[str, Any]) -> bool:
    marker = _marker(out_dir, name)
    return marker.is_file() and marker.read_text() == _canonical(params)


def mark_done(out_dir: str | Path, name: str, params: dict[str, Any]) -> None:
    atomic_write_text(_marker(out_dir, name), _canonical(params))


def clear_done(out_dir: str | Path, name: str) -> None:
    _marker(out_dir, name).unlink(missing_ok=True)
