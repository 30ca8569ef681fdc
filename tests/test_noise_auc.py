"""processor/noise_detection.py: the per-caption noise AUC, its scorers, and its records during pretraining."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datasets import build_dataset
from datasets.bases import open_image
from datasets.transforms import build_transforms
from model import build_model
from model.tokenizer import Tokenizer
from processor import noise_detection as nd
from processor.engine import Trainer
from processor.pretrain import NOISE_SCORERS, PretrainTask, measure_noise_detection
from tests.conftest import REPO
from utils.config import load_config

PRETRAIN = str(REPO / "configs" / "demo" / "tiny_pretrain.yaml")


def naive_auc(scores, corrupted) -> float:
    """Mann-Whitney by enumeration: P(clean > corrupted) + P(tie) / 2 over all pairs."""
    clean = [s for s, c in zip(scores, corrupted) if not c]
    noisy = [s for s, c in zip(scores, corrupted) if c]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(clean, noisy))
    return wins / (len(clean) * len(noisy))


def test_caption_auc_oracle_inverted_constant_and_reference():
    flags = [False, True, False, False, True]
    oracle = [0.9, 0.1, 0.8, 0.7, 0.2]
    assert nd.caption_auc(oracle, flags) == 1.0
    assert nd.caption_auc([1 - s for s in oracle], flags) == 0.0
    assert nd.caption_auc([0.3] * 5, flags) == 0.5
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 12))
        scores = rng.integers(0, 4, n).astype(float)  # small integers: many ties
        bad = rng.random(n) < 0.4
        bad[0], bad[-1] = True, False
        assert nd.caption_auc(torch.tensor(scores), bad) == pytest.approx(naive_auc(scores, bad))
    assert math.isnan(nd.caption_auc([0.1, 0.2], [False, False]))
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        nd.caption_auc([0.1, 0.2], [True])


def test_summarize_aucs():
    summary = nd.summarize_aucs({"wrong_attr": [1.0, 0.5], "irrelevant": [0.0]})
    assert summary == {"all": 0.5, "captions": 3.0, "wrong_attr": 0.75, "irrelevant": 0.0}
    assert math.isnan(nd.summarize_aucs({"wrong_attr": [0.2]})["irrelevant"])


class FixedScores(torch.nn.Module):
    """A model whose token scores are given per caption (by token ids): 1 on clean, `bad` on corrupted words."""

    def __init__(self, cfg, root, bad: float) -> None:
        super().__init__()
        self.inner = build_model(cfg)
        tokenizer = Tokenizer()
        report = nd.load_noise_report(str(root))
        source = nd.CaptionSource(build_dataset("WebPerson", str(root), annotation="shards"), "train")
        self.corrupted = {}
        for key, entry in nd.match_noise_entries(report, "WebPerson", source).items():
            ids = tokenizer.tokenize(source.caption(key), cfg.data.text_length)[0].tolist()
            self.corrupted[tuple(ids)] = nd.corrupted_positions(tokenizer, ids, entry.get("clean"),
                                                                entry.get("words", ()))
        self.bad = bad

    def encode_image(self, images):
        return self.inner.encode_image(images)

    def token_scores(self, feats, ids):
        scores = torch.ones(ids.shape)
        for row, key in enumerate(ids.tolist()):
            for p in self.corrupted[tuple(key)]:
                scores[row, p] = self.bad
        return scores


def _auc(model, cfg, root, **kwargs):
    return nd.noise_detection_auc(model, str(root), image_size=cfg.model.clip.image_size, annotation="shards",
                                  **kwargs)


def test_noise_detection_auc_oracle_inverted_constant(synthetic_root):
    cfg = load_config(PRETRAIN)
    oracle = _auc(FixedScores(cfg, synthetic_root, 0.0), cfg, synthetic_root, batch_size=8)["model"]
    assert set(oracle) == set(nd.NOISE_KINDS)
    assert all(a == 1.0 for values in oracle.values() for a in values)
    count = sum(map(len, oracle.values()))
    assert count > 5
    inverted = _auc(FixedScores(cfg, synthetic_root, 2.0), cfg, synthetic_root)["model"]
    assert nd.summarize_aucs(inverted)["all"] == 0.0
    constant = _auc(FixedScores(cfg, synthetic_root, 1.0), cfg, synthetic_root)["model"]
    assert nd.summarize_aucs(constant) == {"all": 0.5, "captions": count, "wrong_attr": 0.5, "irrelevant": 0.5}


def test_gass_css_random_scorers_on_one_model(synthetic_root):
    cfg = load_config(PRETRAIN, ["gass.scoring=css"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    first = _auc(model, cfg, synthetic_root, scorers=("model", "gass", "css", "random"), batch_size=16)
    assert model.training  # the training mode is restored
    # "model" follows the config's scoring (CSS here); "gass" is GASS whatever the config says.
    assert first["model"] == first["css"]
    assert first["gass"] != first["css"]
    for per_kind in first.values():
        assert all(0.0 <= a <= 1.0 for values in per_kind.values() for a in values)
    again = _auc(model, cfg, synthetic_root, scorers=("gass", "random"), batch_size=16)
    assert again["gass"] == first["gass"] and again["random"] == first["random"]  # deterministic
    # GASS's batch min-max is one affine map per batch: the batch size does not change a caption's AUC.
    small_batches = _auc(model, cfg, synthetic_root, scorers=("gass",), batch_size=5)["gass"]
    assert set(small_batches) == set(first["gass"])
    for kind, values in small_batches.items():
        assert values == pytest.approx(first["gass"][kind])
    other_seed = _auc(model, cfg, synthetic_root, scorers=("random",), seed=1)["random"]
    assert other_seed != first["random"]
    with pytest.raises(ValueError, match="unknown scorer"):
        _auc(model, cfg, synthetic_root, scorers=("oracle",))


def test_needs_a_noise_report(tmp_path):
    cfg = load_config(PRETRAIN)
    with pytest.raises(nd.NoiseReportError, match="noise_report.json"):
        nd.noise_detection_auc(torch.nn.Identity(), str(tmp_path), image_size=cfg.model.clip.image_size)


def test_pretraining_records_noise_detection_before_and_after_each_evaluated_epoch(synthetic_root, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(PRETRAIN, [f"data.root={synthetic_root}", "eval.root=", f"output_dir={run}",
                                 "solver.epochs=2", "solver.warmup_epochs=1", "train.max_steps=2",
                                 "data.batch_size=16", "log_period=100"])
    trainer = Trainer(cfg, PretrainTask())
    initial = measure_noise_detection(trainer.model, cfg)  # the weights before the first step
    trainer.train()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    noise = [r for r in records if r["type"] == "noise_auc"]
    assert sorted((r["epoch"], r["scorer"]) for r in noise) == sorted(
        itertools.product((-1, 0, 1), NOISE_SCORERS))
    assert {r["step"] for r in noise if r["epoch"] == 1} == {4}
    before = {r["scorer"]: r for r in noise if r["epoch"] == -1}
    for name in NOISE_SCORERS:
        assert before[name]["all"] == pytest.approx(initial[name]["all"])
    # The last epoch's record is the final model's measurement.
    final = {r["scorer"]: r for r in noise if r["epoch"] == 1}
    assert final["gass"]["all"] == pytest.approx(measure_noise_detection(trainer.model, cfg)["gass"]["all"])
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"noise_auc/gass/all", "noise_auc/css/wrong_attr", "noise_auc/random/irrelevant"} <= tags


def test_noise_records_leave_training_unchanged_and_resume_without_duplicates(synthetic_root, tmp_path):
    """The measurement draws nothing from training's random state; a resumed run redoes its records once."""
    blind = tmp_path / "no_report"  # the same corpus without its ground truth: no measurement
    blind.mkdir()
    for entry in synthetic_root.iterdir():
        if entry.name != "noise_report.json":
            (blind / entry.name).symlink_to(entry)
    overrides = ["eval.root=", "solver.epochs=2", "solver.warmup_epochs=1", "train.max_steps=2",
                 "data.batch_size=16", "log_period=1"]

    def losses(run):
        return [(r["epoch"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"]

    measured, plain = tmp_path / "measured", tmp_path / "plain"
    Trainer(load_config(PRETRAIN, overrides + [f"data.root={synthetic_root}", f"output_dir={measured}"]),
            PretrainTask()).train()
    Trainer(load_config(PRETRAIN, overrides + [f"data.root={blind}", f"output_dir={plain}"]), PretrainTask()).train()
    assert losses(measured) == losses(plain) and len(losses(plain)) == 2

    # Stopped after epoch 0, resumed: one record per (epoch, scorer), epoch 1's written once.
    resumed = tmp_path / "resumed"
    cfg = load_config(PRETRAIN, overrides + [f"data.root={synthetic_root}", f"output_dir={resumed}"])
    Trainer(cfg, PretrainTask()).train(until_epoch=1)
    Trainer(load_config(str(resumed / "config.yaml")), PretrainTask()).train()
    noise = [r for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "noise_auc"]
    assert sorted((r["epoch"], r["scorer"]) for r in noise) == sorted(itertools.product((-1, 0, 1), NOISE_SCORERS))
    assert losses(resumed) == losses(measured)


def test_no_noise_records_without_ground_truth_or_evaluation(synthetic_root, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(PRETRAIN, [f"data.root={synthetic_root}", "eval.period=0", f"output_dir={run}",
                                 "solver.epochs=1", "solver.warmup_epochs=0", "train.max_steps=1",
                                 "data.batch_size=16"])
    Trainer(cfg, PretrainTask()).train()
    assert all(json.loads(line)["type"] != "noise_auc" for line in (run / "metrics.jsonl").read_text().splitlines())


def test_occlusion_scores_match_deleting_each_token(synthetic_root):
    cfg = load_config(PRETRAIN)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = Tokenizer().tokenize(["a man in a red coat", "a woman with long hair and a blue skirt ."], 77)
    feats = torch.randn(2, model.embed_dim)
    scores = nd.occlusion_scores(model, feats, ids)
    with torch.no_grad():
        _check_deletions(model, feats, ids, scores)


def _check_deletions(model, feats, ids, scores):
    for row in range(2):
        eot = int(ids[row].argmax())
        full = torch.nn.functional.cosine_similarity(model.encode_text(ids[row:row + 1]), feats[row:row + 1])
        for j in range(ids.shape[1]):
            if not 0 < j < eot:
                assert scores[row, j] == 0
                continue
            kept = torch.cat([ids[row, :j], ids[row, j + 1:], torch.zeros(1, dtype=ids.dtype)]).unsqueeze(0)
            dropped = torch.nn.functional.cosine_similarity(model.encode_text(kept), feats[row:row + 1])
            assert float(scores[row, j]) == pytest.approx(float(full - dropped), abs=1e-5)


def test_clean_preference_matches_one_caption_at_a_time(synthetic_root):
    cfg = load_config(PRETRAIN)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    got = nd.clean_preference(model, str(synthetic_root), image_size=cfg.model.clip.image_size,
                              annotation="shards", batch_size=7)
    report = nd.load_noise_report(str(synthetic_root))
    source = nd.CaptionSource(build_dataset("WebPerson", str(synthetic_root), annotation="shards"), "train")
    tokenizer = Tokenizer()
    transform = build_transforms(tuple(cfg.model.clip.image_size), is_train=False)
    wins: dict[str, list[float]] = {}
    with torch.no_grad():
        for key, entry in nd.match_noise_entries(report, "WebPerson", source).items():
            caption, path, _ = source.get(key)
            image = model.encode_image(transform(open_image(path)).unsqueeze(0))
            noisy = torch.nn.functional.cosine_similarity(image, model.encode_text(tokenizer.tokenize(caption, 77)))
            clean = torch.nn.functional.cosine_similarity(image, model.encode_text(
                tokenizer.tokenize(entry["clean"], 77)))
            wins.setdefault(entry["kind"], []).append(float(clean > noisy) + 0.5 * float(clean == noisy))
    expected = nd.summarize_aucs(wins)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=0.02)  # batching may flip a near-tie
