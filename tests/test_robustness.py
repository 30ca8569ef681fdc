"""tools/robustness.py: retrieval under noisy queries, on the tiny synthetic benchmark of conftest.

Two real checkpoints (a model trained for two steps and a random one) check the
table, the records, the chart, parity of the clean row with tools/test.py, that
the queries do not depend on which checkpoints are evaluated, and that each
gallery is embedded once. A bag-of-words model whose retrieval depends on the
words by construction checks that noise lowers R1 (evaluating the clean queries
at every rate would fail it).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from datasets import build_dataset
from datasets.bases import open_image
from datasets.text_noise import NOISE_KINDS
from datasets.transforms import build_transforms
from model.build import build_model
from model.tokenizer import Tokenizer
from processor.inference import load_for_evaluation
from tests.conftest import REPO, load_tool
from utils.config import load_config

FINETUNE = str(REPO / "configs" / "demo" / "tiny_finetune.yaml")
METRICS = ("R1", "R5", "R10", "mAP", "mINP")

robustness = load_tool("robustness")
test_tool = load_tool("test")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    # One intra-op thread: on a shared 2-core machine two spinning OpenMP threads are several times slower.
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(synthetic_root, tmp_path_factory, one_thread):
    """{"trained": a tiny model after two SDM steps, "random": a randomly initialised one}, and its config."""
    run = tmp_path_factory.mktemp("robustness_run")
    train = load_tool("train")
    assert train.main(["--config", FINETUNE, f"data.root={synthetic_root}", f"output_dir={run}",
                       "data.batch_size=32", "log_period=100", "solver.epochs=1", "train.max_steps=2",
                       "solver.warmup_epochs=0", "solver.lr=3e-4", "solver.eps=1e-8", "solver.lr_factor=1.0",
                       "model.loss_names=sdm", "masking.mlm=none", "data.img_aug=false", "eval.datasets=[]"]) == 0
    cfg = load_config(str(run / "config.yaml"), [])
    torch.manual_seed(1)
    random_path = run / "random.pth"
    torch.save({"model": build_model(cfg, num_classes=0).state_dict()}, random_path)
    return {"trained": run / "last.pth", "random": random_path, "config": run / "config.yaml"}


def base_argv(checkpoints, synthetic_root, out, *paths):
    argv = ["--config", str(checkpoints["config"]), f"data.root={synthetic_root}", "data.test_batch_size=16",
            "eval.datasets=[CUHK-PEDES]", "--out", str(out)]
    for path in paths:
        argv += ["--checkpoint", str(path)]
    return argv


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tables_records_chart_and_the_clean_row_equals_test_py(checkpoints, synthetic_root, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "out"
    embedded = {}

    def counting_loader(cfg, path, trust=False):
        # Count the gallery images each model embeds: once per checkpoint, not once per noise condition.
        model = load_for_evaluation(cfg, path, trust=trust)
        encode = model.encode_image

        def encode_image(images):
            embedded[path] = embedded.get(path, 0) + len(images)
            return encode(images)

        model.encode_image = encode_image
        return model

    monkeypatch.setattr(robustness, "load_for_evaluation", counting_loader)
    kinds, rates = ["mix", "drop", "swap", "clause", "typo"], [0.0, 0.4]
    options = ["--rates", "0.4", "0", "--kinds", *kinds, "--seed", "3"]
    argv = base_argv(checkpoints, synthetic_root, out, checkpoints["trained"], checkpoints["random"])
    assert robustness.main([*argv, *options]) == 0
    printed = capsys.readouterr().out

    split = build_dataset("CUHK-PEDES", str(synthetic_root)).test
    assert embedded == {str(checkpoints["trained"]): len(split.img_paths),
                        str(checkpoints["random"]): len(split.img_paths)}

    # One table per checkpoint, after a table of the words changed per condition.
    assert printed.count("mINP") == 2 and printed.count("words changed") == 1
    assert "last (" in printed and "random (" in printed
    assert "|      task      | noise  | rate |   R1  |   R5  |  R10  |  mAP  |  mINP |" in printed

    records = read_records(out / "metrics.jsonl")
    conditions = [("none", 0.0)] + [(k, r) for k in kinds for r in rates if r > 0]
    assert [(r["model"], r["noise"], r["rate"]) for r in records] == \
        [(m, n, r) for m in ("last", "random") for n, r in conditions]
    for record in records:
        assert record["type"] == "robustness" and record["dataset"] == "CUHK-PEDES" and record["task"] == "t2i"
        assert record["split"] == "test" and record["seed"] == 3 and record["queries"] == len(split.captions)
        assert all(0 <= record[m] <= 100 for m in METRICS)
        assert record["changed"] == 0 if record["noise"] == "none" else 0.2 < record["changed"] < 0.6
    # The same corrupted queries for both models.
    by_model = {m: [r for r in records if r["model"] == m] for m in ("last", "random")}
    assert [r["changed"] for r in by_model["last"]] == [r["changed"] for r in by_model["random"]]
    assert by_model["last"] != by_model["random"]
    # ... and the results of a model do not depend on the other checkpoints evaluated with it.
    assert robustness.main([*base_argv(checkpoints, synthetic_root, tmp_path / "alone", checkpoints["random"]),
                            *options]) == 0
    alone = read_records(tmp_path / "alone" / "metrics.jsonl")
    drop = ("model", "checkpoint")
    assert [{k: v for k, v in r.items() if k not in drop} for r in alone] == \
        [{k: v for k, v in r.items() if k not in drop} for r in by_model["random"]]

    # The clean row is what tools/test.py reports for the same checkpoint.
    for name, path in (("last", checkpoints["trained"]), ("random", checkpoints["random"])):
        test_run = tmp_path / f"test_{name}"
        assert test_tool.main(["--config", str(checkpoints["config"]), "--checkpoint", str(path), "--record",
                               f"data.root={synthetic_root}", "eval.datasets=[CUHK-PEDES]",
                               f"output_dir={test_run}"]) == 0
        reference = read_records(test_run / "metrics.jsonl")[0]
        clean = by_model[name][0]
        assert {m: clean[m] for m in METRICS} == {m: reference[m] for m in METRICS}

    chart = out / "robustness_CUHK-PEDES_test.png"
    assert f"chart: {chart}" in printed
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width > 600
        assert np.asarray(image.convert("L"), dtype=np.float32).std() > 10


class BagOfWords(nn.Module):
    """A retrieval model that reads words: a caption is the sum of its tokens' fixed random vectors; an image is
    the sum of the (normalised) clean captions of its identity, looked up by the image's exact pixels."""

    def __init__(self, split, image_size, dim=256):
        super().__init__()
        self.embed_dim = dim
        self.table = torch.randn(49408, dim, generator=torch.Generator().manual_seed(0))
        text = F.normalize(self.encode_text(Tokenizer().tokenize(split.captions)), dim=-1)
        transform = build_transforms(tuple(image_size), is_train=False)
        self.images = {}
        for path, pid in zip(split.img_paths, split.image_pids):
            self.images[self.key(transform(open_image(path)))] = text[torch.as_tensor(split.caption_pids == pid)].sum(0)

    @staticmethod
    def key(image: torch.Tensor) -> str:
        return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        words = (tokens > 0) & (tokens < 49406)  # not padding, SOT or EOT
        return (self.table[tokens] * words[..., None]).sum(1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.images[self.key(image)] for image in images])


def test_noise_lowers_r1_of_a_model_that_reads_the_words(checkpoints, synthetic_root, tmp_path, capsys,
                                                         monkeypatch):
    cfg = load_config(str(checkpoints["config"]), [])
    oracle = BagOfWords(build_dataset("CUHK-PEDES", str(synthetic_root)).test, cfg.model.clip.image_size)
    monkeypatch.setattr(robustness, "load_for_evaluation", lambda cfg, path, trust=False: oracle)
    out = tmp_path / "out"
    argv = base_argv(checkpoints, synthetic_root, out, checkpoints["random"])
    assert robustness.main([*argv, "--rates", "0.5", "--kinds", *NOISE_KINDS, "--format", "svg"]) == 0
    r1 = {(r["noise"], r["rate"]): r["R1"] for r in read_records(out / "metrics.jsonl")}
    # The clean row is always there; no rate that was not asked for is.
    assert sorted(r1) == sorted([("none", 0.0)] + [(kind, 0.5) for kind in NOISE_KINDS])
    assert (out / "robustness_CUHK-PEDES_test.svg").read_text().lstrip().startswith("<?xml")
    assert r1["none", 0.0] > 90
    # Irrelevant sentences add the same words to every query: this model ranks through them.
    assert r1["clause", 0.5] <= r1["none", 0.0]
    for kind in ("drop", "swap", "typo", "mix"):
        assert r1[kind, 0.5] < r1["none", 0.0], kind
    capsys.readouterr()


def test_bad_arguments_are_clear_errors_before_any_work(checkpoints, synthetic_root, tmp_path, capsys):
    argv = base_argv(checkpoints, synthetic_root, tmp_path / "out", checkpoints["random"])
    for extra, message in ((["--kinds", "drop", "shuffle"], "--kinds: unknown kind 'shuffle'; valid kinds: drop, "
                                                            "swap, clause, typo, mix"),
                           (["--rates", "0.1", "10"], "--rates: '10' is not a fraction of the words in [0, 1]"),
                           (["--rates", "-0.1"], "--rates: '-0.1' is not a fraction"),
                           (["--rates", "abc"], "--rates: 'abc' is not a fraction"),
                           (["--format", "jpg"], "argument --format: invalid choice")):
        with pytest.raises(SystemExit) as exc:
            robustness.main([*argv, *extra])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err

    # key=value after --rates is an override, not a rate.
    args = robustness.parse_args(["--config", "c.yaml", "--checkpoint", "a.pth", "--rates", "0.1", "0.1", "seed=4",
                                  "--kinds", "typo", "drop", "typo", "data.root=x"])
    assert (args.rates, args.kinds, args.overrides) == ([0.1], ["typo", "drop"], ["seed=4", "data.root=x"])

    assert robustness.main([*argv, "--checkpoint", str(tmp_path / "absent.pth")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --checkpoint {tmp_path / 'absent.pth'}: no such file")
    (tmp_path / "words.json").write_text('{"swap_classes": {}}')
    assert robustness.main([*argv, "--words", str(tmp_path / "words.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --words: {tmp_path / 'words.json'}: missing keys")
    assert not (tmp_path / "out").exists()

    # A chart in --out that the tool did not make is never replaced.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "robustness_CUHK-PEDES_test.png").write_text("my own figure")
    argv = base_argv(checkpoints, synthetic_root, mine, checkpoints["random"])
    assert robustness.main(argv) == 2
    assert "which this tool did not make" in capsys.readouterr().err
    assert (mine / "robustness_CUHK-PEDES_test.png").read_text() == "my own figure"
    assert sorted(p.name for p in mine.iterdir()) == ["robustness_CUHK-PEDES_test.png"]

    (tmp_path / "file").write_text("")
    argv = base_argv(checkpoints, synthetic_root, tmp_path / "file" / "out", checkpoints["random"])
    assert robustness.main(argv) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
