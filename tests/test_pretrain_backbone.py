"""tools/pretrain_backbone.py and the generic synthetic corpus: OpenAI-format file, cache, zero-shot report."""

from __future__ import annotations

import json
import logging
import math
import re
import threading

import pytest
import torch

from datasets.synthetic import (
    DESCRIBED_FIELDS,
    PALETTE,
    PersonAttributes,
    generic_corpus,
    sample_identities,
    tokenize_caption,
)
from model.clip import build_clip, build_clip_from_config
from processor import backbone
from tests.conftest import REPO, load_tool
from utils.config import load_config

tool = load_tool("pretrain_backbone")
#: Seconds, not minutes: a handful of images and one epoch.
TINY = dict(images=48, batch_size=16, epochs=1, captions_per_image=2, warmup_steps=1)


def _openai_keys() -> set[str]:
    """OpenAI's ViT-B-16.pt keys with the block numbers blanked: IRRA's backbone keys plus the four
    entries IRRA's loader drops (the temperature and the archive's three sizes)."""
    keys = json.loads((REPO / "tests" / "fixtures" / "reference_keys" / "irra.json").read_text())["keys"]
    backbone_keys = {k.removeprefix("base_model.") for k in keys if k.startswith("base_model.")}
    return {re.sub(r"resblocks\.\d+\.", "resblocks.N.", k) for k in backbone_keys} | {
        "logit_scale", "input_resolution", "context_length", "vocab_size"}


# --------------------------------------------------------------------------- the generic corpus


def test_generic_identities_stay_away_from_the_excluded_ones(synthetic_root):
    excluded = backbone.excluded_identities(synthetic_root)
    attrs = json.loads((synthetic_root / "attributes.json").read_text())
    assert len(excluded) == len(attrs["benchmark"]) + len(attrs["webperson"])
    people = sample_identities(300, 3, stream="generic-identities", exclude=excluded)
    for person in people:
        for key in excluded:
            assert sum(a != b for a, b in zip(person.key(), key)) >= 2
    # Excluding nothing draws the same stream: the exclusion only removes candidates.
    free = [p.key() for p in sample_identities(300, 3, stream="generic-identities")]
    kept = [p.key() for p in people]
    assert kept != free and set(kept) & set(free)
    # The default stream is untouched (the benchmark's identities per seed do not change).
    assert sample_identities(5, 3) == sample_identities(5, 3, stream="identities", exclude=())


def test_generic_corpus_is_deterministic_and_its_captions_are_true(synthetic_root):
    people, images, captions = generic_corpus(12, 5, captions_per_image=3, workers=1)
    again = generic_corpus(12, 5, captions_per_image=3, workers=2)
    assert people == again[0] and torch.equal(torch.from_numpy(images), torch.from_numpy(again[1]))
    assert captions == again[2]
    assert images.shape == (12, 128, 64, 3) and images.dtype.name == "uint8"
    colour_words = {w: name for name, (_, words) in PALETTE.items() for w in words}
    for person, caps in zip(people, captions):
        assert len(caps) == 3
        worn = {getattr(person, f) for f in DESCRIBED_FIELDS if f.endswith("_colour") and f != "hair_colour"}
        for caption in caps:
            named = {colour_words[w] for w in tokenize_caption(caption) if w in colour_words}
            assert named - worn - {person.hair_colour} == set(), (caption, person)
    # Some captions are web alt-text (no full sentence), some use the benchmark's templates.
    flat = [c for caps in captions for c in caps]
    assert any(c[0].islower() for c in flat) and any(c.endswith(".") for c in flat)


# --------------------------------------------------------------------------- the file


@pytest.fixture(scope="module")
def made(synthetic_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("backbones")
    settings, exclude = backbone.settings_for(synthetic_root, **TINY)
    path, record = backbone.make_backbone(settings, cache, exclude=exclude)
    return settings, exclude, cache, path, record


def test_backbone_file_has_openai_keys_and_loads_like_openai_weights(made, caplog):
    settings, exclude, _, path, record = made
    assert record["trained"] and path.name == settings.file_name()
    state = torch.load(path, weights_only=True)
    assert {re.sub(r"resblocks\.\d+\.", "resblocks.N.", k) for k in state} == _openai_keys()
    assert 0 < float(state["logit_scale"]) <= math.log(100)
    with caplog.at_level(logging.INFO, logger="model.clip"):
        model = build_clip(str(path), image_size=settings.image_size)
    assert "ignoring logit_scale" in caplog.text
    # The same weights as the trainer's, trained again from the same corpus.
    images, ids = backbone.corpus_tensors(settings, exclude, backbone.Tokenizer())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the training's own count (settings.threads = 1)
    try:
        trained, logit_scale, history = backbone.train_backbone(settings, images, ids)
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(threads)
    assert history == record["history"] and torch.equal(logit_scale, state["logit_scale"])
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # model.clip.pretrained=<file> with the tiny preset: the config path GA-DMS pretraining takes.
    cfg = load_config(str(backbone.CONFIG), [f"model.clip.pretrained={path}"])
    from_config = build_clip_from_config(cfg.model.clip)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in from_config.state_dict().items())


def test_cache_hit_and_another_file_for_other_settings(made, monkeypatch):
    settings, exclude, cache, path, _ = made
    before = path.read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the backbone is cached")

    monkeypatch.setattr(backbone, "train_backbone", no_training)
    again, record = backbone.make_backbone(settings, cache, exclude=exclude)
    assert again == path and not record["trained"] and path.read_bytes() == before
    for changed in (dict(seed=1), dict(epochs=2), dict(images=64), dict(threads=2)):
        other = backbone.BackboneSettings(**{**settings.to_dict(), "image_size": settings.image_size,
                                             "render_size": settings.render_size, **changed})
        assert other.file_name() != path.name
    # Other data to leave out is another setting too.
    assert backbone.settings_for(None, **TINY)[0].file_name() != path.name
    with pytest.raises(ValueError, match="excluded"):
        backbone.make_backbone(settings, cache, exclude=exclude[:-1])


def test_concurrent_makers_train_once(synthetic_root, tmp_path, monkeypatch):
    settings, exclude = backbone.settings_for(synthetic_root, **{**TINY, "images": 32})
    calls = []
    real = backbone.train_backbone

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone, "train_backbone", counted)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        backbone.make_backbone(settings, tmp_path, exclude=exclude))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2
    assert results[0][0] == results[1][0] and sorted(r[1]["trained"] for r in results) == [False, True]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(
        [settings.file_name(), settings.file_name().replace(".pt", ".json")])


def test_tool_reports_zero_shot_and_noise_detection(made, synthetic_root, tmp_path, capsys):
    settings, _, cache, path, _ = made
    out = tmp_path / "tiny_clip.pt"
    argv = ["--data", str(synthetic_root), "--cache-dir", str(cache), "--out", str(out), "--images", "48",
            "--batch-size", "16", "--epochs", "1"]
    # The tool's own defaults (captions, warm-up) differ from TINY: a new file, trained here.
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretrained backbone (zero-shot), test t2i" in printed and "trained in" in printed
    assert "clean caption closer to the image than its corrupted version: all " in printed
    assert "GASS on the last 2 of 4 text layers" in printed
    for scorer in ("gass", "css", "occlusion", "random"):
        assert re.search(rf"^{scorer} +[01]\.\d{{3}} ", printed, re.MULTILINE), printed
    assert out.is_file()
    assert tool.main(argv + ["--no-eval"]) == 0  # reused, and the same --out is fine
    printed = capsys.readouterr().out
    assert "reused" in printed and "zero-shot" not in printed
    other = tmp_path / "mine.pt"
    other.write_bytes(b"not yours to replace")
    assert tool.main([*argv[:4], "--out", str(other), *argv[6:], "--no-eval"]) == 2
    assert "exists and is not this backbone" in capsys.readouterr().err
    assert other.read_bytes() == b"not yours to replace"
    assert tool.main(["--data", str(tmp_path / "nowhere"), "--cache-dir", str(cache)]) == 2
    assert tool.main(["--epochs", "0", "--cache-dir", str(cache), "--images", "48",
                      "--batch-size", "16"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_persons_of_the_corpus_are_valid_attributes():
    people, _, _ = generic_corpus(6, 0, workers=1)
    assert all(PersonAttributes.from_dict(p.to_dict()) == p for p in people)
