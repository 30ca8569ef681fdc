"""The synthetic corpus is real data to our loaders: builders and the data checker accept it."""

import shutil
import subprocess
import sys

from datasets import build_dataset
from tests.conftest import REPO


def test_synthetic_benchmark_loads_through_the_cuhk_builder(synthetic_root):
    data = build_dataset("CUHK-PEDES", str(synthetic_root))
    assert data.num_classes == 24                       # train identities remapped to 0..23
    assert sorted(set(data.train.pids.tolist())) == list(range(24))
    assert len(data.train) == 24 * 3 * 2                 # two captions per image
    assert len(data.val.img_paths) == 8 * 3 and len(data.test.captions) == 8 * 3 * 2
    assert not set(data.val.image_pids) & set(data.test.image_pids)


def test_synthetic_webperson_formats_agree(synthetic_root):
    samples = {}
    for annotation in ("annotations.json", "annotations.jsonl", "shards"):
        data = build_dataset("WebPerson", str(synthetic_root), annotation=annotation)
        assert data.num_classes == 96 and len(data.train) == 192
        samples[annotation] = [data.train[i][::3] for i in range(len(data.train))]  # (pid, caption)
    assert samples["annotations.json"] == samples["annotations.jsonl"] == samples["shards"]


def test_synthetic_corpus_passes_check_data(synthetic_root):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "check_data.py"), "--root", str(synthetic_root),
                             "--name", "CUHK-PEDES"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (synthetic_root / "CUHK-PEDES" / "imgs" / "test").rename(synthetic_root / "moved")
    try:
        broken = subprocess.run([sys.executable, str(REPO / "tools" / "check_data.py"), "--root",
                                 str(synthetic_root), "--name", "CUHK-PEDES"],
                                capture_output=True, text=True, cwd=REPO, timeout=300)
    finally:
        (synthetic_root / "moved").rename(synthetic_root / "CUHK-PEDES" / "imgs" / "test")
    assert broken.returncode != 0
    assert "test/" in broken.stdout + broken.stderr


def run_check_data(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "check_data.py"), *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_check_data_checks_every_annotation_of_a_folder_holding_several(synthetic_root, tmp_path):
    """The generator writes WebPerson as JSON, JSON lines and tar shards: each is checked, each reported."""
    result = run_check_data("--root", str(synthetic_root), "--name", "WebPerson")
    assert result.returncode == 0, result.stdout + result.stderr
    for label in ("annotations.json", "annotations.jsonl", "shards/*.tar"):
        assert f"== WebPerson ({label}) ==" in result.stdout, result.stdout
    assert result.stdout.count("checking 96 of 96 images") == 3

    copy = tmp_path / "root"
    shutil.copytree(synthetic_root / "WebPerson", copy / "WebPerson")
    lines = (copy / "WebPerson" / "annotations.jsonl").read_text().splitlines(keepends=True)
    lines[5] = "{not json\n"
    (copy / "WebPerson" / "annotations.jsonl").write_text("".join(lines))
    broken = run_check_data("--root", str(copy))
    assert broken.returncode == 1
    assert "[WebPerson (annotations.jsonl)]" in broken.stderr and "line 6" in broken.stderr, broken.stderr
    assert "[WebPerson (annotations.json)]" not in broken.stderr and "[WebPerson (shards/*.tar)]" not in broken.stderr
    chosen = run_check_data("--root", str(copy), "--annotation", "annotations.json")
    assert chosen.returncode == 0 and "== WebPerson ==" in chosen.stdout, chosen.stdout + chosen.stderr


def test_check_data_on_the_parent_of_a_data_root_names_the_root(synthetic_root, tmp_path):
    (tmp_path / "synthetic").symlink_to(synthetic_root)
    result = run_check_data("--root", str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path / 'synthetic'} holds datasets: pass it as --root" in result.stderr, result.stderr
