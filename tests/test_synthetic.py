"""Synthetic data generator: determinism, on-disk formats, noise bookkeeping, CLI."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.synthetic import (
    DESCRIBED_FIELDS,
    HAIR_PALETTE,
    PALETTE,
    TEMPLATES,
    PersonAttributes,
    SyntheticConfig,
    caption_pair,
    describe,
    generate,
    render_person,
    sample_identities,
    tokenize_caption,
)

REPO = Path(__file__).resolve().parents[1]

SMALL = dict(identities=5, images_per_id=2, val_ids=2, test_ids=2, webperson_images=7, shard_size=3)

# Independent markers: a garment word in a clean caption must belong to the true type.
TYPE_MARKERS = {
    "top_type": {
        "t-shirt": {"t-shirt", "tee", "short-sleeved", "short-sleeve"},
        "long-sleeve": {"long-sleeved", "long-sleeve", "sleeves", "sweater"},
        "jacket": {"jacket", "zip-up", "windbreaker"},
        "coat": {"coat", "overcoat"},
        "vest": {"vest", "tank"},
        "dress": {"dress"},
    },
    "bottom_type": {
        "trousers": {"trousers", "pants", "slacks"},
        "jeans": {"jeans", "denim"},
        "shorts": {"shorts"},
        "skirt": {"skirt", "pleated"},
    },
    "bag": {
        "backpack": {"backpack", "rucksack"},
        "handbag": {"handbag", "purse"},
        "shoulder bag": {"shoulder", "crossbody"},
    },
    "hat": {"cap": {"cap", "baseball"}, "beanie": {"beanie", "knit", "woolly"}},
}
GENDER_MARKERS = {
    "male": {"man", "gentleman", "guy", "male", "he", "his", "him"},
    "female": {"woman", "lady", "girl", "female", "she", "her"},
}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synth")
    out = {}
    out["a"] = base / "a"
    generate(out["a"], SyntheticConfig(seed=3, **SMALL), workers=1)
    out["b"] = base / "b"
    generate(out["b"], SyntheticConfig(seed=3, **SMALL), workers=2)
    out["other_seed"] = base / "c"
    generate(out["other_seed"], SyntheticConfig(seed=4, **SMALL), workers=1)
    out["clean"] = base / "clean"
    generate(out["clean"], SyntheticConfig(seed=5, noise_rate=0.0, benchmark_noise_rate=0.0, **SMALL))
    out["noisy"] = base / "noisy"
    generate(out["noisy"], SyntheticConfig(seed=6, noise_rate=1.0, benchmark_noise_rate=1.0, **SMALL))
    return out


def _load(root: Path, name: str):
    return json.loads((root / name).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- determinism


def test_same_seed_byte_identical_regardless_of_workers(runs):
    a, b = _tree(runs["a"]), _tree(runs["b"])
    assert sorted(a) == sorted(b)
    differing = [name for name in a if a[name] != b[name]]
    assert differing == []
    # sanity: the comparison covered images, annotations and shards
    assert any(n.endswith(".jpg") for n in a)
    assert any(n.endswith(".tar") for n in a)
    assert "CUHK-PEDES/reid_raw.json" in a and "WebPerson/annotations.json" in a


def test_different_seed_differs(runs):
    a, c = _tree(runs["a"]), _tree(runs["other_seed"])
    for name in ("CUHK-PEDES/reid_raw.json", "WebPerson/annotations.json", "attributes.json"):
        assert a[name] != c[name], name
    images = [n for n in a if n.endswith(".jpg")]
    assert sum(a[n] != c[n] for n in images) == len(images)


def test_render_person_deterministic_and_sized():
    attrs = sample_identities(1, 0)[0]
    im1 = render_person(attrs, random.Random(7), (96, 48))
    im2 = render_person(attrs, random.Random(7), (96, 48))
    im3 = render_person(attrs, random.Random(8), (96, 48))
    assert im1.size == (48, 96) and im1.mode == "RGB"
    assert im1.tobytes() == im2.tobytes()
    assert im1.tobytes() != im3.tobytes()
    with pytest.raises(ValueError, match="at least"):
        render_person(attrs, random.Random(0), (20, 10))


def test_top_colour_is_drawn_on_the_torso():
    base = dataclasses.replace(
        sample_identities(1, 1)[0],
        top_type="long-sleeve",
        top_colour="red",
        bottom_type="trousers",
        bottom_colour="black",
    )
    blue = dataclasses.replace(base, top_colour="blue")
    im_red = np.asarray(render_person(base, random.Random(11)), dtype=np.int32)
    im_blue = np.asarray(render_person(blue, random.Random(11)), dtype=np.int32)
    changed = np.abs(im_red - im_blue).sum(axis=2) > 60
    rows, cols = np.nonzero(changed)
    assert changed.sum() > 150  # a garment, not a few pixels
    # the changed pixels sit in the upper-middle body, where the top is
    assert 0.15 * 128 < rows.mean() < 0.6 * 128
    assert 0.25 * 64 < cols.mean() < 0.75 * 64
    assert im_red[changed][:, 0].mean() > im_blue[changed][:, 0].mean() + 60
    assert im_blue[changed][:, 2].mean() > im_red[changed][:, 2].mean() + 60


# --------------------------------------------------------------------------- identities


def test_sample_identities_unique_and_separated():
    people = sample_identities(300, 9)
    assert people == sample_identities(300, 9)
    assert people != sample_identities(300, 10)
    keys = [p.key() for p in people]
    for x, y in itertools.combinations(keys, 2):
        assert sum(u != v for u, v in zip(x, y, strict=True)) >= 2
    # no single attribute separates everyone
    for i, name in enumerate(DESCRIBED_FIELDS):
        assert len({k[i] for k in keys}) < len(keys), name


def test_attributes_validation():
    good = sample_identities(1, 0)[0]
    with pytest.raises(ValueError, match="top_colour"):
        dataclasses.replace(good, top_colour="magenta")
    with pytest.raises(ValueError, match="bottom_type"):
        dataclasses.replace(good, top_type="dress", bottom_type="jeans", bottom_colour="blue")
    with pytest.raises(ValueError, match="missing fields"):
        PersonAttributes.from_dict({"gender": "male"})
    assert PersonAttributes.from_dict(good.to_dict()) == good


# --------------------------------------------------------------------------- CUHK-PEDES format


def test_cuhk_pedes_format(runs):
    root = runs["a"] / "CUHK-PEDES"
    records = _load(root, "reid_raw.json")
    cfg = SMALL
    assert len(records) == (cfg["identities"] + cfg["val_ids"] + cfg["test_ids"]) * cfg["images_per_id"]
    ids_by_split: dict[str, set[int]] = {"train": set(), "val": set(), "test": set()}
    for i, rec in enumerate(records):
        assert set(rec) == {"split", "captions", "file_path", "processed_tokens", "id"}, i
        assert type(rec["id"]) is int and rec["id"] >= 1
        ids_by_split[rec["split"]].add(rec["id"])
        assert len(rec["captions"]) == 2 and all(isinstance(c, str) and c.strip() for c in rec["captions"])
        assert rec["captions"][0] != rec["captions"][1]
        for caption, tokens in zip(rec["captions"], rec["processed_tokens"], strict=True):
            reference = re.sub(r"[^a-z0-9'\- ]", " ", caption.lower()).split()
            assert tokens == reference
        with Image.open(root / "imgs" / rec["file_path"]) as im:
            im.load()
            assert im.size == (64, 128)
    assert len(ids_by_split["train"]) == cfg["identities"]
    assert len(ids_by_split["val"]) == cfg["val_ids"] and len(ids_by_split["test"]) == cfg["test_ids"]
    for x, y in itertools.combinations(ids_by_split.values(), 2):
        assert not x & y
    all_ids = set().union(*ids_by_split.values())
    assert all_ids == set(range(1, len(all_ids) + 1))
    # every image on disk is referenced
    on_disk = {p.relative_to(root / "imgs").as_posix() for p in (root / "imgs").rglob("*.jpg")}
    assert on_disk == {r["file_path"] for r in records}


# --------------------------------------------------------------------------- WebPerson format


def test_webperson_json_jsonl_and_shards_agree(runs):
    root = runs["a"] / "WebPerson"
    entries = _load(root, "annotations.json")
    assert len(entries) == SMALL["webperson_images"]
    lines = (root / "annotations.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == entries
    expected: dict[str, dict[str, str]] = {}
    for entry in entries:
        assert isinstance(entry, dict) and len(entry) == 1
        ((path, caps),) = entry.items()
        assert set(caps) == {"caption1", "caption2"} and all(caps.values())
        assert (root / "images" / path).is_file()
        expected[path] = caps

    shards = sorted((root / "shards").glob("*.tar"))
    assert [s.name for s in shards] == [f"webperson-{i:06d}.tar" for i in range(3)]  # 7 samples / 3
    seen: dict[str, dict[str, str]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert names == sorted(names)
            assert len(members) <= 2 * SMALL["shard_size"]
            for m in members:
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            for jpg, js in zip(members[::2], members[1::2], strict=True):
                key = jpg.name[: -len(".jpg")]
                assert jpg.name.endswith(".jpg") and js.name == key + ".json"
                data = tar.extractfile(jpg).read()
                assert data == (root / "images" / jpg.name).read_bytes()
                Image.open(io.BytesIO(data)).load()
                seen[jpg.name] = json.loads(tar.extractfile(js).read())
    assert seen == expected


def test_benchmark_and_webperson_identities_disjoint(runs):
    attrs = _load(runs["a"], "attributes.json")
    bench = {PersonAttributes.from_dict(a).key() for a in attrs["benchmark"].values()}
    web = [PersonAttributes.from_dict(a).key() for a in attrs["webperson"].values()]
    assert len(bench) == SMALL["identities"] + SMALL["val_ids"] + SMALL["test_ids"]
    assert len(set(web)) == len(web) == SMALL["webperson_images"]
    assert not bench & set(web)


# --------------------------------------------------------------------------- noise


def _caption_words_ok(caption: str, attrs: dict) -> list[str]:
    """Problems found when checking a caption against the true attributes (empty = faithful)."""
    tokens = set(tokenize_caption(caption))
    problems = []
    all_colour_words = {w for _, words in PALETTE.values() for w in words} | {
        w for _, words in HAIR_PALETTE.values() for w in words
    }
    allowed = set()
    for field in ("top_colour", "bottom_colour", "shoe_colour", "bag_colour", "hat_colour"):
        if attrs[field]:
            allowed |= set(PALETTE[attrs[field]][1])
    if attrs["hair_colour"]:
        allowed |= set(HAIR_PALETTE[attrs["hair_colour"]][1])
    if tokens & all_colour_words - allowed:
        problems.append(f"colours {sorted(tokens & all_colour_words - allowed)}")
    if not tokens & set(PALETTE[attrs["top_colour"]][1]):
        problems.append("top colour missing")
    for field, markers in TYPE_MARKERS.items():
        true = attrs[field]
        wrong = set().union(*(m for t, m in markers.items() if t != true)) - markers.get(true, set())
        if tokens & wrong:
            problems.append(f"{field}: {sorted(tokens & wrong)}")
    other = "female" if attrs["gender"] == "male" else "male"
    if tokens & GENDER_MARKERS[other]:
        problems.append("gender")
    return problems


def test_noise_rate_zero_captions_are_faithful(runs):
    root = runs["clean"]
    report = _load(root, "noise_report.json")
    assert report["benchmark"] == {} and report["webperson"] == {}
    attrs = _load(root, "attributes.json")
    for rec in _load(root / "CUHK-PEDES", "reid_raw.json"):
        for caption in rec["captions"]:
            assert _caption_words_ok(caption, attrs["benchmark"][str(rec["id"])]) == [], caption
    for entry in _load(root / "WebPerson", "annotations.json"):
        ((path, caps),) = entry.items()
        for caption in caps.values():
            assert _caption_words_ok(caption, attrs["webperson"][path]) == [], caption


def test_checker_catches_a_wrong_colour():
    attrs = dict(
        gender="male",
        hair_style="short",
        hair_colour="black",
        hat=None,
        hat_colour=None,
        top_type="jacket",
        top_colour="red",
        bottom_type="jeans",
        bottom_colour="blue",
        shoe_colour="white",
        bag=None,
        bag_colour=None,
    )
    assert _caption_words_ok("A man with short black hair wears a red jacket and blue jeans.", attrs) == []
    assert _caption_words_ok("A man with short black hair wears a green jacket and blue jeans.", attrs)
    assert _caption_words_ok("A man wears a red coat and blue jeans.", attrs)
    assert _caption_words_ok("A woman wears a red jacket.", attrs)


def test_noise_rate_one_every_train_caption_is_reported(runs):
    root = runs["noisy"]
    report = _load(root, "noise_report.json")
    records = _load(root / "CUHK-PEDES", "reid_raw.json")
    attrs = _load(root, "attributes.json")
    expected = {str(2 * i + j) for i, r in enumerate(records) if r["split"] == "train" for j in range(2)}
    assert set(report["benchmark"]) == expected  # val/test stay clean
    web = _load(root / "WebPerson", "annotations.json")
    assert set(report["webperson"]) == {str(k) for k in range(2 * len(web))}

    kinds = set()
    for index, entry in report["webperson"].items():
        i, j = divmod(int(index), 2)
        ((path, caps),) = web[i].items()
        caption = caps[f"caption{j + 1}"]
        assert entry["image"] == path and entry["caption"] == j and entry["text"] == caption
        assert caption != entry["clean"]
        assert entry["words"] and set(entry["words"]) <= set(tokenize_caption(caption))
        assert _caption_words_ok(entry["clean"], attrs["webperson"][path]) == []
        kinds.add(entry["kind"])
        if entry["kind"] == "irrelevant":
            assert entry["phrase"] in caption and entry["phrase"] not in entry["clean"]
        else:
            (change,) = entry["changes"]
            assert change["noisy"] != change["true"]
            assert change["true"] == attrs["webperson"][path].get(change["field"])
    assert kinds == {"wrong_attr", "irrelevant"}
    for index, entry in report["benchmark"].items():
        i, j = divmod(int(index), 2)
        assert records[i]["captions"][j] == entry["text"] and entry["split"] == "train"


def test_wrong_attribute_words_are_not_true_synonyms():
    people = sample_identities(60, 2)
    for k, attrs in enumerate(people):
        caption, info = describe(attrs, random.Random(k), noise="wrong_attr")
        (change,) = info["changes"]
        field = change["field"]
        if field.endswith("_colour"):
            palette = HAIR_PALETTE if field == "hair_colour" else PALETTE
            true_words = set(palette[change["true"]][1])
            assert set(change["words"]) <= set(palette[change["noisy"]][1])
            assert not set(change["words"]) & true_words
        assert set(info["words"]) <= set(tokenize_caption(caption))
        assert caption != info["clean"]


def test_caption_pair_rates_and_templates():
    attrs = sample_identities(1, 5)[0]
    pair = caption_pair(attrs, random.Random(0), noise_rate=0.0)
    assert len(pair) == 2 and pair[0][0] != pair[1][0] and pair[0][1] is None and pair[1][1] is None
    only_wrong = caption_pair(attrs, random.Random(0), noise_rate=1.0, wrong_attr_rate=1.0, irrelevant_rate=0.0)
    assert [info["kind"] for _, info in only_wrong] == ["wrong_attr", "wrong_attr"]
    # noise never rewords the clean text: the clean version equals the noise-free draw
    assert [info["clean"] for _, info in only_wrong] == [text for text, _ in pair]
    with pytest.raises(ValueError, match="noise"):
        describe(attrs, random.Random(0), noise="typo")
    with pytest.raises(ValueError, match="template"):
        describe(attrs, random.Random(0), template=len(TEMPLATES))


# --------------------------------------------------------------------------- config / CLI


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_rate=1.5), "noise_rate"),
        (dict(identities=0), "identities"),
        (dict(image_size=(16, 8)), "image_size"),
        (dict(image_format="gif"), "image_format"),
        (dict(wrong_attr_rate=0.0, irrelevant_rate=0.0), "wrong_attr_rate"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


def test_existing_output_needs_overwrite(runs, tmp_path):
    cfg = SyntheticConfig(identities=1, images_per_id=1, val_ids=0, test_ids=0, webperson_images=1)
    generate(tmp_path, cfg)
    with pytest.raises(FileExistsError, match="CUHK-PEDES"):
        generate(tmp_path, cfg)
    generate(tmp_path, dataclasses.replace(cfg, seed=1), overwrite=True)
    assert len(list((tmp_path / "CUHK-PEDES" / "imgs").rglob("*.jpg"))) == 1


def test_cli_writes_files(tmp_path):
    out = tmp_path / "synth"
    cmd = [
        sys.executable,
        str(REPO / "tools" / "make_synthetic.py"),
        "--out",
        str(out),
        "--identities",
        "3",
        "--images-per-id",
        "2",
        "--val-ids",
        "1",
        "--test-ids",
        "1",
        "--webperson-images",
        "4",
        "--shard-size",
        "2",
        "--seed",
        "1",
        "--workers",
        "1",
        "--noise-rate",
        "0.5",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    meta = _load(out, "meta.json")
    assert meta["config"]["identities"] == 3 and meta["config"]["noise_rate"] == 0.5
    assert meta["counts"]["benchmark"]["train"] == {"ids": 3, "images": 6, "captions": 12, "noisy_captions": 0}
    assert meta["counts"]["webperson"]["shards"] == 2
    assert len(_load(out / "CUHK-PEDES", "reid_raw.json")) == 10
    assert len(list((out / "WebPerson" / "shards").glob("*.tar"))) == 2
    bad = subprocess.run(
        cmd[:2] + ["--out", str(out), "--noise-rate", "2"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "noise_rate" in bad.stderr
