"""Recipe configuration: a two-level YAML file whose second-level keys are unique, so every
key doubles as a `--key value` command-line override (asteroid's egs convention).

A preset names the file it changes with a top-level `base: FILE` (relative to the preset) and
lists only the keys it sets differently: defaults live in one file.  A base does not name a
base of its own."""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

Conf = dict[str, dict[str, Any]]


class ConfError(ValueError):
    """A configuration file or override is invalid."""


BASE_KEY = "base"
# The defaults file: every conf file's values must have the types of its values.
DEFAULTS_PATH = Path(__file__).resolve().parent.parent / "conf.yml"


class ConfLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but numbers in exponent form without a dot (`1e-3`, `5E+2`) read
    as floats, as YAML 1.2 reads them (PyYAML follows YAML 1.1, where they are strings)."""


ConfLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text with ConfLoader."""
    return yaml.load(text, Loader=ConfLoader)


def _load_sections(path: Path) -> tuple[Conf, str | None]:
    """(sections, the `base` file named in it or None) of one conf file."""
    if not path.is_file():
        raise ConfError(f"configuration file not found: {path}")
    try:
        conf = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(conf, dict):
        raise ConfError(f"{path}: expected two levels (section: {{key: value}})")
    base = conf.pop(BASE_KEY, None)
    if base is not None and not isinstance(base, str):
        raise ConfError(f"{path}: '{BASE_KEY}' must name a conf file, got {base!r}")
    if not all(isinstance(v, dict) for v in conf.values()):
        raise ConfError(f"{path}: expected two levels (section: {{key: value}})")
    return conf, base


def _apply_preset(base: Conf, preset: Conf, path: Path, base_path: Path) -> Conf:
    """`base` with the preset's values; every key the preset sets must be one of the base's,
    and its value of the same type (as for a --key value override)."""
    conf = copy.deepcopy(base)
    for section, values in preset.items():
        if section not in conf:
            raise ConfError(f"{path}: section '{section}' is not in its base {base_path}")
        for key, value in values.items():
            if key not in conf[section]:
                raise ConfError(f"{path}: key '{key}' is not in section '{section}' of its "
                                f"base {base_path}")
            conf[section][key] = _conform(f"{path}: {key}", value, conf[section][key],
                                          str(value))
    return conf


def check_types(conf: Conf, path: Path, defaults_path: Path = DEFAULTS_PATH) -> Conf:
    """`conf` (read from `path`) with each value that is also in the defaults file in the
    type of the default (an int where a float is expected reads as that float); ConfError
    naming the file, the key and the expected type otherwise. Keys the defaults file does not
    have are left as they are; so is everything when there is no defaults file."""
    if not defaults_path.is_file() or path.resolve() == defaults_path.resolve():
        return conf
    defaults, _ = _load_sections(defaults_path)
    typed = copy.deepcopy(conf)
    for section, values in typed.items():
        for key, value in values.items():
            if key not in defaults.get(section, {}):
                continue
            default = defaults[section][key]
            if isinstance(default, str):
                if isinstance(value, (list, dict)):
                    raise ConfError(f"{path}: {key}: expected str, got '{value}'")
                continue  # "devices: 2", "precision: 32": as YAML reads them, as before
            values[key] = _conform(f"{path}: {key}", value, default, str(value))
    return typed


def read_conf(path: str | Path) -> Conf:
    """Read a conf file (a preset: its base with the preset's values) and check its shape:
    sections of scalar/list/dict values, unique second-level keys, and every value in the type
    of the defaults file's (conf.yml beside utils/; check_types)."""
    path = Path(path)
    conf, base = _load_sections(path)
    if base is not None:
        base_path = path.parent / base
        base_conf, base_of_base = _load_sections(base_path)
        if base_of_base is not None:
            raise ConfError(f"{base_path}: the base of {path} names a base of its own; "
                            "a preset's base must be a complete conf file")
        conf = _apply_preset(check_types(base_conf, base_path), conf, path, base_path)
    conf = check_types(conf, path)
    seen: dict[str, str] = {}
    for section, values in conf.items():
        for key in values:
            if key in seen:
                raise ConfError(f"{path}: key '{key}' is in both '{seen[key]}' and '{section}'; "
                                "second-level keys must be unique")
            seen[key] = section
    return conf


def _coerce(key: str, text: str, default: Any) -> Any:
    """Parse an override string as YAML and check it has the type of the default."""
    try:
        value = load_yaml(text) if text != "" else ""
    except yaml.YAMLError as err:
        raise ConfError(f"--{key}: cannot parse '{text}': {err}") from None
    return _conform(f"--{key}", value, default, text)


def _conform(what: str, value: Any, default: Any, text: str) -> Any:
    """`value` (parsed from `text`) in the type of the default it replaces, or ConfError
    naming `what` (an option or a preset's key)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfError(f"{what}: expected true or false, got '{text}'")
        return value
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            raise ConfError(f"{what}: expected a number, got '{text}'") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (int, float)) and isinstance(value, bool):
        raise ConfError(f"{what}: expected a number, got '{text}'")
    if isinstance(default, str) and not isinstance(value, str):
        return str(text)
    if isinstance(default, list) and not isinstance(value, list):
        # "--species 'Coereba flaveola'" means a list of one.
        return [value]
    if type(value) is not type(default) and not (isinstance(default, (int, float)) and
                                                 isinstance(value, (int, float))):
        raise ConfError(f"{what}: expected {type(default).__name__}, got '{text}'")
    return value


def apply_overrides(conf: Conf, overrides: dict[str, str]) -> Conf:
    """Return a copy of `conf` with `--key value` overrides (strings) applied."""
    conf = copy.deepcopy(conf)
    where = {key: section for section, values in conf.items() for key in values}
    for key, text in overrides.items():
        if key not in where:
            raise ConfError(f"unknown option --{key}; known keys: {', '.join(sorted(where))}")
        section = where[key]
        conf[section][key] = _coerce(key, text, conf[section][key])
    return conf


def split_overrides(argv: Sequence[str]) -> dict[str, str]:
    """Turn ['--a', '1', '--b=2'] into {'a': '1', 'b': '2'}; anything else is an error."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfError(f"unexpected argument '{arg}' (expected --key value)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfError(f"option {arg} needs a value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        overrides[key.replace("-", "_")] = value
    return overrides


def parse_stage_args(description: str, argv: Sequence[str] | None = None,
                     add_arguments: Any = None) -> tuple[argparse.Namespace, Conf]:
    """Common command line of every stage script: `--conf PATH`, the script's own arguments
    (added by `add_arguments(parser)`), and `--key value` conf overrides.

    Returns the parsed own arguments and the resolved conf.
    """
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Any second-level key of the conf file is also "
                                            "accepted as --key value.")
    parser.add_argument("--conf", default="conf.yml", help="recipe configuration file")
    if add_arguments is not None:
        add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        conf = apply_overrides(read_conf(args.conf), split_overrides(rest))
    except ConfError as err:
        parser.error(str(err))
    return args, conf


AUTO_SETTINGS = ("auto", "true", "false")


def auto_setting(option: str, value: Any) -> str:
    """A conf value that is auto, true or false, as one of AUTO_SETTINGS (a YAML boolean from an
    older conf, or `--option true` over a default of auto, reads the same)."""
    setting = str(value).lower()
    if setting not in AUTO_SETTINGS:
        raise ConfError(f"{option} {value!r}: expected one of {', '.join(AUTO_SETTINGS)}")
    return setting


def write_conf(conf: Conf, path: str | Path) -> None:
    """Write a resolved conf atomically."""
    from utils.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(conf, sort_keys=False))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m utils.config --keys CONF`: the second-level keys of a conf file (a preset's are
    its base's), one a line: run.sh's conf options."""
    parser = argparse.ArgumentParser(prog="python -m utils.config", description=main.__doc__)
    parser.add_argument("--keys", required=True, metavar="CONF", help="conf file or preset")
    args = parser.parse_args(argv)
    try:
        conf = read_conf(args.keys)
    except (ConfError, OSError, yaml.YAMLError) as err:
        print(f"{args.keys}: {err}" if isinstance(err, yaml.YAMLError) else str(err), file=sys.stderr)
        return 1
    print("\n".join(key for values in conf.values() for key in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
