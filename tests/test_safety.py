"""No tool deletes or overwrites what it did not make (issue #12, item 1).

The demo and the synthetic generator write only into new, empty or marked folders;
the export tool replaces a file only with --overwrite and writes only weights that
load into the model their checkpoint's config describes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.synthetic import MARKER, OutputExistsError, SyntheticConfig, generate
from model import build_model
from model.weights import load_pretrained
from tests.conftest import REPO, load_tool
from utils.checkpoint import Checkpointer
from utils.config import load_config

TINY_DATA = dict(identities=2, images_per_id=1, val_ids=1, test_ids=1, webperson_images=2, shard_size=2)


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under `root` (folders included) -> SHA-256 of its bytes ("dir" for folders)."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def user_data(tmp_path) -> Path:
    """A real data root as a user keeps it: CUHK-PEDES with annotations and an image, WebPerson, notes."""
    root = tmp_path / "data"
    (root / "CUHK-PEDES" / "imgs" / "cam_a").mkdir(parents=True)
    (root / "CUHK-PEDES" / "reid_raw.json").write_text(json.dumps(
        [{"split": "train", "captions": ["a man in a red coat"], "file_path": "cam_a/001.jpg", "id": 1}]))
    (root / "CUHK-PEDES" / "imgs" / "cam_a" / "001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "WebPerson" / "images").mkdir(parents=True)
    (root / "WebPerson" / "annotations.json").write_text("[]")
    (root / "notes.txt").write_text("my download log\n")
    return root


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --------------------------------------------------------------------------- demo and generator


def test_demo_refuses_a_data_root_of_user_files(user_data, tmp_path, capsys):
    before = tree_digest(user_data)
    demo = load_tool("demo")
    out = tmp_path / "out"
    assert demo.main(["--small", "--no-figures", "--out", str(out), "--data", str(user_data)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(user_data), "delete")
    assert tree_digest(user_data) == before
    assert not out.exists()  # refused before anything was written


def test_demo_refuses_an_output_folder_of_user_files(user_data, tmp_path, capsys):
    before = tree_digest(user_data)
    demo = load_tool("demo")
    assert demo.main(["--small", "--no-figures", "--out", str(user_data), "--data", str(tmp_path / "synth")]) == 2
    assert_one_error_line(capsys.readouterr().err, str(user_data))
    assert tree_digest(user_data) == before
    assert not (tmp_path / "synth").exists()


def test_demo_folders_new_empty_or_marked_are_accepted(tmp_path, capsys):
    demo = load_tool("demo")
    config = SyntheticConfig(**TINY_DATA)
    empty_out, data = tmp_path / "out", tmp_path / "data"
    empty_out.mkdir()
    demo.prepare_folders(empty_out, data, config, small=True)  # empty output folder, new data folder
    (empty_out / "old-result.txt").write_text("from an earlier demo run")
    demo.prepare_folders(empty_out, data, config, small=True)  # marked: replaced
    assert sorted(p.name for p in empty_out.iterdir()) == [demo.DEMO_MARKER]
    data.mkdir()
    demo.ensure_data(data, config)  # empty data folder: generated
    assert "generating" in capsys.readouterr().out and (data / MARKER).is_file()
    demo.ensure_data(data, config)
    assert "reusing" in capsys.readouterr().out
    demo.ensure_data(data, SyntheticConfig(**{**TINY_DATA, "seed": 1}))  # marked, other settings: regenerated
    assert json.loads((data / "meta.json").read_text())["config"]["seed"] == 1
    assert json.loads((data / MARKER).read_text())["config"]["seed"] == 1


def test_generate_overwrite_refuses_unmarked_folders(user_data):
    before = tree_digest(user_data)
    with pytest.raises(OutputExistsError, match="delete"):
        generate(user_data, SyntheticConfig(**TINY_DATA), overwrite=True)
    assert tree_digest(user_data) == before


def test_make_synthetic_refuses_user_files(user_data, tmp_path):
    before = tree_digest(user_data)
    cmd = [sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--out", str(user_data), "--overwrite",
           "--identities", "2", "--images-per-id", "1", "--val-ids", "1", "--test-ids", "1",
           "--webperson-images", "2", "--workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, str(user_data))
    assert tree_digest(user_data) == before

    # A contact sheet never replaces an existing file without --overwrite, and is checked before generating.
    sheet = tmp_path / "photo.png"
    sheet.write_bytes(b"my photo")
    cmd[cmd.index("--out") + 1] = str(tmp_path / "synth")
    cmd.remove("--overwrite")
    result = subprocess.run(cmd + ["--sheet", str(sheet)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, str(sheet), "--overwrite")
    assert sheet.read_bytes() == b"my photo" and not (tmp_path / "synth").exists()


@pytest.mark.parametrize("layout", ["same", "data_inside_out", "out_inside_data"])
def test_demo_refuses_overlapping_out_and_data_before_writing(tmp_path, capsys, layout):
    out, data = {"same": ("same", "same"), "data_inside_out": ("out", "out/data"),
                 "out_inside_data": ("data/out", "data")}[layout]
    demo = load_tool("demo")
    assert demo.main(["--small", "--no-figures", "--out", str(tmp_path / out), "--data", str(tmp_path / data)]) == 2
    assert_one_error_line(capsys.readouterr().err, "--out", "--data", "two separate folders")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["out", "data"])
def test_demo_refuses_folders_under_a_file_before_writing(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    folders = {"out": tmp_path / "out", "data": tmp_path / "data", where: blocker / where}
    demo = load_tool("demo")
    assert demo.main(["--small", "--no-figures", "--out", str(folders["out"]), "--data", str(folders["data"])]) == 2
    assert_one_error_line(capsys.readouterr().err, f"--{where}", f"{blocker} is a file, not a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]


def test_make_synthetic_checks_its_outputs_before_generating(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    tool = load_tool("make_synthetic")
    base = ["--identities", "2", "--images-per-id", "1", "--val-ids", "1", "--test-ids", "1",
            "--webperson-images", "2", "--workers", "1"]
    cases = [
        (["--out", str(blocker / "synth")], ("--out", f"{blocker} is a file, not a folder")),
        (["--out", str(tmp_path / "synth"), "--sheet", str(blocker / "s.png")], ("--sheet", f"{blocker} is a file")),
        (["--out", str(tmp_path / "synth"), "--sheet", str(tmp_path / "sheet.nope")], ("--sheet", "extension")),
        (["--out", str(tmp_path / "synth"), "--sheet", str(tmp_path)], ("--sheet", "is a folder")),
    ]
    for extra, fragments in cases:
        assert tool.main(base + extra) == 2, extra
        assert_one_error_line(capsys.readouterr().err, *fragments)
        assert [p.name for p in tmp_path.iterdir()] == ["blocker"]


# --------------------------------------------------------------------------- export


def export_main(argv: list[str]) -> int:
    return load_tool("export").main(argv)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A fine-tuning checkpoint of the demo's tiny model (with its resolved config)."""
    cfg = load_config(str(REPO / "configs" / "demo" / "tiny_finetune.yaml"), [])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3)
    run = tmp_path_factory.mktemp("run")
    Checkpointer(run, model=model, config=cfg, num_classes=3).save("last", epoch=1, step=10)
    return run / "last.pth"


def altered_copy(source: Path, target: Path, change) -> Path:
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    change(ckpt["model"])
    torch.save(ckpt, target)
    return target


def test_export_refuses_existing_output_unless_overwrite(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "release.pth"
    out.write_bytes(b"an earlier release")
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(out), "--overwrite")
    assert out.read_bytes() == b"an earlier release"

    # The safetensors file beside it is protected too.
    fresh, beside = tmp_path / "fresh.pth", tmp_path / "fresh.safetensors"
    beside.write_bytes(b"keep me")
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(fresh), "--safetensors"]) == 2
    assert beside.read_bytes() == b"keep me" and not fresh.exists()

    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert torch.load(out, weights_only=True)["num_classes"] == 3


def test_export_never_overwrites_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    before = tiny_checkpoint.read_bytes()
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tiny_checkpoint), "--overwrite"]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    link = tmp_path / "link.pth"
    link.hardlink_to(tiny_checkpoint)
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(link), "--overwrite"]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    assert tiny_checkpoint.read_bytes() == before


def drop_token_row(state: dict) -> None:
    state["base_model.token_embedding.weight"] = state["base_model.token_embedding.weight"][:-1].clone()


def rename_head_key(state: dict) -> None:
    state["mlm_head.renamed.weight"] = state.pop("mlm_head.fc.weight")


@pytest.mark.parametrize("change, key", [(drop_token_row, "base_model.token_embedding.weight"),
                                         (rename_head_key, "mlm_head.renamed.weight")])
def test_export_refuses_weights_that_do_not_fit_the_model(tiny_checkpoint, tmp_path, capsys, change, key):
    bad = altered_copy(tiny_checkpoint, tmp_path / "bad.pth", change)
    out = tmp_path / "release.pth"
    assert export_main(["--checkpoint", str(bad), "--out", str(out), "--safetensors"]) == 2
    assert_one_error_line(capsys.readouterr().err, str(bad), key, "nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def test_export_of_a_good_checkpoint_loads(tiny_checkpoint, tmp_path):
    out = tmp_path / "release.pth"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    release = torch.load(out, weights_only=True)
    cfg = load_config(str(REPO / "configs" / "demo" / "tiny_finetune.yaml"), [])
    model = build_model(cfg, num_classes=release["num_classes"])
    report = load_pretrained(model, out, allowed_missing=())
    assert not report.missing and not report.unexpected
    saved = torch.load(tiny_checkpoint, weights_only=True)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_export_without_config_checks_the_backbone(tiny_checkpoint, tmp_path, capsys):
    """The GA-DMS authors' / IRRA's files store no config: the backbone is checked, with a note."""
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    plain = tmp_path / "reference.pth"
    torch.save({"model": ckpt["model"]}, plain)
    assert export_main(["--checkpoint", str(plain), "--out", str(tmp_path / "ok.pth")]) == 0
    assert "heads and classifier could not be" in capsys.readouterr().err

    state = dict(ckpt["model"])
    state.pop("base_model.ln_final.weight")
    torch.save({"model": state}, tmp_path / "broken.pth")
    assert export_main(["--checkpoint", str(tmp_path / "broken.pth"), "--out", str(tmp_path / "no.pth")]) == 2
    assert_one_error_line(capsys.readouterr().err, "broken.pth", "ln_final.weight")
    assert not (tmp_path / "no.pth").exists()
