"""What each key of the configs may hold (the defaults are `configs/base.yaml`).

`RULES` maps a dotted key (``*`` = every key of that mapping) to what its value
may be; `RELATIONS` ties several keys together (`utils.config_checks` applies
them when a config loads).

Fixed sets of modes (sampler, masking, token-scoring options, warm-up, precision,
task) are listed here, so a typo fails when the config loads, before any data or
weights are read; tests/test_config_checks.py checks each list against the code
that reads the value. Names looked up in a registry that code can extend
(datasets, CLIP presets, loss names, optimizers, schedulers) are left to the
registry, whose unknown-name error is a ConfigError naming the key, the value
and the valid names. Keys that only the model can bound (``gass.num_layers``
against the text depth of the chosen backbone) are checked by the model builder
(`model.build.check_gass_depth`).
"""

from __future__ import annotations

from utils.config_checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    Relation,
    Rule,
    list_of,
    matches,
    number,
    one_of,
)

__all__ = ["RULES", "RELATIONS", "MIN_TEXT_LENGTH", "MAX_TEXT_LENGTH", "MAX_SEED"]

#: Shortest caption context worth training on: SOT, EOT and a few words.
MIN_TEXT_LENGTH = 8
#: CLIP's text context (positional embeddings of every preset and OpenAI checkpoint).
MAX_TEXT_LENGTH = 77
#: numpy seeds must fit in 32 bits; half of that leaves room for the per-rank offset.
MAX_SEED = 2**31 - 1

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
    "gass.precision": one_of("fp32", "tf32", "bf16"),
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
    "train.accum_steps": POSITIVE_INT,
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
