"""WebPerson-style curation pipeline (tools/curate): every stage end to end against a local
fake server (images + OpenAI-compatible LLM/VLM), crash + resume equivalence, the export
through the WebPerson loader in all three formats, and one training step on it."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.bases import open_image
from datasets.webperson import WebPerson
from tests.curate_fixtures import (
    EXPECTED_CROPS,
    EXPECTED_REJECTIONS,
    FAILING,
    IMAGES,
    LEFTOVER_CAPTION,
    LLM_CYCLE,
    MAX_BYTES,
    ONE_ATTRIBUTE_CAPTION,
    REMINDER_MARK,
    SYNTH_INVALID,
    VLM_CYCLE,
    FakeBackend,
    FakeServer,
    fake_template,
    vlm_fill,
    write_benchmarks,
)
from tools.curate import cli
from tools.curate.detect import Box, FilterRules, build_backend
from tools.curate.embed import HashingEmbedder, build_embedder, kmeans
from tools.curate.ingest import IngestSettings, read_pairs, run_ingest
from tools.curate.net import ChatClient, ChatError, FetchError, HostLimiter, RetryPolicy, with_retries
from tools.curate.store import CRASH_ENV, RecordStore, StageError, iter_records
from tools.curate.text import parse_caption_answer, template_problem

REPO = Path(__file__).resolve().parent.parent
FAST_RETRY = ["--backoff", "0.01", "--max-backoff", "0.05"]
INGEST_OPTS = ["--workers", "8", "--per-host", "3", "--timeout", "1.0", "--retries", "2", "--max-bytes",
               str(MAX_BYTES), "--shard-records", "7", *FAST_RETRY]
FILTER_OPTS = ["--backend", "fake", "--shard-records", "10"]
CAPTION_WORDS = 40
COLOUR_WORDS = {"red", "blue", "green", "yellow", "black", "white", "grey", "gray", "brown", "pink"}


def run_cli(*args: object) -> None:
    assert cli.main([str(a) for a in args]) == 0


def run_subprocess(args: list[object], crash: str | None = None, script: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if crash:
        env[CRASH_ENV] = crash
    entry = [str(REPO / "tools" / "curate" / "run.py")] if script else ["-m", "tools.curate"]
    return subprocess.run([sys.executable, *entry, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)


def part_lines(folder: Path, prefix: str = "part") -> list[bytes]:
    lines = []
    for path in sorted(folder.glob(f"{prefix}-*.jsonl")) + sorted(folder.glob(f"{prefix}.jsonl")):
        lines += path.read_bytes().splitlines()
    return lines


def tree_bytes(folder: Path, suffixes: tuple[str, ...] = (".json", ".jsonl", ".tar", ".jpg")) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.suffix in suffixes and p.is_file()}


# --------------------------------------------------------------------------- the pipeline, once


@pytest.fixture(scope="module")
def server():
    srv = FakeServer()
    yield srv
    srv.close()


# Runs in a subprocess started early (PyTorch start-up is slow), so it overlaps with the other tests.
OPEN_CLIP_CHECK = """
import json, sys
import numpy as np, open_clip, torch
from tools.curate.embed import build_embedder
snapshot = sys.argv[1]
with open(snapshot + "/open_clip_config.json") as f:
    model_cfg = json.load(f)["model_cfg"]
torch.manual_seed(0)
reference = open_clip.CLIP(**model_cfg).eval()
torch.save(reference.state_dict(), snapshot + "/open_clip_pytorch_model.bin")
texts = ["a man with [hairstyle]", "a woman in a [colored top] and [footwear]"]
got = build_embedder("open_clip", model_name="local-dir:" + snapshot)(texts)
with torch.no_grad():
    expected = reference.encode_text(open_clip.tokenize(texts)).numpy()
expected /= np.linalg.norm(expected, axis=1, keepdims=True)
print(json.dumps({"shape": list(got.shape), "max_abs_err": float(np.abs(got - expected).max())}))
"""
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def open_clip_job(tmp_path_factory):
    if importlib.util.find_spec("open_clip") is None:
        yield None
        return
    d = tmp_path_factory.mktemp("open_clip")
    snapshot = d / "tiny-clip"
    snapshot.mkdir()
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with open(d / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", OPEN_CLIP_CHECK, str(snapshot)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield proc, d / "log"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory, open_clip_job):
    d = tmp_path_factory.mktemp("curate")
    names = list(IMAGES) + list(FAILING)
    lines = [json.dumps({"url": server.image_url(n), "text": f"alt {n}"}) for n in names]
    lines.append(json.dumps({"url": server.image_url("good00"), "text": "the same URL again"}))
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    p = {"dir": d, "pairs": d / "pairs.jsonl", "ingest": d / "ingest", "filter": d / "filter",
         "templates": d / "templates", "caption": d / "caption", "root": d / "export",
         "export": d / "export" / "WebPerson"}
    run_cli("ingest", "--out", p["ingest"], "--pairs", p["pairs"], *INGEST_OPTS)
    p["hits_after_ingest"] = collections.Counter(server.backend.path_hits)
    p["max_active_ingest"] = server.backend.max_active
    run_cli("filter", "--images", p["ingest"], "--out", p["filter"], *FILTER_OPTS)
    bench = write_benchmarks(d)
    p["bench"] = bench
    p["templates_args"] = [a for path in bench["paths"].values() for a in ("--captions", path)] + [
        "--llm-url", f"{server.url}/v1", "--llm-model", "fake-llm", "--clusters", "3", "--synth-per-cluster", "6",
        "--workers", "4", "--timeout", "5", "--retries", "3", *FAST_RETRY]
    run_cli("templates", "--out", p["templates"], *p["templates_args"])
    p["caption_args"] = ["--crops", p["filter"], "--templates", p["templates"], "--vlm-url", f"{server.url}/v1",
                         "--vlm-model", "fake-vlm-a", "--vlm-model", "fake-vlm-b", "--max-words", CAPTION_WORDS,
                         "--workers", "4", "--timeout", "1.5", "--retries", "3", *FAST_RETRY]
    served_before = collections.Counter(server.backend.served)
    run_cli("caption", "--out", p["caption"], *p["caption_args"])
    p["vlm_served"] = collections.Counter(server.backend.served) - served_before
    run_cli("export", "--captions", p["caption"], "--out", p["export"], "--shard-size", "5")
    # Training on the export takes the longest (PyTorch start-up): run it while the other tests run.
    p["run"] = d / "train_run"
    cmd = [sys.executable, "tools/train.py", "--config", "configs/demo/tiny_pretrain.yaml",
           f"data.root={p['root']}", "data.annotation=webperson.json", "eval.period=0", "solver.epochs=1",
           "solver.warmup_epochs=0", "train.max_steps=1", "data.batch_size=8", f"output_dir={p['run']}"]
    with open(d / "train.log", "wb") as log:
        p["train"] = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                      stderr=subprocess.STDOUT)
    p["train_log"] = d / "train.log"
    yield p
    if p["train"].poll() is None:
        p["train"].kill()
        p["train"].wait()


def test_ingest_downloads_checks_and_records_failures(pipeline, server):
    ingest = pipeline["ingest"]
    stats = json.loads((ingest / "stats.json").read_text())
    assert stats["images"] == len(IMAGES)
    assert stats["failure_reasons"] == dict(collections.Counter(FAILING.values()))
    records = list(iter_records(str(ingest)))
    by_url = {r["url"]: r for r in records}
    assert len(records) == len(by_url) == len(IMAGES)
    assert set(by_url) == {server.image_url(n) for n in IMAGES}
    for name, spec in IMAGES.items():
        record = by_url[server.image_url(name)]
        assert record["key"] == hashlib.sha1(server.image_url(name).encode()).hexdigest()
        assert record["path"] == f"images/{record['key'][:2]}/{record['key']}.jpg"
        assert record["text"] == f"alt {name}"
        with Image.open(ingest / record["path"]) as img:
            assert (img.format, img.size) == ("JPEG", spec.size)
    failures = {f["url"].rsplit("/", 1)[-1]: f["reason"] for f in iter_records(str(ingest), "failures")}
    assert failures == FAILING
    hits = pipeline["hits_after_ingest"]
    # Duplicate URL fetched once; 503/429/500 and timeouts retried (3 attempts); 404 and bad types not.
    assert (hits["good00"], hits["flaky"], hits["limited"], hits["gone500"], hits["slow"]) == (1, 3, 2, 3, 3)
    assert (hits["missing"], hits["html"], hits["corrupt"]) == (1, 1, 1)
    assert 1 <= pipeline["max_active_ingest"] <= 3  # --per-host 3 although 8 workers
    shards = sorted(ingest.glob("part-*.jsonl"))
    assert [len(s.read_bytes().splitlines()) for s in shards] == [7, 7, 7, 4]
    assert not (ingest / ".tmp").exists()


def test_filter_applies_detection_and_pose_rules(pipeline, server):
    stats = json.loads((pipeline["filter"] / "stats.json").read_text())
    assert stats["rejections"] == dict(EXPECTED_REJECTIONS)
    assert (stats["images"], stats["crops"]) == (len(IMAGES), EXPECTED_CROPS)
    name_of = {hashlib.sha1(server.image_url(n).encode()).hexdigest(): n for n in IMAGES}
    records = list(iter_records(str(pipeline["filter"])))
    assert sorted(name_of[r["key"]] for r in records) == sorted(IMAGES)
    for record in records:
        spec = IMAGES[name_of[record["key"]]]
        assert tuple(d["reason"] for d in record["detections"]) == spec.outcomes
        assert record["reason"] == (None if spec.blobs else "no_detection")
        for det, blob in zip(record["detections"], spec.blobs):
            # JPEG smearing may move a blob edge by a pixel or two.
            assert np.allclose(det["box"], [blob.x, blob.y, blob.x + blob.w, blob.y + blob.h], atol=3)
            if det["reason"] is None:
                with Image.open(pipeline["filter"] / det["crop"]) as crop:
                    assert abs(crop.width - blob.w) <= 3 and abs(crop.height - blob.h) <= 3
                assert det["crop_key"] == f"{record['key']}_{det['index']:02d}"
                assert det["keypoints"]["visible"] >= 8


def test_templates_extracted_validated_clustered_and_synthesised(pipeline):
    tdir, bench = pipeline["templates"], pipeline["bench"]
    records = {r["caption"]: r for r in iter_records(str(tdir))}
    assert set(records) == set(bench["train"])  # train split only, each caption once
    assert not set(bench["excluded"]) & set(records)
    assert records[LEFTOVER_CAPTION]["reason"] == "leftover_specifics"
    assert records[ONE_ATTRIBUTE_CAPTION]["reason"] == "few_placeholders"
    for caption, record in records.items():
        if caption not in (LEFTOVER_CAPTION, ONE_ATTRIBUTE_CAPTION):
            # Quoted/fenced answers were cleaned and empty/refused ones asked again: the exact template.
            assert record["template"] == fake_template(caption)
    stats = json.loads((tdir / "stats.json").read_text())
    assert stats["answer_problems"]["empty"] >= 1 and stats["answer_problems"]["refusal"] >= 1
    assert stats["clusters"] == 3
    templates = [json.loads(line) for line in (tdir / "templates.jsonl").read_text().splitlines()]
    texts = [t["text"] for t in templates]
    assert len(texts) == stats["templates"] > stats["unique_extracted"]
    normalised = [re.sub(r"[^a-z\[\] ]", "", t.lower()) for t in texts]
    assert len(set(normalised)) == len(normalised)
    extracted = {r["template"] for r in records.values() if r["template"]}
    for t in templates:
        assert len(re.findall(r"\[[^\[\]]+\]", t["text"])) >= 2
        outside = set(re.sub(r"\[[^\[\]]*\]", " ", t["text"]).lower().replace(".", " ").replace(",", " ").split())
        assert not outside & COLOUR_WORDS, t["text"]
        assert t["reviewed"] is False
        assert t["source"] in ("benchmark", "synthesised")
        if t["source"] == "benchmark":
            assert t["text"] in extracted
    assert {t["source"] for t in templates} == {"benchmark", "synthesised"}
    assert not set(texts) & {s.lstrip("1. ") for s in SYNTH_INVALID}
    review = [line for line in (tdir / "templates_review.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert review == texts
    for synth in iter_records(str(tdir), "synth"):
        assert 1 <= len(synth["seeds"]) <= 6 and synth["rejected"]["leftover_specifics"] >= 1


def test_fake_server_serves_every_behaviour_whatever_the_reminders_arrival_order():
    """The fake server's cycle counts distinct first requests only: a reminder that arrives exactly where a
    behaviour's turn would be (as the scheduler may arrange under load) does not skip that behaviour."""
    backend = FakeBackend()

    def ask(text: str) -> None:
        backend.chat({"model": "fake-llm", "messages": [{"role": "user", "content": text}]})

    refusal_turn = LLM_CYCLE.index("refusal")
    for i in range(len(LLM_CYCLE)):
        if i == refusal_turn:
            ask(f"{REMINDER_MARK} <caption>an earlier caption {i}</caption>")
        ask(f"<caption>caption number {i}</caption>")
    assert all(backend.served[kind] >= 1 for kind in LLM_CYCLE)


def test_caption_two_clean_captions_per_crop(pipeline):
    records = list(iter_records(str(pipeline["caption"])))
    assert len(records) == len({r["key"] for r in records}) == EXPECTED_CROPS
    templates = [json.loads(line)["text"] for line in (pipeline["templates"] / "templates.jsonl").read_text().splitlines()]
    for r in records:
        crop = (pipeline["filter"] / r["crop"]).read_bytes()
        # Reference: the fake VLM's clean answer; fences, quotes and over-long tails were removed exactly.
        assert r["caption1"] == vlm_fill(r["template1"], crop, "fake-vlm-a")
        assert r["caption2"] == vlm_fill(r["template2"], crop, "fake-vlm-b")
        assert r["caption1"] != r["caption2"] and r["template1"] != r["template2"]
        # Templates drawn by a generator seeded with the crop key (documented seeding, stdlib random).
        order = random.Random(hashlib.sha1(f"0:templates:{r['key']}".encode()).hexdigest()).sample(
            range(len(templates)), 3)
        assert (r["template1"], r["template2"]) == (templates[order[0]], templates[order[1]])
        for caption in (r["caption1"], r["caption2"]):
            assert 5 <= len(caption.split()) <= CAPTION_WORDS
            assert not re.search(r"[\[\]`\"*]|^caption|sorry", caption, re.I)
    served = pipeline["vlm_served"]
    assert all(served[kind] >= 1 for kind in VLM_CYCLE), served
    # Exact accounting: each unusable answer was asked again once; fenced answers and over-long ones
    # with a sentence boundary were repaired without asking again.
    problems = collections.Counter(p for r in records for p in r["problems"])
    assert problems == {"empty": served["empty"], "refusal": served["refusal"], "too_long": served["long_run_on"]}
    stats = json.loads((pipeline["caption"] / "stats.json").read_text())
    assert (stats["images"], stats["captions"], stats["failed"]) == (EXPECTED_CROPS, 2 * EXPECTED_CROPS, 0)


def test_vlm_prompt_carries_the_caption_rules(pipeline, server):
    prompts = server.backend.vlm_prompts
    assert prompts
    for text in prompts:
        for rule in (f"at most {CAPTION_WORDS} words", "dominant pedestrian", "vague colour word",
                     "Do not mention the background", "Do not speculate"):
            assert rule in text


def test_caption_with_reviewed_templates_only(pipeline, tmp_path):
    lines = [line for line in (pipeline["templates"] / "templates_review.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    custom = "A pedestrian with [hairstyle] wears a [colored top] and [footwear] today."
    kept = lines[::2] + [custom]
    reviewed = tmp_path / "reviewed.txt"
    reviewed.write_text("# reviewed by hand\n\n" + "\n".join(kept) + "\n")
    out = tmp_path / "caption_reviewed"
    args = [str(a) for a in pipeline["caption_args"]]
    run_cli("caption", "--out", out, "--reviewed", reviewed, "--limit", "4", *args)
    records = list(iter_records(str(out)))
    assert len(records) == 4
    assert {r["template1"] for r in records} | {r["template2"] for r in records} <= set(kept)
    assert json.loads((out / "manifest.json").read_text())["inputs"]["reviewed"] is True


def test_export_formats_load_identically(pipeline):
    records = sorted(iter_records(str(pipeline["caption"])), key=lambda r: r["key"])
    expected = [(r["key"], r[c]) for r in records for c in ("caption1", "caption2")]
    pixels = {r["key"]: np.asarray(Image.open(pipeline["filter"] / r["crop"]).convert("RGB")) for r in records}
    for annotation in ("webperson.json", "webperson.jsonl", "shards"):
        ds = WebPerson(str(pipeline["root"]), annotation=annotation, cache=False)
        samples = [ds.train[i] for i in range(len(ds.train))]
        got = [(Path(path.split("::")[-1]).stem, caption) for _, _, path, caption in samples]
        assert got == expected, annotation
        assert [pid for pid, _, _, _ in samples] == [i // 2 for i in range(len(expected))]
        for _, _, path, _ in samples[::2]:
            key = Path(path.split("::")[-1]).stem
            assert np.array_equal(np.asarray(open_image(path)), pixels[key]), (annotation, key)
    with tarfile.open(pipeline["export"] / "shards" / "webperson-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"{r['key']}.{ext}" for r in records[:5] for ext in ("jpg", "json")]
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(0, 0, 0, 0o644, "")}
    assert len(list((pipeline["export"] / "shards").glob("*.tar"))) == -(-len(records) // 5)
    stats = json.loads((pipeline["export"] / "stats.json").read_text())
    texts = [c for _, c in expected]
    lengths = [len(t.split()) for t in texts]
    assert (stats["images"], stats["captions"]) == (len(records), len(texts))
    assert stats["vocabulary"] == len({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})
    assert stats["caption_words"]["mean"] == round(sum(lengths) / len(lengths), 2)
    assert stats["caption_words"]["p50"] == float(np.median(lengths))
    assert stats["stages"]["filter"]["rejections"] == dict(EXPECTED_REJECTIONS)
    assert stats["stages"]["ingest"]["failure_reasons"] == dict(collections.Counter(FAILING.values()))
    assert stats["stages"]["templates"]["templates"] >= 2


def test_rerun_skips_done_work_and_changed_settings_are_refused(pipeline, server, capsys):
    ingest = pipeline["ingest"]
    before_lines, before_hits = part_lines(ingest), collections.Counter(server.backend.path_hits)
    run_cli("ingest", "--out", ingest, "--pairs", pipeline["pairs"], *INGEST_OPTS)
    assert part_lines(ingest) == before_lines
    assert collections.Counter(server.backend.path_hits) == before_hits  # failures are done too
    args = [str(a) for a in pipeline["caption_args"]]
    args[args.index("--max-words") + 1] = "30"
    capsys.readouterr()
    assert cli.main(["caption", "--out", str(pipeline["caption"]), *args]) == 2
    assert "max_words: 40 -> 30" in capsys.readouterr().err


# --------------------------------------------------------------------------- crash + resume


def test_ingest_killed_mid_record_resumes_to_the_same_records(pipeline, tmp_path):
    ref = pipeline["ingest"]
    # The always-slow URL is left out: it would only add timeouts to both runs.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(line + "\n" for line in pipeline["pairs"].read_text().splitlines() if "/slow" not in line))
    out = tmp_path / "ingest"
    args = ["ingest", "--out", out, "--pairs", pairs, *INGEST_OPTS]
    killed = run_subprocess(args, crash="ingest:5:torn")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first = (out / "part-00000.jsonl").read_bytes()
    assert first.count(b"\n") == 5 and not first.endswith(b"\n")  # a torn sixth record
    resumed = run_subprocess(args)
    assert resumed.returncode == 0, resumed.stderr
    lines = part_lines(out)
    keys = [json.loads(line)["key"] for line in lines]
    assert len(keys) == len(set(keys)) == len(IMAGES)
    assert sorted(lines) == sorted(part_lines(ref))
    ref_failures = sorted(line for line in part_lines(ref, "failures") if b"/slow" not in line)
    assert sorted(part_lines(out, "failures")) == ref_failures
    assert tree_bytes(out / "images") == tree_bytes(ref / "images")
    assert not (out / ".tmp").exists()


def test_filter_killed_resumes_to_identical_output(pipeline, tmp_path):
    out = tmp_path / "filter"
    args = ["filter", "--images", pipeline["ingest"], "--out", out, *FILTER_OPTS]
    killed = run_subprocess(args, crash="filter:9:torn")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_subprocess(args, script=True)  # also exercises tools/curate/run.py
    assert resumed.returncode == 0, resumed.stderr
    # The filter is sequential, so even the record order matches the uninterrupted run.
    assert part_lines(out) == part_lines(pipeline["filter"])
    assert tree_bytes(out / "crops") == tree_bytes(pipeline["filter"] / "crops")


def test_caption_killed_resumes_and_exports_identical_bytes(pipeline, tmp_path):
    out = tmp_path / "caption"
    args = ["caption", "--out", out, *pipeline["caption_args"]]
    killed = run_subprocess(args, crash="caption:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(part_lines(out)) == 6
    resumed = run_subprocess(args)
    assert resumed.returncode == 0, resumed.stderr
    keys = [json.loads(line)["key"] for line in part_lines(out)]
    assert len(keys) == len(set(keys)) == EXPECTED_CROPS
    export = tmp_path / "export" / "WebPerson"
    run_cli("export", "--captions", out, "--out", export, "--shard-size", "5")
    reference, got = tree_bytes(pipeline["export"]), tree_bytes(export)
    reference.pop("stats.json")
    got.pop("stats.json")
    assert len(reference) == 1 + 1 + -(-EXPECTED_CROPS // 5) + EXPECTED_CROPS  # json, jsonl, shards, images
    assert got == reference


# --------------------------------------------------------------------------- components


def test_record_store_truncates_a_torn_line_and_refuses_duplicates(tmp_path):
    store = RecordStore(str(tmp_path), shard_size=2)
    for i in range(3):
        store.append({"key": f"k{i}", "value": i})
    with pytest.raises(StageError, match="duplicate record key 'k1'"):
        store.append({"key": "k1"})
    store.close()
    shard = tmp_path / "part-00001.jsonl"
    intact = shard.read_bytes()
    with open(shard, "ab") as f:
        f.write(b'{"key":"k3","va')
    store = RecordStore(str(tmp_path), shard_size=2)
    assert store.keys == {"k0", "k1", "k2"} and shard.read_bytes() == intact
    store.append({"key": "k3"})
    store.append({"key": "k4"})
    store.close()
    assert [len(p.read_bytes().splitlines()) for p in sorted(tmp_path.glob("part-*.jsonl"))] == [2, 2, 1]
    (tmp_path / "part-00000.jsonl").write_bytes(b'{"key":"k0"}\nnot json\n{"key":"k1"}\n')
    with pytest.raises(StageError, match=r"part-00000.jsonl line 2: unreadable record"):
        RecordStore(str(tmp_path), shard_size=2)


def test_caption_answer_cleaning():
    assert parse_caption_answer('```markdown\nCaption: "A man in a red coat walks."\n```', False, 3, 10) == \
        ("A man in a red coat walks.", None)
    assert parse_caption_answer("\u201cA woman with **long hair** in blue.\u201d", False, 3, 10) == \
        ("A woman with long hair in blue.", None)
    assert parse_caption_answer("   ", False, 3, 10)[1] == "empty"
    assert parse_caption_answer("I'm sorry, but I can't help with that.", False, 3, 10)[1] == "refusal"
    two = "A man in a red coat walks. He carries a very large bag with many pockets and straps."
    assert parse_caption_answer(two, False, 3, 10) == ("A man in a red coat walks.", None)
    assert parse_caption_answer("A man " + "very " * 20 + "tall.", False, 3, 10)[1] == "too_long"
    assert parse_caption_answer("A man in a [colored top].", False, 3, 10)[1] == "placeholder_left"
    assert parse_caption_answer("A man.", False, 3, 10)[1] == "too_short"
    assert parse_caption_answer('{"caption": "A woman in a blue dress."}', True, 3, 10) == \
        ("A woman in a blue dress.", None)
    assert parse_caption_answer('```json\n{"caption": "\\"A woman in blue.\\""}\n```', True, 3, 10) == \
        ("A woman in blue.", None)
    assert parse_caption_answer("A woman in a blue dress.", True, 3, 10)[1] == "not_json"
    assert parse_caption_answer('{"text": "A woman in a blue dress."}', True, 3, 10)[1] == "not_json"


def test_template_validation():
    ok = "A man with [hairstyle] wears a [colored top] and [footwear]."
    assert template_problem(ok) is None
    assert template_problem("A man wears a [colored top] while walking.") == "few_placeholders"
    assert template_problem("A man with [hairstyle] wears a [colored top] and black boots.") == "leftover_specifics"
    assert template_problem("A man with [hairstyle] wears a [colored top and shoes.") == "malformed_placeholder"
    assert template_problem("[hairstyle] and [footwear]") == "too_short"
    assert template_problem(" ".join(["word"] * 60) + " [top] [shoes]") == "too_long"
    assert template_problem("Sorry, I cannot [do] [that] for you right now.") == "refusal"
    assert template_problem("A man with [hairstyle] under the bluest sky wears [footwear].") is None
    assert template_problem(ok, stop_words={"man"}) == "leftover_specifics"


def test_retry_policy_with_retries_and_host_limiter():
    policy = RetryPolicy(attempts=4, base_delay=0.5, max_delay=3.0, jitter=0.5)
    rng, ref = random.Random(7), random.Random(7)
    assert [policy.delay(a, rng) for a in (1, 2, 3, 4)] == \
        [min(3.0, 0.5 * 2 ** (a - 1) * (1 + 0.5 * ref.random())) for a in (1, 2, 3, 4)]
    assert policy.delay(1, random.Random(0), retry_after=2.0) == 2.0
    assert policy.delay(1, random.Random(0), retry_after=10.0) == 3.0
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise FetchError("http_503", transient=True)
        return "ok"

    assert with_retries(flaky, policy, random.Random(1), sleeps.append) == "ok"
    ref = random.Random(1)
    assert sleeps == [0.5 * (1 + 0.5 * ref.random()), 1.0 * (1 + 0.5 * ref.random())]
    calls.clear()
    with pytest.raises(FetchError, match="http_404"):
        with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(FetchError("http_404")), policy,
                     random.Random(1), sleeps.append)
    assert len(calls) == 1

    now, waited = [0.0], []

    def fake_sleep(seconds: float) -> None:
        waited.append(seconds)
        now[0] += seconds

    limiter = HostLimiter(max_per_host=2, min_interval=1.0, clock=lambda: now[0], sleep=fake_sleep)
    for _ in range(3):
        with limiter.slot("a.example"):
            pass
    with limiter.slot("b.example"):
        pass
    assert waited == [1.0, 1.0]

    limiter = HostLimiter(max_per_host=2)
    entered = threading.Event()

    def third() -> None:
        with limiter.slot("h"):
            entered.set()

    with limiter.slot("h"), limiter.slot("h"):
        thread = threading.Thread(target=third)
        thread.start()
        assert not entered.wait(0.2)  # both slots are taken
    assert entered.wait(10)
    thread.join()


def test_chat_client_retries_then_fails_clearly(server):
    client = ChatClient(f"{server.url}/v1", "fake-echo", retry=RetryPolicy(attempts=3, base_delay=0.0), timeout=5)
    messages = [{"role": "user", "content": "hello there"}]
    assert client.complete(messages, random.Random(0)) == "echo: hello there"  # after a 500 and a 429
    assert server.backend.requests["echo:hello there"] == 3
    impatient = ChatClient(f"{server.url}/v1", "fake-echo", retry=RetryPolicy(attempts=2, base_delay=0.0), timeout=5)
    with pytest.raises(ChatError, match="http_429"):
        impatient.complete([{"role": "user", "content": "second"}], random.Random(0))
    missing = ChatClient(f"{server.url}/v1", "no-such-model", retry=RetryPolicy(attempts=3, base_delay=0.0))
    with pytest.raises(ChatError, match=r"no-such-model.*http_404.*does not exist"):
        missing.complete(messages, random.Random(0))


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 20)
    x = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)[truth] + rng.normal(0, 0.5, (60, 2))
    perm = rng.permutation(60)
    x, truth = x[perm], truth[perm]
    centers, labels = kmeans(x, 3, seed=1)
    assert sorted(len(set(truth[labels == c])) for c in range(3)) == [1, 1, 1]
    assert len({int(truth[labels == c][0]) for c in range(3)}) == 3
    for i, point in enumerate(x):  # brute-force: every point sits with its nearest center
        assert labels[i] == min(range(3), key=lambda c: float(((point - centers[c]) ** 2).sum()))
    for c in range(3):
        assert np.allclose(centers[c], x[labels == c].mean(0))
    assert np.array_equal(kmeans(x, 3, seed=1)[1], labels)
    assert len(kmeans(x[:2], 5)[0]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty cluster would warn "Mean of empty slice"
        centers, same = kmeans(np.zeros((5, 2)), 3)
        assert len(set(same.tolist())) == 3 and np.isfinite(centers).all()  # coincident points, k clusters
        _, labels = kmeans(np.array([[0.0], [0.0], [0.0], [0.0], [10.0]]), 4, seed=3)
        assert sorted(np.bincount(labels).tolist()) == [1, 1, 1, 2]


def test_hashing_embedder_is_deterministic_and_similarity_aware(tmp_path):
    embed = HashingEmbedder(dim=256)
    texts = ["A man with [hairstyle] wears a [colored top].", "A woman with [hairstyle] wears a [colored top].",
             "Someone carries a [bag] and [footwear] on the road."]
    v = embed(texts)
    assert v.shape == (3, 256) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(v, HashingEmbedder(dim=256)(texts))
    assert v[0] @ v[1] > v[0] @ v[2]
    with pytest.raises(StageError, match="unknown embedder 'bert'; valid: hash, open_clip"):
        build_embedder("bert")
    with pytest.raises(StageError, match="--embed-weights .*file not found.*nothing is downloaded"):
        build_embedder("open_clip", weights="/nonexistent/open_clip_model.bin")
    with pytest.raises(StageError, match="hub models would be downloaded"):
        build_embedder("open_clip", model_name="hf-hub:laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with pytest.raises(StageError, match="no weight file"):
        build_embedder("open_clip", model_name=f"local-dir:{tmp_path}")


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip not installed")
def test_open_clip_embedder_loads_local_weights(open_clip_job):
    """The open_clip embedder (local-dir snapshot) equals the reference model's normalised text features."""
    proc, log = open_clip_job
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    result = json.loads(log.read_text().strip().splitlines()[-1])
    assert result["shape"] == [2, 16] and result["max_abs_err"] < 1e-5


def test_filter_rules_boundaries():
    rules = FilterRules()
    assert rules.box_problem(Box(0, 0, 100, 250, 0.86)) is None
    assert rules.box_problem(Box(0, 0, 100, 250, 0.85)) == "low_confidence"  # strictly above 0.85
    assert rules.box_problem(Box(0, 0, 100, 250, 0.99, cls=2)) == "not_person"
    assert rules.box_problem(Box(0, 0, 90, 250, 0.9)) == "too_small"  # shorter side must exceed 90
    assert rules.box_problem(Box(0, 0, 91, 182, 0.9)) is None  # 1:2 inclusive
    assert rules.box_problem(Box(0, 0, 100, 400, 0.9)) is None  # 1:4 inclusive
    assert rules.box_problem(Box(0, 0, 100, 401, 0.9)) == "aspect_ratio"
    assert rules.box_problem(Box(0, 0, 100, 199, 0.9)) == "aspect_ratio"

    def keypoints(visible: list[int], conf: float = 0.9) -> np.ndarray:
        kp = np.zeros((17, 3))
        kp[visible, 2] = conf
        return kp

    def problem(kp: np.ndarray, r: FilterRules = rules) -> str | None:
        return r.pose_problem(r.keypoint_counts(kp))

    assert problem(keypoints([0, 1, 11, 5, 6, 7, 8, 9])) is None
    assert problem(keypoints([0, 1, 11, 5, 6, 7, 8])) == "few_keypoints"
    assert problem(keypoints([0, 1, 2, 5, 6, 7, 8, 9])) == "no_hip"
    assert problem(keypoints([0, 11, 12, 5, 6, 7, 8, 9])) == "few_head_keypoints"
    assert problem(keypoints([0, 1, 11, 5, 6, 7, 8, 9], conf=0.5)) is None  # threshold inclusive
    assert problem(keypoints([0, 1, 11, 5, 6, 7, 8, 9], conf=0.49)) == "few_keypoints"
    assert problem(keypoints([0, 11, 5]), FilterRules(min_keypoints=3, min_head=1)) is None
    assert FilterRules(min_conf=0.5, min_side=10).box_problem(Box(0, 0, 20, 50, 0.6)) is None
    with pytest.raises(StageError, match="aspect bounds"):
        FilterRules(min_aspect=5, max_aspect=4)


def test_backend_selection_errors(tmp_path):
    with pytest.raises(StageError, match="unknown --backend 'yolo'; valid: ultralytics, fake"):
        build_backend("yolo")
    if importlib.util.find_spec("ultralytics") is None:
        with pytest.raises(StageError, match="pip install ultralytics"):
            build_backend("ultralytics", str(tmp_path / "yolo11x.pt"), str(tmp_path / "yolo11x-pose.pt"))
    else:
        with pytest.raises(StageError, match="yolo11x.pt: file not found.*never downloaded"):
            build_backend("ultralytics", str(tmp_path / "yolo11x.pt"), str(tmp_path / "yolo11x-pose.pt"))


def test_pair_lists_parquet_and_bad_records(tmp_path):
    parquet = tmp_path / "pairs.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        parquet.write_bytes(b"PAR1")
        with pytest.raises(StageError, match=r"needs pyarrow \(pip install pyarrow\); or convert the list to JSONL"):
            list(read_pairs(str(parquet)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"URL": ["http://a/x.jpg", "http://b/y.png"], "TEXT": ["one", None]}), parquet)
        items = list(read_pairs(str(parquet), "URL", "TEXT"))
        assert [(i.url, i.text) for i in items] == [("http://a/x.jpg", "one"), ("http://b/y.png", "")]
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"url": "http://a/x.jpg", "text": "ok"}\n{"link": "http://b"}\n')
    with pytest.raises(StageError, match=r"pairs.jsonl record 2: missing or empty 'url'.*--url-col"):
        list(read_pairs(str(bad)))
    with pytest.raises(StageError, match="unsupported file type"):
        list(read_pairs(str(tmp_path / "pairs.csv")))


def test_ingest_local_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGBA", (30, 60), (200, 10, 10, 128)).save(folder / "a.png")
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 80), (10, 200, 10)).save(jpeg, format="JPEG", quality=90)
    (folder / "sub" / "b.jpg").write_bytes(jpeg.getvalue())
    (folder / "sub" / "b.txt").write_text("  a person in green \n")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"GIF87a but not really")
    (folder / "html.jpg").write_bytes(b"<html></html>")
    stats = run_ingest(str(tmp_path / "out"), folders=[str(folder)], settings=IngestSettings(workers=2))
    assert (stats["images"], stats["failure_reasons"]) == (2, {"decode_error": 1, "not_an_image": 1})
    records = {r["source"]: r for r in iter_records(str(tmp_path / "out"))}
    assert set(records) == {"a.png", "sub/b.jpg"}
    b = records["sub/b.jpg"]
    assert b["key"] == hashlib.sha1(b"sub/b.jpg").hexdigest() and b["text"] == "a person in green"
    assert (tmp_path / "out" / b["path"]).read_bytes() == jpeg.getvalue()  # an RGB JPEG is kept as is
    with Image.open(tmp_path / "out" / records["a.png"]["path"]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (30, 60))
        r, g, _ = img.getpixel((15, 30))
        assert r > 200 and g > 100  # half-transparent red flattened onto white


def test_exported_corpus_trains(pipeline):
    """``tools/train.py`` (tiny preset, one step) on the export; started by the pipeline fixture."""
    returncode = pipeline["train"].wait(timeout=600)
    assert returncode == 0, pipeline["train_log"].read_text()[-3000:]
    assert (pipeline["run"] / "last.pth").is_file()
