"""Rules for config values and the check that applies them.

A rule table maps a dotted key (``*`` = every key of that mapping) to a `Rule`
(what its value may be); `Relation`s tie several keys together.
`config_violations` returns one readable line per broken rule, naming the key,
the value, where it was set and what is allowed; `utils.config.load_config`
raises them as a ConfigError. The project's own tables are in `configs/rules.py`,
beside the defaults they describe.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Rule", "Relation", "config_violations", "number", "one_of", "list_of", "matches", "POSITIVE_INT",
           "NON_NEGATIVE_INT", "POSITIVE", "NON_NEGATIVE", "PROBABILITY"]

@dataclass(frozen=True)
class Rule:
    """What one value may be.

    Args:
        test: True when a value is allowed.
        allowed: How the error message completes "must be ...".
    """

    test: Callable[[Any], bool]
    allowed: str


@dataclass(frozen=True)
class Relation:
    """A condition on several keys, checked only when each of them passes its own rule.

    Args:
        keys: The dotted keys involved; their values are passed to `holds` in this order.
        holds: True when the values are consistent.
        allowed: The condition in words, for the error message.
    """

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    allowed: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if _is_int(value):
        return True
    return isinstance(value, float) and math.isfinite(value)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, integer: bool = False) -> Rule:
    """A finite number (an integer with `integer`) within optional bounds."""

    def test(value: Any) -> bool:
        if not (_is_int(value) if integer else _is_number(value)):
            return False
        if low is not None and (value <= low if low_open else value < low):
            return False
        return high is None or (value < high if high_open else value <= high)

    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        bounds = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f" {'>' if low_open else '>='} {low}"
    elif high is not None:
        bounds = f" {'<' if high_open else '<='} {high}"
    else:
        bounds = ""
    return Rule(test, kind + bounds)


def one_of(*choices: str) -> Rule:
    """One of the given strings."""
    return Rule(lambda value: value in choices, f"one of {', '.join(repr(c) for c in choices)}")


def list_of(item: Rule, *, length: int | None = None, min_length: int = 0, increasing: bool = False) -> Rule:
    """A list whose every element passes `item`."""

    def test(value: Any) -> bool:
        if not isinstance(value, list) or len(value) < min_length:
            return False
        if length is not None and len(value) != length:
            return False
        if not all(item.test(v) for v in value):
            return False
        return not increasing or all(a < b for a, b in zip(value, value[1:]))

    if length is not None:
        text = f"a list of {length} values"
    else:
        text = "a " + ("non-empty " if min_length else "") + ("strictly increasing " if increasing else "") + "list"
    text += f", each {item.allowed}"
    return Rule(test, text)


def matches(pattern: str, allowed: str) -> Rule:
    """A string matching the regular expression `pattern` in full."""
    return Rule(lambda value: isinstance(value, str) and re.fullmatch(pattern, value) is not None, allowed)


POSITIVE_INT = number(1, integer=True)
NON_NEGATIVE_INT = number(0, integer=True)
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
PROBABILITY = number(0, 1)

def _lookup(cfg: Mapping, dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _expand(cfg: Mapping, pattern: str) -> list[str]:
    """The keys a rule applies to: itself, or every key under `parent.*` that exists."""
    if not pattern.endswith(".*"):
        return [pattern] if _lookup(cfg, pattern)[0] else []
    found, parent = _lookup(cfg, pattern[:-2])
    if not found or not isinstance(parent, Mapping):
        return []
    return [f"{pattern[:-2]}.{key}" for key in parent]


def _show(key: str, value: Any, origins: Mapping[str, str]) -> str:
    origin = origins.get(key)
    return f"{key}={value!r}" + (f" (set in {origin})" if origin else "")


def config_violations(cfg: Mapping, rules: Mapping[str, Rule], relations: Sequence[Relation] = (),
                      origins: Mapping[str, str] | None = None) -> list[str]:
    """One message per value outside its range and per broken relation.

    Args:
        cfg: A resolved config (nested mappings).
        rules: Key -> rule; keys absent from `cfg` are skipped.
        relations: Multi-key conditions.
        origins: Dotted key -> the file or override that set it (named in the messages).
    """
    origins = origins or {}
    problems: list[str] = []
    failed: set[str] = set()
    for pattern, rule in rules.items():
        for key in _expand(cfg, pattern):
            value = _lookup(cfg, key)[1]
            if not rule.test(value):
                failed.add(key)
                problems.append(f"{_show(key, value, origins)}: must be {rule.allowed}")
    for relation in relations:
        found = [_lookup(cfg, key) for key in relation.keys]
        if not all(ok for ok, _ in found) or failed.intersection(relation.keys):
            continue
        values = [value for _, value in found]
        if not relation.holds(*values):
            shown = ", ".join(_show(k, v, origins) for k, v in zip(relation.keys, values))
            problems.append(f"{shown}: {relation.allowed}")
    return problems
