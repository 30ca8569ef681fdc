"""Optimiser construction with IRRA's per-parameter learning rates.

Rule (IRRA's ``solver/build.py``, with its precedence), for every trainable
parameter not under a ``frozen_prefixes`` entry, starting from ``lr`` and
``weight_decay``:

1. under a **cross-modal** prefix (``cross_attn``, ``cross_modal_transformer``):
   ``lr * lr_factor``;
2. a **bias** (the parameter's own name, its last dotted component, contains
   ``"bias"``): ``lr * bias_lr_factor`` and ``weight_decay_bias`` — this replaces
   step 1, so cross-modal biases get the bias factor, as in IRRA;
3. under a **head** prefix (``mlm_head``, ``classifier``): ``lr * lr_factor``
   (replacing step 2's lr; a head bias keeps ``weight_decay_bias``).

The randomly initialised ``ln_pre_t``, ``ln_pre_i`` and ``ln_post`` are trained at
the base lr, as IRRA does. One deliberate difference: IRRA tests substrings of
the full name ("cross" in name), we test whole leading name components, so a
backbone parameter whose name merely contains "cross" or "classifier" is never
taken for a new module.

Parameters with equal ``(lr, weight_decay)`` share one param group (a handful
of groups instead of one per tensor); each group also carries ``param_names``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from utils.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CROSS_MODAL_PREFIXES",
    "HEAD_PREFIXES",
    "OPTIMIZERS",
    "build_optimizer",
    "build_param_groups",
    "create_optimizer",
    "optimizer_class",
]

CROSS_MODAL_PREFIXES = ("cross_attn", "cross_modal_transformer")
HEAD_PREFIXES = ("mlm_head", "classifier")


def _has_prefix(name: str, prefix: str) -> bool:
    """Whether ``prefix`` is a leading run of whole dotted components of ``name``."""
    return name == prefix or name.startswith(prefix + ".")


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    bias_lr_factor: float = 2.0,
    weight_decay_bias: float = 0.0,
    lr_factor: float = 5.0,
    cross_prefixes: Sequence[str] = CROSS_MODAL_PREFIXES,
    head_prefixes: Sequence[str] = HEAD_PREFIXES,
    frozen_prefixes: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Param groups with per-parameter lr / weight decay (see the module docstring).

    Args:
        model: the model; parameters with ``requires_grad=False`` are skipped.
        lr: base learning rate.
        weight_decay: weight decay of non-bias parameters.
        bias_lr_factor: lr multiplier of biases (outside the heads).
        weight_decay_bias: weight decay of all biases.
        lr_factor: lr multiplier of the new cross-modal modules (but their biases) and heads.
        cross_prefixes: name prefixes of the cross-modal modules (rule step 1).
        head_prefixes: name prefixes of the prediction heads (rule step 3).
        frozen_prefixes: name prefixes whose parameters are left out of the
            optimiser (their ``requires_grad`` is not changed).

    Returns:
        Groups ``{"params", "param_names", "lr", "weight_decay"}`` in order of
        first appearance in ``model.named_parameters()``.

    Raises:
        ValueError: if a frozen prefix matches no parameter (likely a typo) or
            no trainable parameter is left.
    """
    if any(isinstance(p, str) for p in (cross_prefixes, head_prefixes, frozen_prefixes)):
        raise ValueError("cross_prefixes, head_prefixes and frozen_prefixes must be sequences of names, not a string")
    new_module_prefixes = tuple(cross_prefixes) + tuple(head_prefixes)
    named = list(model.named_parameters())
    unmatched = [p for p in frozen_prefixes if not any(_has_prefix(name, p) for name, _ in named)]
    if unmatched:
        raise ValueError(f"frozen_prefixes {unmatched} match no parameter of {type(model).__name__}")

    groups: dict[tuple[float, float], dict[str, Any]] = {}
    new_module_params = 0
    for name, param in named:
        if not param.requires_grad or any(_has_prefix(name, p) for p in frozen_prefixes):
            continue
        is_bias = "bias" in name.rsplit(".", 1)[-1]
        param_lr, param_wd = lr, weight_decay
        if any(_has_prefix(name, p) for p in cross_prefixes):
            param_lr = lr * lr_factor
        if is_bias:
            param_lr, param_wd = lr * bias_lr_factor, weight_decay_bias
        if any(_has_prefix(name, p) for p in head_prefixes):
            param_lr = lr * lr_factor
        new_module_params += any(_has_prefix(name, p) for p in new_module_prefixes)
        group = groups.setdefault(
            (param_lr, param_wd), {"params": [], "param_names": [], "lr": param_lr, "weight_decay": param_wd}
        )
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameter outside frozen_prefixes")
    absent = [p for p in new_module_prefixes if not any(_has_prefix(name, p) for name, _ in named)]
    if absent:  # normal for e.g. pretraining without a classifier; a hint when names drift
        logger.info("new-module prefixes without any parameter in %s: %s", type(model).__name__, absent)
    logger.info(
        "optimiser: %d param groups, %d tensors of new modules (lr x %g but cross-modal biases), biases at lr x %g",
        len(groups),
        new_module_params,
        lr_factor,
        bias_lr_factor,
    )
    return list(groups.values())


# Weight decay is set per param group, so it is not passed to the constructors.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "SGD": torch.optim.SGD,
}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer registered as ``name`` in ``OPTIMIZERS`` (``solver.optimizer``).

    Raises:
        ConfigError: an unknown name, listing the valid ones.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"solver.optimizer: unknown optimizer {name!r}; valid names: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def create_optimizer(
    model: nn.Module,
    *,
    name: str = "Adam",
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-3,
    fused: bool = False,
    **group_kwargs: Any,
) -> torch.optim.Optimizer:
    """Optimiser over :func:`build_param_groups` of ``model``.

    ``eps`` (default 1e-3, IRRA's Adam value) is used by Adam and AdamW alike
    (IRRA hard-codes 1e-8 for AdamW); SGD ignores ``betas`` and ``eps``, Adam and
    AdamW ignore ``momentum``. Adam applies weight decay as L2 in the gradient,
    AdamW decoupled, as in torch.

    Args:
        model: the model to optimise.
        name: ``Adam``, ``AdamW`` or ``SGD``.
        lr: base learning rate.
        weight_decay: weight decay of non-bias parameters.
        momentum: SGD momentum.
        betas: Adam/AdamW betas.
        eps: Adam/AdamW epsilon.
        fused: torch's fused kernel (one launch for all parameters; it can skip a step on
            the device, see `processor.loop`) where torch has one for the parameters' device
            (CUDA; the CPU in recent torch); otherwise the default kernel (multi-tensor
            ``foreach`` on CUDA), with a warning. Off by default: it rounds differently.
        **group_kwargs: forwarded to :func:`build_param_groups`
            (``bias_lr_factor``, ``weight_decay_bias``, ``lr_factor``,
            ``cross_prefixes``, ``head_prefixes``, ``frozen_prefixes``).
    """
    optimizer = optimizer_class(name)
    if len(betas) != 2:
        raise ValueError(f"betas must hold two values, got {list(betas)}")
    groups = build_param_groups(model, lr=lr, weight_decay=weight_decay, **group_kwargs)
    if optimizer is torch.optim.SGD:
        make = functools.partial(torch.optim.SGD, groups, lr=lr, momentum=momentum)
    else:
        make = functools.partial(optimizer, groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps)
    if fused:
        try:
            return make(fused=True)
        except (RuntimeError, ValueError) as err:  # torch refuses the fused kernel for this device or dtype
            logger.warning("solver.fused: %s; using the default kernel", str(err).splitlines()[0] if str(err) else err)
    return make()


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser the config's ``solver`` node describes, over ``model``'s trainable parameters.

    Reads ``solver.optimizer``, ``lr``, ``weight_decay``, ``momentum``, ``betas``,
    ``eps``, ``fused``, ``bias_lr_factor``, ``weight_decay_bias`` and ``lr_factor``; see
    :func:`create_optimizer` for what each does.

    Raises:
        ConfigError: ``solver.optimizer`` names no registered optimiser.
    """
    solver = cfg.solver
    return create_optimizer(
        model,
        name=solver.optimizer,
        lr=solver.lr,
        weight_decay=solver.weight_decay,
        momentum=solver.momentum,
        betas=tuple(solver.betas),
        eps=solver.eps,
        bias_lr_factor=solver.bias_lr_factor,
        weight_decay_bias=solver.weight_decay_bias,
        lr_factor=solver.lr_factor,
        fused=solver.fused,
    )
