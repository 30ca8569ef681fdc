"""The README's "After the demo" commands, run in order on a demo's outputs.

tests/test_readme.py checks that every README command *parses*; this test *runs* the
walk-through a newcomer follows after `make demo`: the smaller demo is run the way
`make demo` runs it (`python tools/demo.py` from a working folder, default output paths),
then each `python tools/...` line of the section, verbatim, from that folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, load_tool
from tests.test_readme import README, readme_commands, split

SECTION = "## After the demo"


def section_text(text: str, heading: str) -> str:
    """The body of the README section that starts with `heading` (up to the next `## ` heading)."""
    assert heading + "\n" in text, f"README has no '{heading}' section"
    return text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]


WALKTHROUGH = [c for c in readme_commands(section_text(README, SECTION)) if c.startswith("python ")]


def run_python(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python tools/X.py ...` as a user runs it: this interpreter, the repository's tool, `cwd` as working folder."""
    assert argv[0] == "python" and argv[1].startswith("tools/"), argv
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GADMS_DEBUG", None)
    return subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory) -> Path:
    """A working folder holding what the (small) demo writes: runs/demo/ and data/synthetic/."""
    work = tmp_path_factory.mktemp("walkthrough")
    # The backbone cache in the test's folder, not the user's ~/.cache.
    result = run_python(["python", "tools/demo.py", "--small", "--backbone-cache", str(work / "backbones")], work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (work / "runs" / "demo" / "finetune" / "config.yaml").is_file()
    assert (work / "data" / "synthetic" / "CUHK-PEDES").is_dir()
    yield work
    shutil.rmtree(work, ignore_errors=True)


def test_the_walkthrough_covers_what_a_newcomer_does_next():
    tools = [Path(split(c)[1][1]).stem for c in WALKTHROUGH]
    for tool in ("check_data", "test", "search", "make_tables", "plot_curves", "robustness", "export"):
        assert tool in tools, f"the README's '{SECTION}' section has no tools/{tool}.py command"
    for command in WALKTHROUGH:
        assert "/data" not in command.replace("data/synthetic", ""), f"not a path the demo writes: {command}"


def test_the_walkthrough_runs_verbatim_after_the_demo(after_demo):
    for command in WALKTHROUGH:
        # The shell expands globs such as runs/* in the working folder before the tool sees them.
        _, words = split(command)
        argv = [w2 for w in words for w2 in (sorted(str(p.relative_to(after_demo)) for p in after_demo.glob(w))
                                              if "*" in w else [w])]
        result = run_python(argv, after_demo)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        tool = Path(argv[1]).stem
        if tool == "test":
            assert result.stdout.count("mINP") == 1 and "CUHK-PEDES" in result.stdout, result.stdout
        if tool == "make_tables":
            assert "demo/finetune" in result.stdout and "demo/pretrain" in result.stdout, result.stdout
        if tool == "check_data":
            assert "WebPerson" in result.stdout and "CUHK-PEDES" in result.stdout, result.stdout
    assert (after_demo / "runs" / "demo" / "search.png").stat().st_size > 1000
    assert (after_demo / "runs" / "demo" / "curves.pdf").read_bytes().startswith(b"%PDF")
    records = (after_demo / "runs" / "demo" / "finetune" / "robustness" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["noise"] for r in records] == ["none", "drop", "swap"]
    assert (after_demo / "runs" / "demo" / "release.pth").stat().st_size > 1000


def test_the_section_reader_stops_at_the_next_heading():
    text = "# T\n## A\n```\npython tools/a.py\n```\n## B\n```\npython tools/b.py\n```\n"
    assert readme_commands(section_text(text, "## A")) == ["python tools/a.py"]
    with pytest.raises(AssertionError):
        section_text(text, "## C")


def _run_folder(path: Path, task: str, r1: float) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"task: {task}\n")
    record = {"type": "eval", "epoch": 0, "dataset": "CUHK-PEDES", "split": "test", "task": "t2i", "R1": r1,
              "R5": r1 + 1, "R10": r1 + 2, "mAP": r1 - 1, "mINP": r1 - 2, "selection_split": "test"}
    (path / "metrics.jsonl").write_text(json.dumps(record) + "\n")


def test_make_tables_takes_a_folder_of_runs_as_its_runs(tmp_path, capsys):
    make_tables = load_tool("make_tables")
    _run_folder(tmp_path / "demo" / "pretrain", "pretrain", 31.0)
    _run_folder(tmp_path / "demo" / "finetune", "finetune", 42.0)
    (tmp_path / "demo" / "figures").mkdir()
    _run_folder(tmp_path / "solo", "finetune", 50.0)
    assert make_tables.main(["--runs", str(tmp_path / "demo"), str(tmp_path / "solo")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| demo/finetune | ours | 42.00 | 43.00 | 44.00 | 41.00 | 40.00 |") for line in lines)
    assert "| demo/pretrain | ours | 31.00 | 30.00 | – | – | – | – |" in lines
    assert any(line.startswith("| solo | ours | 50.00 |") for line in lines)
    # A folder with neither a metrics.jsonl nor runs inside is an error naming it.
    assert make_tables.main(["--runs", str(tmp_path / "demo" / "figures")]) == 2
    assert "no subfolder of" in capsys.readouterr().err
