"""Config value ranges and relations: every rule rejects the first bad value and accepts its boundary."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from configs.rules import RULES
from model.build import check_gass_depth
from utils.config import DEFAULT_SCHEMA, ConfigError, apply_overrides, check_config, load_config

REPO = Path(__file__).resolve().parent.parent
TINY_PRETRAIN = REPO / "configs" / "demo" / "tiny_pretrain.yaml"


class Case(NamedTuple):
    key: str
    good: tuple[str, ...]  # boundary values that must load
    bad: str               # the first value past the boundary
    shown: str             # how the message shows the bad value (after type coercion)
    allowed: str           # the allowed range as the message states it
    context: tuple[str, ...] = ()  # overrides that isolate this key from the relations


PROB = "a number in [0, 1]"
CASES = [
    Case("task", ("pretrain", "finetune"), "train", "'train'", "one of 'pretrain', 'finetune'"),
    Case("device", ("auto", "cpu", "cuda", "cuda:1"), "gpu0", "'gpu0'", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    Case("precision", ("fp32", "bf16", "fp16"), "fp8", "'fp8'", "one of 'fp32', 'bf16', 'fp16'"),
    Case("seed", ("0", "2147483647"), "-1", "-1", "an integer in [0, 2147483647]"),
    Case("log_period", ("1",), "0", "0", "an integer >= 1"),
    Case("num_threads", ("0",), "-1", "-1", "an integer >= 0"),
    Case("model.clip.image_size", ("[1, 1]",), "[64, 0]", "[64, 0]", "a list of 2 values, each an integer >= 1"),
    Case("model.clip.stride_size", ("1",), "0", "0", "an integer >= 1"),
    Case("model.temperature", ("1e-6",), "0", "0.0", "a number > 0"),
    Case("model.cmt_depth", ("1",), "0", "0", "an integer >= 1"),
    Case("model.loss_weights.sdm", ("0",), "-0.5", "-0.5", "a number >= 0"),
    Case("model.loss_weights.itc", ("0",), "-1", "-1.0", "a number >= 0"),
    Case("model.loss_weights.id", ("0",), "-1", "-1.0", "a number >= 0"),
    Case("model.loss_weights.mlm", ("0",), "-1", "-1.0", "a number >= 0"),
    Case("gass.scoring", ("gass", "css"), "bm25", "'bm25'", "one of 'gass', 'css'"),
    Case("gass.num_layers", ("1",), "0", "0", "an integer >= 1"),
    Case("gass.scales", ("[1]",), "[]", "[]", "a non-empty list, each an integer >= 1"),
    Case("gass.attn_norm", ("importance", "attention"), "softmax", "'softmax'", "one of 'importance', 'attention'"),
    Case("gass.normalize", ("batch", "sample"), "global", "'global'", "one of 'batch', 'sample'"),
    Case("gass.refresh", ("epoch", "step"), "never", "'never'", "one of 'epoch', 'step'"),
    Case("gass.precision", ("fp32", "tf32", "bf16"), "fp16", "'fp16'", "one of 'fp32', 'tf32', 'bf16'"),
    Case("gass.init_score", ("0", "1"), "1.5", "1.5", PROB),
    Case("masking.mlm", ("informative", "random", "none"), "bert", "'bert'", "one of 'informative', 'random', 'none'"),
    Case("masking.noise_max_prob", ("0", "1"), "1.1", "1.1", PROB),
    Case("masking.noise_slope", ("0",), "-1", "-1.0", "a number >= 0"),
    Case("masking.noise_center", ("0", "1"), "-0.1", "-0.1", PROB),
    Case("masking.mlm_max_prob", ("0", "1"), "2", "2.0", PROB),
    Case("masking.mlm_slope", ("0",), "-20", "-20.0", "a number >= 0"),
    Case("masking.mlm_center", ("0", "1"), "1.5", "1.5", PROB),
    Case("masking.random_prob", ("0", "1"), "-0.15", "-0.15", PROB),
    Case("masking.mask_ratio", ("0", "1"), "1.2", "1.2", PROB, ("masking.random_ratio=0",)),
    Case("masking.random_ratio", ("0", "1"), "-0.1", "-0.1", PROB, ("masking.mask_ratio=0",)),
    Case("data.text_length", ("8", "77"), "2", "2", "an integer in [8, 77]"),
    Case("data.sampler", ("random", "identity"), "pk", "'pk'", "one of 'random', 'identity'"),
    Case("data.num_instances", ("1",), "0", "0", "an integer >= 1"),
    Case("data.batch_size", ("1",), "0", "0", "an integer >= 1"),
    Case("data.test_batch_size", ("1",), "0", "0", "an integer >= 1"),
    Case("data.num_workers", ("0",), "-1", "-1", "an integer >= 0"),
    Case("eval.period", ("0",), "-1", "-1", "an integer >= 0"),
    Case("eval.select_split", ("val", "test"), "train", "'train'", "one of 'val', 'test'"),
    Case("eval.fallback_split", ("val", "test", "none"), "", "''", "one of 'val', 'test', 'none'"),
    Case("eval.chunk_size", ("1",), "0", "0", "an integer >= 1"),
    Case("solver.lr", ("1e-12",), "0", "0.0", "a number > 0", ("solver.target_lr=0",)),
    Case("solver.weight_decay", ("0",), "-1e-4", "-0.0001", "a number >= 0"),
    Case("solver.bias_lr_factor", ("1e-3",), "0", "0.0", "a number > 0"),
    Case("solver.weight_decay_bias", ("0",), "-1", "-1.0", "a number >= 0"),
    Case("solver.lr_factor", ("1e-3",), "0", "0.0", "a number > 0"),
    Case("solver.momentum", ("0", "1"), "1.5", "1.5", PROB),
    Case("solver.betas", ("[0, 0.999999]",), "[0.9, 1.0]", "[0.9, 1.0]", "a list of 2 values, each a number in [0, 1)"),
    Case("solver.eps", ("1e-12",), "0", "0.0", "a number > 0"),
    Case("solver.warmup_method", ("constant", "linear"), "cubic", "'cubic'", "one of 'constant', 'linear'"),
    Case("solver.warmup_epochs", ("0",), "-1", "-1", "an integer >= 0"),
    Case("solver.warmup_factor", ("0", "1"), "1.5", "1.5", PROB),
    Case("solver.milestones", ("[]", "[1, 2]"), "[50, 20]", "[50, 20]",
         "a strictly increasing list, each an integer >= 1"),
    Case("solver.gamma", ("1e-6", "1"), "0", "0.0", "a number in (0, 1]"),
    Case("solver.target_lr", ("0",), "-1e-6", "-1e-06", "a number >= 0"),
    Case("solver.power", ("1e-6",), "0", "0.0", "a number > 0"),
    Case("solver.epochs", ("1",), "0", "0", "an integer >= 1", ("solver.warmup_epochs=0",)),
    Case("solver.grad_clip", ("0",), "-1", "-1.0", "a number >= 0"),
    Case("train.checkpoint_period", ("1",), "0", "0", "an integer >= 1"),
    Case("train.max_nonfinite", ("1",), "0", "0", "an integer >= 1"),
    Case("train.max_steps", ("0",), "-1", "-1", "an integer >= 0"),
    Case("train.accum_steps", ("1", "4"), "0", "0", "an integer >= 1"),
]


def test_every_rule_has_a_case():
    covered = {case.key for case in CASES}
    for pattern in RULES:
        if pattern.endswith(".*"):
            assert any(key.startswith(pattern[:-1]) for key in covered), pattern
        else:
            assert pattern in covered, pattern


def test_every_rule_names_a_schema_key():
    schema = yaml.safe_load(DEFAULT_SCHEMA.read_text())
    for pattern in RULES:
        node = schema
        for part in pattern.removesuffix(".*").split("."):
            assert isinstance(node, dict) and part in node, f"RULES names {pattern!r}, which the schema lacks"
            node = node[part]


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_rule_accepts_its_boundary_and_rejects_past_it(case):
    for value in case.good:
        load_config(None, [*case.context, f"{case.key}={value}"])
    with pytest.raises(ConfigError) as info:
        load_config(None, [*case.context, f"{case.key}={case.bad}"])
    msg = str(info.value)
    assert f"{case.key}={case.shown} (set in override '{case.key}={case.bad}'): must be {case.allowed}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("override, shown", [
    ("solver.lr=.nan", "solver.lr=nan"),
    ("solver.lr=.inf", "solver.lr=inf"),
    ("solver.lr=null", "solver.lr=None"),
    ("data.text_length=78", "data.text_length=78"),
    ("solver.betas=[0.9]", "solver.betas=[0.9]"),
    ("solver.betas=[0.9, fast]", "solver.betas=[0.9, 'fast']"),
    ("gass.scales=[1, true]", "gass.scales=[1, True]"),
    ("gass.scales=[1, 1.5]", "gass.scales=[1, 1.5]"),
    ("solver.milestones=[0, 10]", "solver.milestones=[0, 10]"),
    ("model.clip.image_size=[64]", "model.clip.image_size=[64]"),
])
def test_non_finite_missing_and_malformed_values_are_refused(override, shown):
    with pytest.raises(ConfigError, match="must be") as info:
        load_config(None, [override])
    assert shown in str(info.value)


@pytest.mark.parametrize("good, bad, fragment", [
    ([["masking.mask_ratio=0.5", "masking.random_ratio=0.5"]],
     ["masking.mask_ratio=0.8", "masking.random_ratio=0.3"],
     "masking.mask_ratio=0.8 (set in override 'masking.mask_ratio=0.8'), masking.random_ratio=0.3 "
     "(set in override 'masking.random_ratio=0.3'): masking.mask_ratio + masking.random_ratio must be <= 1"),
    ([["data.sampler=identity", "data.batch_size=12", "data.num_instances=3"],
      ["data.sampler=identity", "data.batch_size=1", "data.num_instances=1"],
      ["data.sampler=random", "data.batch_size=10", "data.num_instances=4"]],
     ["data.sampler=identity", "data.batch_size=10", "data.num_instances=4"],
     "data.batch_size=10 (set in override 'data.batch_size=10'), data.num_instances=4 (set in override "
     "'data.num_instances=4'): with data.sampler='identity', data.batch_size must be a multiple of "
     "data.num_instances"),
    ([["solver.epochs=1", "solver.warmup_epochs=0"], ["solver.epochs=6", "solver.warmup_epochs=5"]],
     ["solver.epochs=5", "solver.warmup_epochs=5"],
     "solver.epochs must exceed solver.warmup_epochs"),
    ([["solver.epochs=6"]],
     ["solver.epochs=3"],
     "solver.epochs=3 (set in override 'solver.epochs=3'), solver.warmup_epochs=5: "),
    ([["solver.lr=1e-5", "solver.target_lr=1e-5"]],
     ["solver.lr=1e-5", "solver.target_lr=1e-4"],
     "solver.target_lr must not exceed solver.lr"),
])
def test_relations_accept_their_boundary_and_name_every_key_and_value(good, bad, fragment):
    for overrides in good:
        load_config(None, overrides)
    with pytest.raises(ConfigError) as info:
        load_config(None, bad)
    assert fragment in str(info.value)


def test_overrides_are_checked_together_not_one_by_one():
    # epochs=1 alone contradicts the file's warmup_epochs=1; the next override makes it consistent.
    with pytest.raises(ConfigError, match="solver.epochs must exceed solver.warmup_epochs"):
        load_config(TINY_PRETRAIN, ["solver.epochs=1"])
    cfg = load_config(TINY_PRETRAIN, ["solver.epochs=1", "solver.warmup_epochs=0"])
    assert (cfg.solver.epochs, cfg.solver.warmup_epochs) == (1, 0)


def test_message_names_the_file_that_set_the_value(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"_base_": str(REPO / "configs" / "base.yaml"), "solver": {"lr": 0}}))
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text(yaml.safe_dump({"_base_": "base.yaml", "data": {"text_length": 2}}))
    with pytest.raises(ConfigError) as info:
        load_config(leaf)
    msg = str(info.value)
    assert f"solver.lr=0.0 (set in {base}): must be a number > 0" in msg
    assert f"data.text_length=2 (set in {leaf}): must be an integer in [8, 77]" in msg


def test_every_violation_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["solver.lr=0", "data.batch_size=0", "masking.mask_ratio=2"])
    msg = str(info.value)
    assert msg.startswith("invalid config: ")
    assert "solver.lr=0.0" in msg and "data.batch_size=0" in msg and "masking.mask_ratio=2.0" in msg


def test_a_relation_is_skipped_when_one_of_its_keys_is_already_wrong():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.sampler=identity", "data.num_instances=0"])
    msg = str(info.value)
    assert "data.num_instances=0" in msg and "multiple" not in msg


def test_check_config_after_apply_overrides():
    cfg = load_config(None)
    apply_overrides(cfg, ["solver.eps=0"])
    with pytest.raises(ConfigError, match=r"solver\.eps=0\.0: must be a number > 0"):
        check_config(cfg)


def _choices(key: str) -> tuple[str, ...]:
    """The values a `one_of` rule allows, read back from its message."""
    allowed = RULES[key].allowed
    assert allowed.startswith("one of "), key
    return tuple(part.strip("'") for part in allowed.removeprefix("one of ").split(", "))


def test_enumerations_match_the_code_that_reads_them():
    from datasets.build import MLM_MODES, SAMPLERS
    from datasets.score_cache import REFRESH_POLICIES
    from model.build import SCORINGS
    from model.gass import ATTN_NORMS, NORMALIZATIONS
    from model.gass import PRECISIONS as GASS_PRECISIONS
    from processor.engine import EVAL_SPLITS
    from solver.lr_scheduler import WARMUP_METHODS
    from tools.train import TASKS
    from utils.device import PRECISIONS

    code = {"task": tuple(TASKS), "precision": tuple(PRECISIONS), "data.sampler": SAMPLERS, "masking.mlm": MLM_MODES,
            "gass.scoring": SCORINGS, "gass.attn_norm": ATTN_NORMS, "gass.normalize": NORMALIZATIONS,
            "gass.refresh": REFRESH_POLICIES, "gass.precision": GASS_PRECISIONS, "solver.warmup_method": WARMUP_METHODS,
            "eval.select_split": EVAL_SPLITS, "eval.fallback_split": (*EVAL_SPLITS, "none")}
    for key, names in code.items():
        assert sorted(_choices(key)) == sorted(names), key
    # Every `one_of` rule is tied to the code it mirrors.
    assert {key for key, rule in RULES.items() if rule.allowed.startswith("one of ")} == set(code)


def test_device_rule_accepts_what_resolve_device_understands():
    from utils.device import resolve_device

    for spec in ("auto", "cpu"):
        load_config(None, [f"device={spec}"])
        resolve_device(spec)
    with pytest.raises(ConfigError, match=r"device='gpu0': not a device"):
        resolve_device("gpu0")


def test_gass_depth_is_checked_against_the_built_text_tower():
    cfg = load_config(TINY_PRETRAIN, ["gass.num_layers=5"])
    with pytest.raises(ConfigError, match=r"gass\.num_layers=5: must be an integer in \[1, 4\], the text depth "
                                          r"of the model \(model\.clip\.arch='tiny'\)"):
        check_gass_depth(cfg, 4)
    check_gass_depth(load_config(TINY_PRETRAIN, ["gass.num_layers=4"]), 4)
    # Only GASS scoring reads the layers.
    check_gass_depth(load_config(TINY_PRETRAIN, ["gass.num_layers=5", "gass.enabled=false"]), 4)
    check_gass_depth(load_config(TINY_PRETRAIN, ["gass.num_layers=5", "gass.scoring=css"]), 4)


@pytest.mark.parametrize("override, fragment", [
    ("data.name=Market1501", "data.name: unknown dataset 'Market1501'"),
    ("eval.datasets=[CUHK-PEDES, Bogus]", "eval.datasets: unknown dataset 'Bogus'"),
    ("model.clip.arch=ViT-Z/99", "model.clip.arch: unknown CLIP preset 'ViT-Z/99'; valid presets: ["),
    ("model.clip.image_size=[8, 64]", "model.clip.image_size=[8, 64]: smaller than the 16-pixel patch of "
                                      "model.clip.arch='tiny'"),
    ("model.loss_names=sdm+foo", "model.loss_names='sdm+foo': unknown ['foo']; valid names are ["),
    ("solver.optimizer=Adamm", "solver.optimizer: unknown optimizer 'Adamm'; valid names: ["),
    ("solver.scheduler=cosin", "solver.scheduler: unknown lr schedule mode 'cosin'; valid modes: ["),
])
def test_names_only_a_registry_knows_are_checked_before_anything_is_built(override, fragment):
    """The trainer asks every registry before reading data or weights; each refusal names key and value."""
    from processor.engine import check_components

    cfg = load_config(TINY_PRETRAIN, [override])
    with pytest.raises(ConfigError) as info:
        check_components(cfg)
    assert fragment in str(info.value)
    check_components(load_config(TINY_PRETRAIN))
