"""YAML configuration with `_base_` inheritance, dotted overrides and validation.

Every key a configuration may set is declared, with its default, in
`configs/base.yaml` (the schema). An experiment file names its parents with
`_base_` (one path or a list, relative to the file) and overrides only what
differs. Command-line overrides are `a.b.c=value` strings whose values are
parsed as YAML. A key that the schema does not declare is an error naming the
key, the file (or override) it came from and the closest valid keys, so a typo
never silently falls back to a default.

A mapping declared in the schema as an empty mapping (`{}`) is free-form: any
keys may be set beneath it.

Once resolved, every value is checked against its range and the relations
between keys (`configs/rules.py`): a learning rate of 0 or a caption length
of 2 is a ConfigError naming the key, the value, the file or override that set
it and what is allowed, never a silently useless run.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from configs.rules import RELATIONS, RULES
from utils.config_checks import config_violations
from utils.errors import UserInputError

BASE_KEY = "_base_"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCHEMA = REPO_ROOT / "configs" / "base.yaml"

__all__ = ["Config", "ConfigError", "load_config", "save_config", "apply_overrides", "check_config",
           "DEFAULT_SCHEMA"]


class ConfigError(UserInputError, ValueError):
    """A configuration file or override is invalid."""


class Config(dict):
    """A dict with attribute access, recursively (EasyDict-like).

    Missing attributes raise AttributeError naming the closest existing keys.
    """

    def __init__(self, data: dict | None = None, **kwargs: Any) -> None:
        super().__init__()
        for key, value in dict(data or {}, **kwargs).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, _wrap(value))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            hint = _suggest(name, self.keys())
            raise AttributeError(f"config has no key {name!r}{hint}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    def __deepcopy__(self, memo: dict) -> Config:
        return Config(copy.deepcopy(self.to_dict(), memo))

    def to_dict(self) -> dict:
        """Plain nested dicts and lists (for YAML/JSON dumping)."""
        return {k: _unwrap(v) for k, v in self.items()}

    def get_path(self, dotted: str) -> Any:
        """Value at a dotted path such as ``"solver.lr"``."""
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node


def _wrap(value: Any) -> Any:
    if isinstance(value, Config):
        return value
    if isinstance(value, dict):
        return Config(value)
    if isinstance(value, (list, tuple)):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def _suggest(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _all_paths(tree: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict) and value:
            paths.extend(_all_paths(value, path + "."))
    return paths


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a YAML text file (byte {err.start} is not UTF-8 text); "
                          "give a config .yaml file") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse YAML in {path}: {_yaml_problem(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


_UNKNOWN_TAG = re.compile(r"constructor for the tag '([^']*)'")


def _yaml_problem(exc: yaml.YAMLError, *, lines: bool = True) -> str:
    """PyYAML's error as one clause: where (line and column) and what, without its source excerpt.

    Args:
        exc: The parser's error.
        lines: Name the line (off for a one-line override value, where only the column helps).
    """
    if isinstance(exc, yaml.reader.ReaderError):
        return (f"character {chr(exc.character)!r} at position {exc.position} is not allowed in YAML "
                f"({exc.reason})")
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

    def where(mark: yaml.Mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}" if lines else f"column {mark.column + 1}"

    problem = exc.problem or "invalid YAML"
    tag = _UNKNOWN_TAG.search(problem)
    if tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        problem = f"the tag {shown!r} is not allowed (a config holds plain values only)"
    elif "'\\t'" in problem:
        problem += " (YAML is indented with spaces, not tabs)"
    text = f"{where(exc.problem_mark)}: {problem}"
    # Where the construct that is left open began ("while parsing a flow sequence at line 2").
    if exc.context and exc.context_mark is not None and where(exc.context_mark) != where(exc.problem_mark):
        text += f" ({exc.context} at {where(exc.context_mark)})"
    return text


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Make `value` the type of the schema default, or explain why it cannot be.

    YAML 1.1 reads ``1e-5`` as a string, so numbers given without a dot are
    converted when the schema expects a float.
    """
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _unknown_key_hint(path: str, root: dict) -> str:
    """Closest valid dotted paths, including same-named keys in other sections."""
    paths = _all_paths(root)
    leaf = path.rsplit(".", 1)[-1]
    same_leaf = [p for p in paths if p.rsplit(".", 1)[-1] == leaf and p != path]
    close = difflib.get_close_matches(path, paths, n=3, cutoff=0.6)
    names = list(dict.fromkeys(same_leaf + close))[:4]
    return f"; did you mean {', '.join(repr(n) for n in names)}?" if names else ""


def _merge(dst: dict, src: dict, schema: dict, source: str, root: dict, prefix: str = "",
           origins: dict[str, str] | None = None) -> None:
    """Merge `src` into `dst` in place, validating keys and types against `schema`.

    `origins` (when given) records `source` as where each leaf key was set.
    """
    for key, value in src.items():
        path = f"{prefix}{key}"
        if key == BASE_KEY:
            raise ConfigError(f"{source}: `{BASE_KEY}` is only allowed at the top level (found at {path})")
        if key not in schema:
            raise ConfigError(f"{source}: unknown config key {path!r}{_unknown_key_hint(path, root)}")
        default = schema[key]
        if isinstance(default, dict) and default:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {path!r} must be a mapping, got {value!r}")
            dst.setdefault(key, {})
            _merge(dst[key], value, default, source, root, path + ".", origins)
            continue
        elif isinstance(default, dict):
            # Free-form mapping: keys are the user's own.
            dst[key] = _deep_update(copy.deepcopy(dst.get(key) or {}), _coerce(value, default, f"{source}: {path}"))
        else:
            dst[key] = _coerce(value, default, f"{source}: {path}")
        if origins is not None:
            origins[path] = source


def _deep_update(dst: dict, src: dict) -> dict:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)
    return dst


def _resolve_file(path: Path, schema: dict, stack: tuple[Path, ...], origins: dict[str, str] | None = None) -> dict:
    """Read one file with its `_base_` chain; returns the merged overrides (not defaults).

    Files are read in order of precedence, so the last source `origins` records for a key is
    the one whose value wins.
    """
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + (path,))
        raise ConfigError(f"circular `{BASE_KEY}` chain: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: `{BASE_KEY}` must be a path or a list of paths")
    merged: dict = {}
    for base in bases:
        base_path = Path(os.path.expanduser(base))
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        _deep_update(merged, _resolve_file(base_path, schema, stack + (path,), origins))
    validated: dict = {}
    _merge(validated, data, schema, str(path), schema, origins=origins)
    return _deep_update(merged, validated)


_SCHEMA_CACHE: dict[Path, dict] = {}


def _load_schema(schema_path: Path) -> dict:
    if schema_path not in _SCHEMA_CACHE:
        data = _read_yaml(schema_path)
        if BASE_KEY in data:
            raise ConfigError(f"{schema_path}: the schema file cannot have `{BASE_KEY}`")
        _SCHEMA_CACHE[schema_path] = data
    return _SCHEMA_CACHE[schema_path]


def apply_overrides(cfg: Config, overrides: Iterable[str], schema: dict | None = None, *,
                    origins: dict[str, str] | None = None) -> Config:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to `cfg` in place.

    Keys and types are checked; ranges are not (one override may need the next one to
    become consistent): call `check_config` on the result.
    """
    schema = schema if schema is not None else _load_schema(DEFAULT_SCHEMA)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        if not dotted:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse the value as YAML: "
                              f"{_yaml_problem(exc, lines=False)}") from exc
        nested: dict = value
        for part in reversed(dotted.split(".")):
            nested = {part: nested}
        update: dict = {}
        _merge(update, nested, schema, f"override {item!r}", schema, origins=origins)
        merged = _deep_update(cfg.to_dict(), update)
        cfg.clear()
        for key, val in merged.items():
            cfg[key] = val
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = (), *,
                schema_path: str | os.PathLike | None = None) -> Config:
    """Load a config file (or only the defaults when `path` is None), then apply overrides.

    Args:
        path: YAML file; its `_base_` chain is resolved relative to each file.
        overrides: ``a.b.c=value`` strings applied last.
        schema_path: the defaults/schema file (default `configs/base.yaml`).

    Returns:
        The fully resolved configuration (defaults + chain + overrides).

    Raises:
        ConfigError: unknown keys, wrong types, values out of range or inconsistent
            with each other, missing files, bad YAML.
    """
    schema = _load_schema(Path(schema_path).resolve() if schema_path else DEFAULT_SCHEMA)
    resolved = copy.deepcopy(schema)
    origins: dict[str, str] = {}
    if path is not None:
        _deep_update(resolved, _resolve_file(Path(path), schema, (), origins))
    cfg = Config(resolved)
    apply_overrides(cfg, overrides, schema, origins=origins)
    check_config(cfg, origins)
    return cfg


def check_config(cfg: Config, origins: dict[str, str] | None = None) -> None:
    """Check every value's range and the relations between keys (`configs/rules.py`).

    Args:
        cfg: A resolved config.
        origins: Dotted key -> file or override that set it, named in the message.

    Raises:
        ConfigError: listing every violation, each with its key, value and allowed range.
    """
    problems = config_violations(cfg, RULES, RELATIONS, origins)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), loadable by `load_config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False, default_flow_style=None)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
