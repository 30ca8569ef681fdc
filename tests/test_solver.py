"""solver: param-group lrs / weight decays, grouped == per-parameter optimisers, IRRA schedules,
and the config builders (every `solver` key reaches the optimiser / schedule)."""

from __future__ import annotations

import copy
import math
from bisect import bisect_right

import pytest
import torch
from torch import nn

from solver.lr_scheduler import LRSchedulerWithWarmup, build_lr_scheduler
from solver.optim import OPTIMIZERS, build_optimizer, build_param_groups, create_optimizer
from utils.config import ConfigError, load_config

LR, WD, BIAS_FACTOR, WD_BIAS, NEW_FACTOR = 1e-5, 4e-5, 2.0, 0.0, 5.0


class FakeRetrievalModel(nn.Module):
    """Parameter names shaped like the real model (CLIP backbone + IRRA heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.visual = nn.Module()
        self.base_model.visual.conv1 = nn.Conv2d(3, 4, 2, bias=False)
        self.base_model.visual.ln_post = nn.LayerNorm(4)  # backbone: must NOT count as the new `ln_post`
        self.base_model.text_proj = nn.Linear(4, 4)
        self.base_model.positional_embedding = nn.Parameter(torch.randn(3, 4))
        self.cross_attn = nn.MultiheadAttention(4, 1)
        self.cross_modal_transformer = nn.Linear(4, 4)
        self.ln_post = nn.LayerNorm(4)
        self.classifier = nn.Linear(4, 3)
        self.mlm_head = nn.Module()
        self.mlm_head.dense = nn.Linear(4, 4)
        self.frozen_proj = nn.Linear(4, 4)
        self.frozen_proj.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = self.base_model.visual.ln_post(self.base_model.visual.conv1(x).mean((2, 3)))
        txt = self.base_model.text_proj(self.base_model.positional_embedding).mean(0, keepdim=True)
        memory = txt[:, None].expand(-1, img.shape[0], -1)  # (L=1, N=B, E)
        mixed, _ = self.cross_attn(img[None], memory, memory)
        h = self.ln_post(self.cross_modal_transformer(mixed[0]))
        return self.classifier(h).sum() + self.mlm_head.dense(h).pow(2).sum()


# Expected (lr, wd) per trainable parameter under IRRA's rule, written out by hand.
EXPECTED = {
    "base_model.positional_embedding": (LR, WD),
    "base_model.visual.conv1.weight": (LR, WD),
    "base_model.visual.ln_post.weight": (LR, WD),
    "base_model.visual.ln_post.bias": (LR * BIAS_FACTOR, WD_BIAS),
    "base_model.text_proj.weight": (LR, WD),
    "base_model.text_proj.bias": (LR * BIAS_FACTOR, WD_BIAS),
    "cross_attn.in_proj_weight": (LR * NEW_FACTOR, WD),
    "cross_attn.in_proj_bias": (LR * BIAS_FACTOR, WD_BIAS),
    "cross_attn.out_proj.weight": (LR * NEW_FACTOR, WD),
    "cross_attn.out_proj.bias": (LR * BIAS_FACTOR, WD_BIAS),
    "cross_modal_transformer.weight": (LR * NEW_FACTOR, WD),
    "cross_modal_transformer.bias": (LR * BIAS_FACTOR, WD_BIAS),
    "ln_post.weight": (LR, WD),
    "ln_post.bias": (LR * BIAS_FACTOR, WD_BIAS),
    "classifier.weight": (LR * NEW_FACTOR, WD),
    "classifier.bias": (LR * NEW_FACTOR, WD_BIAS),
    "mlm_head.dense.weight": (LR * NEW_FACTOR, WD),
    "mlm_head.dense.bias": (LR * NEW_FACTOR, WD_BIAS),
}


def irra_rule(name: str) -> tuple[float, float]:
    """IRRA's build_optimizer, transcribed: substring tests, later assignments win."""
    lr, wd = LR, WD
    if "cross" in name:
        lr = LR * NEW_FACTOR
    if "bias" in name:
        lr, wd = LR * BIAS_FACTOR, WD_BIAS
    if "classifier" in name or "mlm_head" in name:
        lr = LR * NEW_FACTOR
    return lr, wd


def groups_for(model: nn.Module, **kwargs) -> list[dict]:
    return build_param_groups(
        model, lr=LR, weight_decay=WD, bias_lr_factor=BIAS_FACTOR, weight_decay_bias=WD_BIAS, lr_factor=NEW_FACTOR, **kwargs
    )


def per_param_settings(groups: list[dict]) -> dict[str, tuple[float, float]]:
    return {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["param_names"]}


def test_param_group_lrs_and_weight_decays():
    model = FakeRetrievalModel()
    groups = groups_for(model)
    settings = per_param_settings(groups)
    assert settings.keys() == EXPECTED.keys()  # frozen_proj (requires_grad=False) left out
    for name, (lr, wd) in EXPECTED.items():
        assert settings[name] == (pytest.approx(lr), wd), name
    # One group per distinct (lr, wd), and every tensor exactly once.
    assert len(groups) == len(set(EXPECTED.values())) == 4
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(EXPECTED)
    named = dict(model.named_parameters())
    assert all(named[n] is p for g in groups for n, p in zip(g["param_names"], g["params"], strict=True))


def test_rule_equals_irra_for_every_parameter():
    settings = per_param_settings(groups_for(FakeRetrievalModel()))
    assert {name for name, value in settings.items() if value != pytest.approx(irra_rule(name))} == set()


def test_whole_component_prefixes_not_substrings():
    # IRRA's substring test would take a backbone "crossing" layer for a cross-modal module.
    model = FakeRetrievalModel()
    model.base_model.crossing = nn.Linear(4, 4)
    settings = per_param_settings(groups_for(model))
    assert settings["base_model.crossing.weight"] == (pytest.approx(LR), WD)
    assert irra_rule("base_model.crossing.weight") != (LR, WD)


def test_frozen_prefixes_and_single_group_when_factors_are_one():
    model = FakeRetrievalModel()
    groups = build_param_groups(
        model, lr=LR, weight_decay=WD, bias_lr_factor=1.0, weight_decay_bias=WD, lr_factor=1.0, frozen_prefixes=("base_model",)
    )
    assert len(groups) == 1
    assert not any(name.startswith("base_model") for name in groups[0]["param_names"])
    assert len(groups[0]["params"]) == len(EXPECTED) - 6
    with pytest.raises(ValueError, match=r"frozen_prefixes \['base_modle'\] match no parameter"):
        build_param_groups(model, lr=LR, weight_decay=WD, frozen_prefixes=("base_modle",))
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_param_groups(model, lr=LR, weight_decay=WD, frozen_prefixes=tuple(n for n, _ in model.named_children()))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_grouped_optimizer_equals_per_parameter_groups(name):
    torch.manual_seed(0)
    model = FakeRetrievalModel()
    reference_model = copy.deepcopy(model)
    kwargs = dict(lr=1e-2, weight_decay=0.1, bias_lr_factor=2.0, weight_decay_bias=0.01, lr_factor=5.0)
    grouped = create_optimizer(model, name=name, **kwargs)
    # One group per parameter, with the lr / wd IRRA-style code would give it.
    singles = [
        {"params": [p], "param_names": [n], "lr": g["lr"], "weight_decay": g["weight_decay"]}
        for g in build_param_groups(reference_model, **kwargs)
        for n, p in zip(g["param_names"], g["params"], strict=True)
    ]
    per_param = OPTIMIZERS[name](
        singles, lr=1e-2, **({"momentum": 0.9} if name == "SGD" else {"betas": (0.9, 0.999), "eps": 1e-3})
    )
    assert len(grouped.param_groups) == 4 and len(per_param.param_groups) == len(EXPECTED)
    x = torch.randn(2, 3, 5, 5)
    for _ in range(2):
        for net, opt in ((model, grouped), (reference_model, per_param)):
            opt.zero_grad()
            net(x).backward()
            opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), reference_model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not torch.equal(model.cross_attn.in_proj_weight, FakeRetrievalModel().cross_attn.in_proj_weight)


def test_create_optimizer_hyper_parameters_and_errors():
    model = FakeRetrievalModel()
    adam = create_optimizer(model, name="Adam", lr=1e-4, weight_decay=4e-5, betas=(0.8, 0.9), eps=1e-3)
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["eps"] == 1e-3
    sgd = create_optimizer(model, name="SGD", lr=1e-4, weight_decay=4e-5, momentum=0.5)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5
    assert isinstance(create_optimizer(model, name="AdamW", lr=1e-4, weight_decay=0.0), torch.optim.AdamW)
    # A user's config named it: the one-line error of the tools, naming the key.
    with pytest.raises(ConfigError, match=r"solver.optimizer: unknown optimizer 'adam'; valid names: "
                                          r"\['Adam', 'AdamW', 'SGD'\]"):
        create_optimizer(model, name="adam", lr=1e-4, weight_decay=0.0)


# ---------------------------------------------------------------- schedules


def irra_lr(base_lr: float, epoch: int, *, mode: str, warmup_method: str, warmup_factor: float = 0.1,
            warmup_epochs: int = 5, total_epochs: int = 60, milestones=(20, 50), gamma: float = 0.1,
            target_lr: float = 0.0, power: float = 0.9) -> float:
    """IRRA's LRSchedulerWithWarmup.get_lr, written out independently for one epoch."""
    if epoch < warmup_epochs:
        if warmup_method == "constant":
            return base_lr * warmup_factor
        alpha = epoch / warmup_epochs
        return base_lr * (warmup_factor * (1 - alpha) + alpha)
    if mode == "step":
        return base_lr * gamma ** sum(1 for m in milestones if m <= epoch)
    ratio = (epoch - warmup_epochs) / (total_epochs - warmup_epochs)
    if mode == "exp":
        return base_lr * power**ratio
    if mode == "linear":
        return base_lr * (1 - ratio)
    if mode == "poly":
        return target_lr + (base_lr - target_lr) * power ** (1 - ratio)
    assert mode == "cosine"
    return target_lr + (base_lr - target_lr) * 0.5 * (1 + math.cos(math.pi * ratio))


def two_group_optimizer() -> torch.optim.Optimizer:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    return torch.optim.Adam([{"params": [a], "lr": 1e-5}, {"params": [b], "lr": 5e-5}], lr=1e-5)


@pytest.mark.parametrize("mode", ["step", "exp", "poly", "cosine", "linear"])
@pytest.mark.parametrize("warmup_method", ["linear", "constant"])
def test_schedule_equals_irra_formula_every_epoch(mode, warmup_method):
    config = dict(mode=mode, warmup_method=warmup_method, warmup_factor=0.1, warmup_epochs=5, total_epochs=60,
                  milestones=(20, 50), gamma=0.1, target_lr=1e-7, power=0.9)
    optimizer = two_group_optimizer()
    scheduler = LRSchedulerWithWarmup(optimizer, **config)
    for epoch in range(63):  # a few epochs past the end, where IRRA does not clamp either
        for group, base_lr in zip(optimizer.param_groups, (1e-5, 5e-5), strict=True):
            assert group["lr"] == pytest.approx(irra_lr(base_lr, epoch, **config), rel=1e-12, abs=0.0), epoch
        optimizer.step()
        scheduler.step()


def test_schedule_spot_values_and_no_warmup():
    optimizer = two_group_optimizer()
    scheduler = LRSchedulerWithWarmup(optimizer, warmup_epochs=5, warmup_factor=0.1, total_epochs=60, mode="cosine")
    lrs = []
    for _ in range(61):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(2.8e-6)  # 0.1 + 0.9 * 1/5
    assert lrs[5] == pytest.approx(1e-5) and lrs[60] == pytest.approx(0.0, abs=1e-20)
    assert lrs[32] == pytest.approx(0.5e-5 * (1 + math.cos(math.pi * 27 / 55)))
    optimizer = two_group_optimizer()
    LRSchedulerWithWarmup(optimizer, warmup_epochs=0, total_epochs=10, mode="linear")
    assert optimizer.param_groups[1]["lr"] == pytest.approx(5e-5)


def test_resume_from_state_dict_equals_uninterrupted():
    config = dict(mode="cosine", warmup_epochs=3, total_epochs=20)
    optimizer = two_group_optimizer()
    scheduler = LRSchedulerWithWarmup(optimizer, **config)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    opt_state, sched_state = optimizer.state_dict(), scheduler.state_dict()
    uninterrupted = []
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        uninterrupted.append([g["lr"] for g in optimizer.param_groups])

    resumed_opt = two_group_optimizer()
    resumed = LRSchedulerWithWarmup(resumed_opt, **config)
    resumed_opt.load_state_dict(opt_state)
    resumed.load_state_dict(sched_state)
    assert resumed.last_epoch == 7
    for expected in uninterrupted:
        resumed_opt.step()
        resumed.step()
        assert [g["lr"] for g in resumed_opt.param_groups] == pytest.approx(expected, rel=1e-12)


def test_schedule_errors():
    with pytest.raises(ConfigError, match=r"solver.scheduler: unknown lr schedule mode 'cos'; valid modes: "
                                          r"\['step', 'exp', 'poly', 'cosine', 'linear'\]"):
        LRSchedulerWithWarmup(two_group_optimizer(), mode="cos")
    with pytest.raises(ValueError, match=r"unknown warmup_method 'exp'; valid methods: \['constant', 'linear'\]"):
        LRSchedulerWithWarmup(two_group_optimizer(), warmup_method="exp")
    with pytest.raises(ValueError, match="milestones must be increasing"):
        LRSchedulerWithWarmup(two_group_optimizer(), milestones=(50, 20), mode="step")
    with pytest.raises(ValueError, match=r"total_epochs \(5\) must exceed warmup_epochs \(5\)"):
        LRSchedulerWithWarmup(two_group_optimizer(), total_epochs=5, warmup_epochs=5)


def test_step_mode_uses_bisect_right_on_milestones():
    optimizer = two_group_optimizer()
    scheduler = LRSchedulerWithWarmup(optimizer, mode="step", milestones=(6, 8), warmup_epochs=2, gamma=0.5)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"] / 1e-5)
        optimizer.step()
        scheduler.step()
    expected_after_warmup = [0.5 ** bisect_right([6, 8], e) for e in range(2, 10)]
    assert seen == pytest.approx([0.1, 0.55] + expected_after_warmup)
    assert expected_after_warmup == [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]


# ---------------------------------------------------------------- builders

# A value for every key the builders read, none of them a default of the config or of the
# keyword-argument functions: a key the builder forgot would leave a default and show.
OPTIMIZER_KEYS = {"lr": 3e-4, "weight_decay": 1e-3, "momentum": 0.7, "betas": (0.85, 0.95), "eps": 1e-6,
                  "bias_lr_factor": 3.0, "weight_decay_bias": 2e-4, "lr_factor": 7.0}
SCHEDULE_KEYS = {"warmup_method": "constant", "warmup_epochs": 3, "warmup_factor": 0.25, "milestones": (7, 11),
                 "gamma": 0.3, "target_lr": 2e-6, "power": 0.6, "epochs": 15}


def solver_config(name: str, values: dict) -> dict:
    overrides = [f"solver.{key}={list(v) if isinstance(v, tuple) else v}" for key, v in values.items()]
    return load_config(None, [f"solver.optimizer={name}", *overrides])


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_build_optimizer_reads_every_solver_key(name):
    cfg = solver_config(name, OPTIMIZER_KEYS)
    built = build_optimizer(cfg, FakeRetrievalModel())
    assert type(built) is OPTIMIZERS[name]
    values = dict(OPTIMIZER_KEYS)
    lr, wd, bias_factor, wd_bias, new_factor = (values[k] for k in ("lr", "weight_decay", "bias_lr_factor",
                                                                    "weight_decay_bias", "lr_factor"))
    # The IRRA rule written out for these values (cf. EXPECTED): every group's (lr, wd) and its tensors.
    expected = {"base_model.visual.conv1.weight": (lr, wd), "base_model.text_proj.bias": (lr * bias_factor, wd_bias),
                "cross_attn.in_proj_weight": (lr * new_factor, wd), "classifier.bias": (lr * new_factor, wd_bias)}
    settings = per_param_settings(built.param_groups)
    for param, (want_lr, want_wd) in expected.items():
        assert settings[param] == (pytest.approx(want_lr, rel=1e-12), want_wd), param
    if name == "SGD":
        assert built.defaults["momentum"] == values["momentum"]
    else:
        assert built.defaults["betas"] == values["betas"] and built.defaults["eps"] == values["eps"]
    # The same optimiser as the keyword form given the values by hand.
    by_hand = create_optimizer(FakeRetrievalModel(), name=name, **values)
    assert built.defaults == by_hand.defaults
    assert per_param_settings(built.param_groups) == per_param_settings(by_hand.param_groups)


def test_build_optimizer_unknown_name_names_the_key():
    cfg = load_config(None)
    cfg.solver.optimizer = "Adamw"
    with pytest.raises(ConfigError, match=r"solver.optimizer: unknown optimizer 'Adamw'"):
        build_optimizer(cfg, FakeRetrievalModel())


@pytest.mark.parametrize("mode", ["step", "exp", "poly", "cosine", "linear"])
def test_build_lr_scheduler_reads_every_solver_key(mode):
    cfg = solver_config("Adam", {"scheduler": mode, **SCHEDULE_KEYS})
    optimizer = two_group_optimizer()
    scheduler = build_lr_scheduler(cfg, optimizer)
    formula = dict(SCHEDULE_KEYS)
    formula["total_epochs"] = formula.pop("epochs")
    for epoch in range(formula["total_epochs"] + 2):
        for group, base_lr in zip(optimizer.param_groups, (1e-5, 5e-5), strict=True):
            expected = irra_lr(base_lr, epoch, mode=mode, **formula)
            assert group["lr"] == pytest.approx(expected, rel=1e-12, abs=0.0), epoch
        optimizer.step()
        scheduler.step()


def test_fused_kernel_where_torch_has_one_else_the_default_with_a_warning(caplog, monkeypatch):
    """solver.fused: torch's fused kernel where it exists for the device (the CPU in this torch); where torch
    refuses it, the default kernel and a warning that says why."""
    model = torch.nn.Linear(3, 2)
    for name in ("Adam", "AdamW", "SGD"):
        assert create_optimizer(model, name=name, lr=1e-3, weight_decay=0.0, fused=True).defaults["fused"], name
        assert not create_optimizer(model, name=name, lr=1e-3, weight_decay=0.0).defaults.get("fused"), name

    class NoFusedAdam(torch.optim.Adam):
        def __init__(self, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices: ['cuda']")
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(OPTIMIZERS, "Adam", NoFusedAdam)
    with caplog.at_level("WARNING", logger="solver.optim"):
        optimizer = create_optimizer(model, name="Adam", lr=1e-3, weight_decay=0.0, fused=True)
    assert isinstance(optimizer, NoFusedAdam) and not optimizer.defaults.get("fused")
    assert "solver.fused: `fused=True` requires" in caplog.text and "using the default kernel" in caplog.text
