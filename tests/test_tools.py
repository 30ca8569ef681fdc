"""Evaluation, retrieval, visualisation and table tools: test, search, visualize_gass, visualize_retrieval,
plot_curves, make_tables.

One tiny model is trained once for the module (a few steps on the synthetic
corpus); the tests check the tools against independent computations with the
same model (the Evaluator's features, `token_scores`, the masking functions),
not against accuracy numbers.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset
from datasets.bases import open_image
from datasets.masking import informative_mask, noise_mask
from datasets.transforms import build_transforms
from model.tokenizer import Tokenizer
from processor import noise_detection, retrieval_figure
from processor.evaluate import build_evaluator
from processor.inference import load_for_evaluation
from tests.conftest import REPO, load_tool
from utils.cli import one_line
from utils.config import load_config
from utils.output_paths import OutputPathError, check_output_path, unwritable_reason
from utils.plots import collect_curves
from utils.run_lock import RunDirLock, RunDirUnusableError
from utils.visualize import GREEN, GREY, RED, save_png, score_colour

FINETUNE = str(REPO / "configs" / "demo" / "tiny_finetune.yaml")

search = load_tool("search")
test_tool = load_tool("test")
visualize_gass = load_tool("visualize_gass")
visualize_retrieval = load_tool("visualize_retrieval")
plot_curves = load_tool("plot_curves")
make_tables = load_tool("make_tables")


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A tiny model fine-tuned for a few steps (SDM only: the cheapest loss that shapes retrieval)."""
    threads = torch.get_num_threads()
    # One intra-op thread: on a shared 2-core machine two spinning OpenMP threads are several times slower.
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("tools_run")
    try:
        train = load_tool("train")
        assert train.main(["--config", FINETUNE, f"data.root={synthetic_root}", f"output_dir={run}",
                           "data.batch_size=32", "data.test_batch_size=64", "log_period=100", "solver.epochs=2",
                           "train.max_steps=3", "solver.warmup_epochs=0", "solver.lr=3e-4", "solver.eps=1e-8",
                           "solver.lr_factor=1.0", "model.loss_names=sdm", "masking.mlm=none",
                           "data.img_aug=false"]) == 0
        yield run
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(trained, synthetic_root):
    """The trained model, its config, the test split and the Evaluator's features of it."""
    cfg = load_config(str(trained / "config.yaml"), ["model.clip.pretrained="])
    model = load_for_evaluation(cfg, str(trained / "best_CUHK-PEDES.pth")).eval()
    split = build_dataset("CUHK-PEDES", str(synthetic_root)).test
    feats = build_evaluator(cfg, {"CUHK-PEDES": split}, "cpu").extract(model, split)
    sim = feats["text_feats"] @ feats["image_feats"].T
    return {"cfg": cfg, "model": model, "split": split, "feats": feats, "sim": sim}


def best_query(ref) -> int:
    """The test caption whose best correct image beats the best wrong one by the widest margin."""
    split, sim = ref["split"], ref["sim"]
    same = torch.as_tensor(split.caption_pids)[:, None] == torch.as_tensor(split.image_pids)[None, :]
    margin = sim.masked_fill(~same, -2).max(1).values - sim.masked_fill(same, -2).max(1).values
    q = int(margin.argmax())
    assert margin[q] > 0, "no test caption is ranked correctly at all"
    return q


def not_blank(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10, f"{path} looks blank"
    return pixels


# --------------------------------------------------------------------------- search


def test_search_top1_is_the_caption_identity_and_matches_evaluator(trained, reference, synthetic_root, tmp_path):
    split, sim = reference["split"], reference["sim"]
    q = best_query(reference)
    out = tmp_path / "hits.json"
    grid = tmp_path / "grid.png"
    assert search.main(["--checkpoint", str(trained / "best_CUHK-PEDES.pth"), "--dataset", "CUHK-PEDES",
                        "--root", str(synthetic_root), "--query", split.captions[q], "--topk", "5",
                        "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--grid", str(grid)]) == 0
    hits = json.loads(out.read_text())[0]["results"]
    assert hits[0]["pid"] == int(split.caption_pids[q])
    assert os.path.basename(hits[0]["path"]).startswith(f"{int(split.caption_pids[q]):05d}_")
    order = torch.sort(sim[q], descending=True, stable=True).indices[:5].tolist()
    assert [h["path"] for h in hits] == [split.img_paths[j] for j in order]
    np.testing.assert_allclose([h["score"] for h in hits], sim[q, order].numpy(), atol=1e-5)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    not_blank(grid)


def test_search_gallery_cache_is_written_and_reused(trained, reference, synthetic_root, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    args = ["--checkpoint", str(trained / "best_CUHK-PEDES.pth"), "--dataset", "CUHK-PEDES", "--root",
            str(synthetic_root), "--query", "a woman in a red coat", "--query", "a man with a black backpack",
            "--topk", "4", "--cache-dir", str(cache)]
    assert search.main([*args, "--json", str(tmp_path / "first.json")]) == 0
    first_out = capsys.readouterr().out
    assert "embedded 24 gallery images" in first_out and "using cached" not in first_out
    assert len(list(cache.glob("gallery-*.npz"))) == 1

    def no_embedding(*a, **k):
        raise AssertionError("the gallery was embedded again")

    monkeypatch.setattr(search, "embed_images", no_embedding)
    assert search.main([*args, "--json", str(tmp_path / "second.json")]) == 0
    assert "using cached gallery features (24 images)" in capsys.readouterr().out
    assert json.loads((tmp_path / "first.json").read_text()) == json.loads((tmp_path / "second.json").read_text())
    # The cached features are the Evaluator's image features.
    with np.load(next(cache.glob("gallery-*.npz"))) as data:
        np.testing.assert_allclose(data["feats"], reference["feats"]["image_feats"].numpy(), atol=1e-5)


def test_gallery_cache_key_tracks_checkpoint_files_and_size(tmp_path):
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"x" * 10)
    key = search.gallery_cache_key(str(ckpt), ["a.jpg", "b.jpg"], (64, 32), {"arch": "tiny"})
    assert key == search.gallery_cache_key(str(ckpt), ["a.jpg", "b.jpg"], (64, 32), {"arch": "tiny"})
    assert key != search.gallery_cache_key(str(ckpt), ["a.jpg", "c.jpg"], (64, 32), {"arch": "tiny"})
    assert key != search.gallery_cache_key(str(ckpt), ["a.jpg", "b.jpg"], (128, 64), {"arch": "tiny"})
    assert key != search.gallery_cache_key(str(ckpt), ["a.jpg", "b.jpg"], (64, 32), {"arch": "ViT-B/16"})
    # "ab"+"c" and "a"+"bc" must not collide.
    assert (search.gallery_cache_key(str(ckpt), ["ab", "c"], (64, 32), {})
            != search.gallery_cache_key(str(ckpt), ["a", "bc"], (64, 32), {}))
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert key != search.gallery_cache_key(str(ckpt), ["a.jpg", "b.jpg"], (64, 32), {"arch": "tiny"})


def test_search_image_folder_ranks_like_the_evaluator(trained, reference, tmp_path):
    split, sim = reference["split"], reference["sim"]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    picks = [0, 5, 10, 20]
    for k, j in enumerate(picks):
        shutil.copy(split.img_paths[j], folder / ("sub" if k % 2 else ".") / f"img{k}.jpg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "hits.json"
    assert search.main(["--checkpoint", str(trained / "best_CUHK-PEDES.pth"), "--images", str(folder),
                        "--query", split.captions[3], "--cache-dir", str(tmp_path / "cache"),
                        "--json", str(out)]) == 0
    hits = json.loads(out.read_text())[0]["results"]
    assert len(hits) == 4 and all(h["pid"] is None for h in hits)
    expected = sorted(range(4), key=lambda k: -float(sim[3, picks[k]]))
    assert [os.path.basename(h["path"]) for h in hits] == [f"img{k}.jpg" for k in expected]
    np.testing.assert_allclose([h["score"] for h in hits], [float(sim[3, picks[k]]) for k in expected], atol=1e-5)


def test_search_errors_are_clear(trained, tmp_path, capsys):
    ckpt = str(trained / "best_CUHK-PEDES.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(ckpt, lonely / "model.pth")
    cases = [
        (["--checkpoint", ckpt, "--images", str(tmp_path / "nope"), "--query", "q"], "does not exist"),
        (["--checkpoint", ckpt, "--images", str(empty), "--query", "q"], f"--images folder {empty} is empty"),
        (["--checkpoint", ckpt, "--images", str(texts), "--query", "q"], "no images (*.jpg"),
        (["--checkpoint", str(tmp_path / "missing.pth"), "--dataset", "CUHK-PEDES", "--query", "q"],
         f"checkpoint {tmp_path / 'missing.pth'} not found"),
        (["--checkpoint", str(lonely / "model.pth"), "--dataset", "CUHK-PEDES", "--query", "q"],
         "no config.yaml next to checkpoint"),
        (["--checkpoint", ckpt, "--dataset", "CUHK", "--root", str(tmp_path), "--query", "q"],
         "unknown dataset 'CUHK'"),
        (["--checkpoint", ckpt, "--dataset", "CUHK-PEDES", "--query", "  "], "--query number 1 is empty"),
    ]
    for argv, message in cases:
        assert search.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)


def test_search_refuses_bad_arguments_before_any_work(tmp_path, capsys):
    # The checkpoint does not exist: each refusal must come before it is looked for.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    base = ["--checkpoint", str(tmp_path / "missing.pth"), "--images", str(tmp_path), "--query", "a man"]
    cases = [
        (["--thumb-height", "0", "--grid", str(tmp_path / "g.png")], "--thumb-height must be between 16 and 1024"),
        (["--thumb-height", "5000"], "got 5000"),
        (["--topk", "0"], "--topk must be >= 1"),
        (["--query", "&nbsp;"], "--query number 2 ('&nbsp;') has no text once cleaned"),
        (["--json", str(blocker / "r.json")], f"--json {blocker / 'r.json'} cannot be written: {blocker} is a file"),
        (["--grid", str(tmp_path)], f"--grid {tmp_path} cannot be written: {tmp_path} is a folder"),
    ]
    for extra, message in cases:
        assert search.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


# --------------------------------------------------------------------------- test


@pytest.fixture
def keep_threads():
    """Restore torch's thread count, which the tools set for the whole process."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_test_tool_prints_one_table_logs_its_threads_and_records_only_when_asked(trained, synthetic_root, tmp_path,
                                                                                 capsys, keep_threads):
    argv = ["--config", str(trained / "config.yaml"), "--checkpoint", str(trained / "best_CUHK-PEDES.pth"),
            f"data.root={synthetic_root}", "data.test_batch_size=64"]
    history = (trained / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert test_tool.main(argv) == 0
    out, err = capsys.readouterr()
    assert (out + err).count("mINP") == 1 and "CUHK-PEDES t2i" in out  # one table, printed
    assert "torch threads: " in err
    assert (trained / "metrics.jsonl").read_text() == history  # nothing recorded unasked

    run = tmp_path / "run"
    assert test_tool.main(["--record", *argv, f"output_dir={run}"]) == 0
    assert f"recorded in {run / 'metrics.jsonl'}" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["dataset"], r["split"], r["task"]) for r in records] == [("test", "CUHK-PEDES", "test", "t2i")]
    assert records[0]["checkpoint"] == str(trained / "best_CUHK-PEDES.pth")


def test_test_tool_checks_the_record_path_first_and_drops_no_record(trained, synthetic_root, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = ["--config", str(trained / "config.yaml"), "--checkpoint", str(tmp_path / "absent.pth"),
            f"data.root={synthetic_root}"]
    assert test_tool.main(["--record", *argv, f"output_dir={tmp_path / 'file' / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --record (output_dir=") and "is a file, not a folder" in err
    with pytest.raises(SystemExit) as exc:
        test_tool.main(["--no-record", *argv])
    assert exc.value.code == 2


def test_output_path_checks(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert unwritable_reason(tmp_path / "new" / "deeper" / "out.json") is None
    assert unwritable_reason(tmp_path / "new", folder=True) is None
    assert unwritable_reason(tmp_path, folder=True) is None
    assert unwritable_reason(blocker) is None  # an existing file may be replaced (the tools ask first)
    assert unwritable_reason(blocker / "a" / "b.png") == f"{blocker} is a file, not a folder"
    assert unwritable_reason(blocker, folder=True) == f"{blocker} is a file, not a folder"
    assert unwritable_reason(tmp_path) == f"{tmp_path} is a folder"
    with pytest.raises(OutputPathError, match=rf"^--out {blocker}/x cannot be written: {blocker} is a file, not a "
                                              "folder; choose another path$"):
        check_output_path(blocker / "x", "--out")
    with pytest.raises(OutputPathError, match=f"cannot write {blocker}/g.png: {blocker} is a file"):
        save_png(Image.new("RGB", (2, 2)), blocker / "g.png")


def test_run_folder_under_a_file_is_refused_naming_output_dir(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(RunDirUnusableError, match=rf"^output_dir {blocker}/run cannot be used: {blocker} is a file, "
                                                  "not a folder; choose another output_dir$"):
        RunDirLock(blocker / "run").acquire()


def test_error_messages_become_one_line():
    assert one_line("Error(s) in loading state_dict for CLIP:\n\tsize mismatch for a\n\tsize mismatch for b") \
        == "Error(s) in loading state_dict for CLIP: size mismatch for a; size mismatch for b"
    assert one_line("  one  \n\n two\n") == "one; two"
    assert one_line("") == ""


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "tools").glob("*.py") if p.stem != "common"))
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        load_tool(name).main(["--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


# --------------------------------------------------------------------------- visualize_retrieval


def test_visualize_retrieval_frames_match_correctness(trained, reference, synthetic_root, tmp_path, capsys):
    split, sim = reference["split"], reference["sim"]
    queries = [best_query(reference), 7]
    out = tmp_path / "retrieval.png"
    assert visualize_retrieval.main(["--checkpoint", str(trained / "best_CUHK-PEDES.pth"), "--dataset", "CUHK-PEDES",
                                     "--root", str(synthetic_root), "--query-index", *map(str, queries),
                                     "--thumb-height", "96", "--out", str(out)]) == 0
    assert "first correct at rank" in capsys.readouterr().out
    layout = retrieval_figure.make_layout((64, 32), 96, 10)
    pixels = not_blank(out)
    assert pixels.shape[:2] == (layout.height(2), layout.width)
    seen = set()
    for row, q in enumerate(queries):
        order = torch.sort(sim[q], descending=True, stable=True).indices[:10].tolist()
        for col, j in enumerate(order):
            correct = int(split.image_pids[j]) == int(split.caption_pids[q])
            x0, y0, x1, y1 = layout.frame_box(row, col)
            for x, y in ((x0 + 1, (y0 + y1) // 2), ((x0 + x1) // 2, y1 - 2)):
                assert tuple(pixels[y, x].astype(int)) == (GREEN if correct else RED), (row, col, correct)
            seen.add(correct)
        x0, y0, _, y1 = layout.frame_box(row, -1)
        assert tuple(pixels[(y0 + y1) // 2, x0 + 1].astype(int)) == GREY
    assert seen == {True, False}


def test_visualize_retrieval_rejects_bad_query_index(trained, synthetic_root, tmp_path, capsys):
    assert visualize_retrieval.main(["--checkpoint", str(trained / "best_CUHK-PEDES.pth"), "--dataset", "CUHK-PEDES",
                                     "--root", str(synthetic_root), "--query-index", "48",
                                     "--out", str(tmp_path / "x.png")]) == 2
    assert "--query-index 48 out of range: the split has 48 captions" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- visualize_gass


def _word_set(tokenizer, text):
    tokens = noise_detection.token_pieces(tokenizer, tokenizer.tokenize(text)[0].tolist())
    return {"".join(tokens[i].text for i in w) for w in noise_detection.group_words(tokens)}


def test_token_pieces_and_corrupted_positions():
    tok = Tokenizer()
    ids = tok.tokenize("A man in a red t-shirt, carrying a rucksack.")[0].tolist()
    tokens = noise_detection.token_pieces(tok, ids)
    words = ["".join(tokens[i].text for i in w) for w in noise_detection.group_words(tokens)]
    assert words == ["a", "man", "in", "a", "red", "t", "-", "shirt", ",", "carrying", "a", "rucksack", "."]
    assert [t.position for t in tokens] == list(range(1, ids.index(tok.eot_id)))
    assert "".join(t.text + (" " if t.word_end else "") for t in tokens).split() == words

    noisy = tok.tokenize("A man in a blue coat.")[0].tolist()
    assert noise_detection.corrupted_positions(tok, noisy, "A man in a red coat.") == {5}
    inserted = tok.tokenize("The photo was taken at noon. A man in a red coat.")[0].tolist()
    assert noise_detection.corrupted_positions(tok, inserted, "A man in a red coat.") == set(range(1, 8))
    # Without the clean caption the listed words are marked.
    assert noise_detection.corrupted_positions(tok, noisy, None, ["blue"]) == {5}


def test_visualize_gass_scores_masks_and_noise_marks(trained, reference, synthetic_root, tmp_path):
    out = tmp_path / "gass.png"
    args = visualize_gass.parse_args(["--checkpoint", str(trained / "best_CUHK-PEDES.pth"), "--dataset", "WebPerson",
                                      "--root", str(synthetic_root), "--annotation", "annotations.json",
                                      "--captions-from", "noise_report", "--num", "3", "--seed", "7",
                                      "--width", "900", "--thumb-height", "96", "--out", str(out)])
    views = visualize_gass.run(args)
    pixels = not_blank(out)
    assert pixels.shape[1] == 900 and pixels.shape[0] > 3 * 96

    report = json.loads((synthetic_root / "noise_report.json").read_text())["webperson"]
    web = build_dataset("WebPerson", str(synthetic_root), annotation="annotations.json").train
    tok = Tokenizer()
    assert len(views) == 3
    for view in views:
        entry = report[str(view.index)]  # WebPerson report keys are sample indices
        assert view.noise == entry and view.caption == entry["text"] == web[view.index][3]
        marked = {"".join(t.text for t in view.tokens if t.corrupted and t.position in span)
                  for span in _word_spans(view.tokens)}
        for word in entry["words"]:
            assert _word_set(tok, word) <= marked, (word, marked)

    # Scores are the model's token_scores of exactly these captions and images, as one batch.
    model = reference["model"]
    transform = build_transforms((64, 32), is_train=False)
    images = torch.stack([transform(open_image(v.image_path)) for v in views])
    ids = tok.tokenize([v.caption for v in views])
    with torch.no_grad():
        feats = model.encode_image(images)
    scores = model.token_scores(feats, ids)
    generator = torch.Generator().manual_seed(7)
    noisy = noise_mask(ids, scores, generator)
    _, labels = informative_mask(ids, scores, generator)
    for row, view in enumerate(views):
        pos = [t.position for t in view.tokens]
        np.testing.assert_allclose([t.score for t in view.tokens], scores[row, pos].numpy(), atol=1e-5)
        assert [t.noise_masked for t in view.tokens] == (noisy[row, pos] != ids[row, pos]).tolist()
        assert [t.mlm_selected for t in view.tokens] == (labels[row, pos] != 0).tolist()
    assert any(t.mlm_selected for v in views for t in v.tokens)


def _word_spans(tokens):
    return [{tokens[i].position for i in w} for w in noise_detection.group_words(tokens)]


def test_caption_source_and_noise_report_matching(synthetic_root):
    bench = build_dataset("CUHK-PEDES", str(synthetic_root))
    test = noise_detection.CaptionSource(bench, "test")
    for i in (0, 7, 47):
        caption, path, pid = test.get(i)
        assert caption == bench.test.captions[i] and pid == int(bench.test.caption_pids[i])
        assert os.path.basename(path).startswith(f"{pid:05d}_00")  # first gallery image of the identity

    web = noise_detection.CaptionSource(build_dataset("WebPerson", str(synthetic_root), annotation="shards"), "train")
    report = noise_detection.load_noise_report(str(synthetic_root / "WebPerson"))  # found in the parent folder
    section = report["webperson"]
    found = noise_detection.match_noise_entries(report, "WebPerson", web)
    assert found == {int(k): e for k, e in section.items()}
    # A key that does not line up with the sample order is found by its caption text.
    key, entry = next(iter(section.items()))
    moved = {"webperson": {"100000": entry}, "benchmark": {}}
    assert noise_detection.match_noise_entries(moved, "WebPerson", web) == {int(key): entry}
    assert noise_detection.match_noise_entries(report, "CUHK-PEDES", test) == {}


def test_visualize_gass_errors(trained, synthetic_root, tmp_path, capsys):
    base = ["--checkpoint", str(trained / "best_CUHK-PEDES.pth"), "--root", str(synthetic_root),
            "--out", str(tmp_path / "g.png")]
    assert visualize_gass.main([*base, "--dataset", "CUHK-PEDES", "--split", "test", "--index", "999"]) == 2
    assert "--index 999 out of range: the test split has 48 captions" in capsys.readouterr().err
    # The benchmark of the fixture corpus has no corrupted captions.
    assert visualize_gass.main([*base, "--dataset", "CUHK-PEDES", "--captions-from", "noise_report"]) == 2
    assert "no caption of the train split is listed in noise_report.json" in capsys.readouterr().err


@pytest.mark.parametrize("tool", [visualize_gass, visualize_retrieval])
def test_visualize_tools_check_outputs_before_loading(tool, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    base = ["--checkpoint", str(tmp_path / "missing.pth"), "--dataset", "CUHK-PEDES"]
    assert tool.main([*base, "--out", str(blocker / "f.png")]) == 2
    assert f"--out {blocker / 'f.png'} cannot be written: {blocker} is a file" in capsys.readouterr().err
    assert tool.main([*base, "--out", str(tmp_path / "f.png"), "--thumb-height", "0"]) == 2
    assert "--thumb-height must be between" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]


# --------------------------------------------------------------------------- plot_curves


def test_plot_curves_of_the_trained_run(trained, tmp_path, capsys):
    """A real run's records: the figure is written and its curves are the records' values (the figure's
    lines themselves are checked in tests/test_plots.py)."""
    out = tmp_path / "curves.png"
    assert plot_curves.main(["--run", str(trained), "--out", str(out), "--figsize", "8x10", "--dpi", "80"]) == 0
    with Image.open(out) as img:
        assert img.size == (640, 800)
    not_blank(out)
    assert f"saved {out} (png)" in capsys.readouterr().out

    records = [json.loads(line) for line in open(trained / "metrics.jsonl")]
    curves = collect_curves(records, "run")
    train = [r for r in records if r["type"] == "train"]
    assert curves.losses["sdm_loss"] == {r["epoch"]: r["sdm_loss"] for r in train}
    assert curves.lr == {r["epoch"]: r["lr"] for r in train}
    assert set(curves.retrieval["R1"]) == {"CUHK-PEDES val", "CUHK-PEDES test"}
    for metric in ("R1", "mAP"):
        assert curves.retrieval[metric]["CUHK-PEDES test"] == {
            r["epoch"]: r[metric] for r in records if r["type"] == "eval" and r["split"] == "test"}


def test_plot_curves_without_eval_records_and_bad_lines(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"type": "train", "epoch": e, "loss": 5.0 - e, "sdm_loss": 4.0 - e, "mlm_loss": 1.0, "lr": 1e-4}
             for e in range(3)]
    lines.append({"type": "train", "epoch": 2, "loss": 9.0, "sdm_loss": 1.5, "mlm_loss": 0.5, "lr": 1e-5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert plot_curves.main(["--run", str(run), "--out", str(blocker / "c.png")]) == 2
    assert f"--out {blocker / 'c.png'} cannot be written: {blocker} is a file" in capsys.readouterr().err
    out = tmp_path / "c.png"
    assert plot_curves.main(["--run", str(run), "--out", str(out)]) == 0
    not_blank(out)
    curves = collect_curves(lines, "run")
    assert curves.retrieval == {}
    assert list(curves.losses) == ["loss", "mlm_loss", "sdm_loss"]
    assert curves.losses["loss"] == {0: 5.0, 1: 4.0, 2: 9.0}  # the re-logged epoch replaces the first

    (run / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n{not json\n")
    assert plot_curves.main(["--run", str(run), "--out", str(out)]) == 2
    assert f"{run / 'metrics.jsonl'}:2: not valid JSON" in capsys.readouterr().err
    assert plot_curves.main(["--run", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "run directory" in capsys.readouterr().err
    assert plot_curves.main(["--run", str(run), "--out", str(out), "--figsize", "300x300"]) == 2
    assert "--figsize must be between 2x2 and 100x100 inches, got '300x300'" in capsys.readouterr().err


def test_score_colours():
    assert score_colour(0.0) == (255, 255, 255) and score_colour(1.0) == (103, 0, 13)
    darkness = [sum(score_colour(s / 10)) for s in range(11)]
    assert all(a > b for a, b in zip(darkness, darkness[1:]))


# --------------------------------------------------------------------------- make_tables


def _write_run(path, task, records):
    path.mkdir()
    if task:
        (path / "config.yaml").write_text(f"task: {task}\noutput_dir: {path}\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _eval(epoch, dataset, split, r1, select="val", **extra):
    metrics = {"R5": r1 + 10, "R10": r1 + 20, "mAP": r1 - 5, "mINP": r1 - 10, **extra}
    return {"type": "eval", "epoch": epoch, "dataset": dataset, "split": split, "task": "t2i", "R1": r1,
            "selection_split": select, **metrics}


PAPER_T1 = [
    "| IRRA (no pretraining) | paper | 73.38 | 89.93 | 93.71 | 66.10 | – | 63.46 | 80.25 | 85.82 | 38.06 | – "
    "| 60.20 | 81.30 | 88.20 | 47.17 | – |",
    "| NAM (MLLM4Text-ReID) | paper | 76.82 | 91.16 | 94.46 | 69.55 | – | 67.05 | 82.16 | 87.33 | 41.51 | – "
    "| 68.50 | 87.15 | 92.10 | 53.02 | – |",
    "| GA-DMS, WebPerson 1M | paper | 77.02 | 91.28 | 94.58 | 69.65 | – | 69.07 | 83.26 | 87.64 | 41.91 | – "
    "| 70.30 | 88.00 | 92.85 | 54.89 | – |",
    "| GA-DMS, WebPerson 5M | paper | 77.60 | 91.40 | 94.78 | 69.82 | – | 69.51 | 83.47 | 87.67 | 42.30 | – "
    "| 71.25 | 87.25 | 92.90 | 55.43 | – |",
]
PAPER_T2 = [
    "| none (plain CLIP) | paper | 12.65 | 11.15 | 6.67 | 2.51 | 13.45 | 10.31 |",
    "| GA-DMS 0.1M | paper | 58.95 | 52.77 | 38.18 | 19.70 | 47.10 | 36.68 |",
    "| GA-DMS 1M | paper | 66.26 | 58.54 | 51.99 | 28.81 | 55.35 | 40.57 |",
    "| GA-DMS 5M | paper | 68.34 | 60.22 | 54.64 | 30.68 | 57.60 | 42.00 |",
]


def test_make_tables_selects_test_metrics_at_the_best_epoch(tmp_path, capsys):
    ft = [{"type": "train", "epoch": 0, "loss": 3.0}]
    # CUHK-PEDES selects on val: best val R1 40 first reached at epoch 1 (the tie at epoch 3 does not replace it);
    # epoch 2's first val record (R1 90) was re-logged after a resume with R1 10.
    for epoch, (val, test) in enumerate([(20, 11), (40, 33), (90, 99), (40, 44)]):
        ft += [_eval(epoch, "CUHK-PEDES", "val", val), _eval(epoch, "CUHK-PEDES", "test", test, mINP=7.5)]
    ft.append(_eval(2, "CUHK-PEDES", "val", 10))
    # ICFG-PEDES has no val split: the trainer selects on test.
    ft += [_eval(e, "ICFG-PEDES", "test", r1, select="test") for e, r1 in enumerate([5, 27, 26])]
    ft.append({"type": "test", "checkpoint": "x.pth", "dataset": "RSTPReid", "split": "val", "task": "t2i",
               "R1": 1, "R5": 2, "R10": 3, "mAP": 4, "mINP": 5})
    _write_run(tmp_path / "ft_run", "finetune", ft)
    only_test = [{"type": "test", "checkpoint": f"/r/{name}.pth", "dataset": "RSTPReid", "split": "test",
                  "task": "t2i", "R1": r1, "R5": 70.0, "R10": 80.0, "mAP": 50.0, "mINP": 30.0}
                 for name, r1 in (("old", 1.0), ("best_RSTPReid", 61.25))]
    _write_run(tmp_path / "tested", "finetune", only_test)
    pre = [_eval(e, "CUHK-PEDES", s, r1) for e, (s, r1) in enumerate([("val", 30), ("test", 31)])]
    pre += [_eval(1, "CUHK-PEDES", "val", 50), _eval(0, "CUHK-PEDES", "test", 12.5)]
    _write_run(tmp_path / "pre_run", "pretrain", pre)

    out = tmp_path / "tables" / "t.md"
    assert make_tables.main(["--runs", str(tmp_path / "ft_run"), str(tmp_path / "tested"), str(tmp_path / "pre_run"),
                             "--out", str(out)]) == 0
    text = out.read_text()
    lines = text.splitlines()
    for row in PAPER_T1 + PAPER_T2:
        assert row in lines
    dash5 = " | ".join(["–"] * 5)
    assert f"| ft_run | ours | 33.00 | 43.00 | 53.00 | 28.00 | 7.50 | 27.00 | 37.00 | 47.00 | 22.00 | 17.00 | {dash5} |" \
        in lines
    assert f"| tested | ours | {dash5} | {dash5} | 61.25 | 70.00 | 80.00 | 50.00 | 30.00 |" in lines
    # pre_run: best val R1 (50) is at epoch 1 -> that epoch's test record (R1 31, mAP 26), not epoch 0's.
    assert "| pre_run | ours | 31.00 | 26.00 | – | – | – | – |" in lines
    assert "- ft_run (finetune), CUHK-PEDES: test at epoch 1 (best val R1 40.00)" in lines
    assert "- ft_run (finetune), ICFG-PEDES: test at epoch 1 (best test R1 27.00)" in lines
    assert "- tested (finetune), RSTPReid: tools/test.py record (best_RSTPReid.pth)" in lines

    assert make_tables.main(["--runs", str(tmp_path / "ft_run"), "--format", "text"]) == 0
    printed = capsys.readouterr().out
    assert "| ft_run                |   ours |         33.00 |" in printed
    assert "73.38" in printed and "pre_run" not in printed


def test_make_tables_errors(tmp_path, capsys):
    _write_run(tmp_path / "noconfig", None, [_eval(0, "CUHK-PEDES", "val", 1)])
    assert make_tables.main(["--runs", str(tmp_path / "noconfig")]) == 2
    assert "config.yaml not found: cannot tell a pretraining run" in capsys.readouterr().err
    assert make_tables.main(["--runs", str(tmp_path / "noconfig"), "--task", "pretrain"]) == 0
    assert "| noconfig | ours |" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("task: finetune\n")
    (bad / "metrics.jsonl").write_text('{"type": "train"}\n[1, 2]\n')
    assert make_tables.main(["--runs", str(bad)]) == 2
    assert f"{bad / 'metrics.jsonl'}:2: expected a JSON object, got list" in capsys.readouterr().err
    assert make_tables.main(["--runs", str(tmp_path / "missing")]) == 2
    assert "run directory" in capsys.readouterr().err
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert make_tables.main(["--runs", str(tmp_path / "noconfig"), "--task", "pretrain", "--out",
                             str(blocker / "t.md")]) == 2
    assert f"--out {blocker / 't.md'} cannot be written: {blocker} is a file" in capsys.readouterr().err
