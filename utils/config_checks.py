"""Ranges and relations of config values, checked once a config is resolved.

`RULES` maps a dotted key (``*`` = every key of that mapping) to what its value
may be; `RELATIONS` ties several keys together. `config_violations` returns
one readable line per broken rule, naming the key, the value, where it was set
and what is allowed; `utils.config.load_config` raises them as a ConfigError.

Fixed sets of modes (sampler, masking, GASS options, warm-up, precision, task)
are listed here, so a typo fails when the config loads, before any data or
weights are read; tests/test_config_checks.py checks each list against the code
that reads the value. Names looked up in a registry that code can extend
(datasets, CLIP presets, loss names, optimizers, schedulers) are left to the
registry, whose unknown-name error is a ConfigError naming the key, the value
and the valid names.

Keys that only the model can bound (``gass.num_layers`` against the text
depth of the chosen backbone) are checked by `gass_depth_violation`, which
the model builder calls with the depth it built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Rule", "Relation", "RULES", "RELATIONS", "MIN_TEXT_LENGTH", "MAX_TEXT_LENGTH",
           "config_violations", "gass_depth_violation"]

#: Shortest caption context worth training on: SOT, EOT and a few words.
MIN_TEXT_LENGTH = 8
#: CLIP's text context (positional embeddings of every preset and OpenAI checkpoint).
MAX_TEXT_LENGTH = 77
#: numpy seeds must fit in 32 bits; half of that leaves room for the per-rank offset.
MAX_SEED = 2**31 - 1


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

RULES: dict[str, Rule] = {
    "task": one_of("pretrain", "finetune"),
    "device": matches(r"auto|cpu|cuda(:\d+)?", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "precision": one_of("fp32", "bf16", "fp16"),
    "seed": number(0, MAX_SEED, integer=True),
    "log_period": POSITIVE_INT,
    "num_threads": NON_NEGATIVE_INT,
    "model.clip.image_size": list_of(POSITIVE_INT, length=2),
    "model.clip.stride_size": POSITIVE_INT,
    "model.temperature": POSITIVE,
    "model.cmt_depth": POSITIVE_INT,
    "model.loss_weights.*": NON_NEGATIVE,
    "gass.scoring": one_of("gass", "css"),
    "gass.num_layers": POSITIVE_INT,
    "gass.scales": list_of(POSITIVE_INT, min_length=1),
    "gass.attn_norm": one_of("importance", "attention"),
    "gass.normalize": one_of("batch", "sample"),
    "gass.refresh": one_of("epoch", "step"),
    "gass.init_score": PROBABILITY,
    "masking.mlm": one_of("informative", "random", "none"),
    "masking.noise_max_prob": PROBABILITY,
    "masking.noise_slope": NON_NEGATIVE,
    "masking.noise_center": PROBABILITY,
    "masking.mlm_max_prob": PROBABILITY,
    "masking.mlm_slope": NON_NEGATIVE,
    "masking.mlm_center": PROBABILITY,
    "masking.random_prob": PROBABILITY,
    "masking.mask_ratio": PROBABILITY,
    "masking.random_ratio": PROBABILITY,
    "data.text_length": number(MIN_TEXT_LENGTH, MAX_TEXT_LENGTH, integer=True),
    "data.sampler": one_of("random", "identity"),
    "data.num_instances": POSITIVE_INT,
    "data.batch_size": POSITIVE_INT,
    "data.test_batch_size": POSITIVE_INT,
    "data.num_workers": NON_NEGATIVE_INT,
    "eval.period": NON_NEGATIVE_INT,
    "eval.select_split": one_of("val", "test"),
    "eval.fallback_split": one_of("val", "test", "none"),
    "eval.chunk_size": POSITIVE_INT,
    "solver.lr": POSITIVE,
    "solver.weight_decay": NON_NEGATIVE,
    "solver.bias_lr_factor": POSITIVE,
    "solver.weight_decay_bias": NON_NEGATIVE,
    "solver.lr_factor": POSITIVE,
    "solver.momentum": PROBABILITY,
    "solver.betas": list_of(number(0, 1, high_open=True), length=2),
    "solver.eps": POSITIVE,
    "solver.warmup_method": one_of("constant", "linear"),
    "solver.warmup_epochs": NON_NEGATIVE_INT,
    "solver.warmup_factor": PROBABILITY,
    "solver.milestones": list_of(POSITIVE_INT, increasing=True),
    "solver.gamma": number(0, 1, low_open=True),
    "solver.target_lr": NON_NEGATIVE,
    "solver.power": POSITIVE,
    "solver.epochs": POSITIVE_INT,
    "solver.grad_clip": NON_NEGATIVE,
    "train.checkpoint_period": POSITIVE_INT,
    "train.max_nonfinite": POSITIVE_INT,
    "train.max_steps": NON_NEGATIVE_INT,
}

RELATIONS: tuple[Relation, ...] = (
    Relation(("masking.mask_ratio", "masking.random_ratio"), lambda mask, rand: mask + rand <= 1,
             "masking.mask_ratio + masking.random_ratio must be <= 1 (they split the selected tokens)"),
    Relation(("data.sampler", "data.batch_size", "data.num_instances"),
             lambda sampler, batch, k: sampler != "identity" or batch % k == 0,
             "with data.sampler='identity', data.batch_size must be a multiple of data.num_instances"),
    Relation(("solver.epochs", "solver.warmup_epochs"), lambda epochs, warmup: epochs > warmup,
             "solver.epochs must exceed solver.warmup_epochs (at least one epoch after warm-up)"),
    Relation(("solver.lr", "solver.target_lr"), lambda lr, target: target <= lr,
             "solver.target_lr must not exceed solver.lr (the schedule decays towards it)"),
)


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


def config_violations(cfg: Mapping, origins: Mapping[str, str] | None = None,
                      rules: Mapping[str, Rule] = RULES,
                      relations: Sequence[Relation] = RELATIONS) -> list[str]:
    """One message per value outside its range and per broken relation.

    Args:
        cfg: A resolved config (nested mappings).
        origins: Dotted key -> the file or override that set it (named in the messages).
        rules: Key -> rule table (default `RULES`); keys absent from `cfg` are skipped.
        relations: Multi-key conditions (default `RELATIONS`).
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


def gass_depth_violation(cfg: Mapping, text_layers: int) -> str | None:
    """Why `gass.num_layers` cannot be scored on a text tower `text_layers` deep, or None.

    Only GASS scoring reads the layers, so the check applies when `gass.enabled`
    and `gass.scoring` is ``gass``.
    """
    gass = cfg["gass"]
    if not gass["enabled"] or gass["scoring"] != "gass":
        return None
    layers = gass["num_layers"]
    if _is_int(layers) and 1 <= layers <= text_layers:
        return None
    arch = cfg["model"]["clip"]["arch"]
    return (f"gass.num_layers={layers!r}: must be an integer in [1, {text_layers}], the text depth of the "
            f"model (model.clip.arch={arch!r})")
