"""The README's commands stay true: tools, flags, config keys, scripts and make targets exist.

Every command line in README.md (code blocks and inline code) is parsed the way
the shell would; `python tools/X.py ...` must be accepted by that tool's own
argument parser, config files it names must load with the overrides it gives,
`sh pretrain.sh` / `sh finetune.sh` are run with a stand-in Python to check the
torchrun command they build, and `make X` needs a Makefile target X. (What the
commands *do* is tested elsewhere: each tool has its tests, `make demo` runs the
demo, and tests/test_demo.py its smaller version.)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, load_tool
from utils.config import load_config

README = (REPO / "README.md").read_text(encoding="utf-8")
COMMAND_START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:python|sh|make)\s")


def readme_commands(text: str) -> list[str]:
    """Command lines of code blocks (joined at trailing backslashes, comments dropped) and inline code."""
    commands: list[str] = []
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    for block in blocks:
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip() if " # " in line else line.strip()
            if COMMAND_START.match(line):
                commands.append(line)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    commands += [c.strip() for c in re.findall(r"`([^`\n]+)`", prose) if COMMAND_START.match(c.strip())]
    return commands


COMMANDS = readme_commands(README)


def split(command: str) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, argv) of a shell command line."""
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def check_overrides(config: str, overrides: list[str], finetune: str | None = None) -> None:
    """The config file exists in the repository and loads with these overrides."""
    path = REPO / config
    assert path.is_file(), f"README names {config}, which does not exist"
    extra = [f"model.finetune={finetune}"] if finetune else []
    load_config(str(path), [o for o in overrides if "=" in o] + extra)


def test_readme_has_the_quickstart_and_many_commands():
    assert "make demo" in COMMANDS and "make test" in COMMANDS
    assert sum(c.startswith("python tools/") for c in COMMANDS) >= 10
    assert any(c.startswith("sh finetune.sh") for c in COMMANDS)
    assert any("sh pretrain.sh" in c for c in COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python ")])
def test_python_tool_commands_parse(command):
    _, argv = split(command)
    if argv[1] == "-m" or argv[1].startswith("bench/"):  # a module or a benchmark of the repository
        path = REPO / (argv[2].replace(".", "/") + ".py" if argv[1] == "-m" else argv[1])
        assert path.is_file() and 'if __name__ == "__main__":' in path.read_text(), f"not runnable: {command}"
        return
    assert argv[1].startswith("tools/") and argv[1].endswith(".py"), f"not a tool command: {command}"
    name = Path(argv[1]).stem
    assert (REPO / "tools" / f"{name}.py").is_file(), f"{command}: no tools/{name}.py"
    tool = load_tool(name)
    try:
        args = tool.parse_args(argv[2:])
    except SystemExit as exc:  # argparse rejects an unknown or malformed flag
        pytest.fail(f"README command is rejected by tools/{name}.py (exit {exc.code}): {command}")
    config = getattr(args, "config", None)
    if config and config.startswith("configs/"):
        check_overrides(config, list(getattr(args, "overrides", []) or []), getattr(args, "finetune", None))


@pytest.mark.parametrize("command", [c for c in COMMANDS if re.search(r"\bsh (pretrain|finetune)\.sh", c)])
def test_launch_scripts_build_a_valid_torchrun_command(command, tmp_path):
    env, argv = split(command)
    script = argv[1]
    record = tmp_path / "argv.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    fake.chmod(0o755)
    run_env = {**os.environ, **env, "PYTHON": str(fake), "NPROC": "1"}
    result = subprocess.run(["sh", str(REPO / script), *argv[2:]], env=run_env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    launched = record.read_text().splitlines()
    assert launched[:2] == ["-m", "torch.distributed.run"] and "--nproc_per_node=1" in launched
    train_argv = launched[launched.index("tools/train.py") + 1:]
    args = load_tool("train").parse_args(train_argv)
    if "CONFIG" in env:
        assert args.config == env["CONFIG"]
    check_overrides(args.config, args.overrides, args.finetune)


def test_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z_-]+):", makefile, flags=re.M))
    for command in COMMANDS:
        if command.startswith("make "):
            assert split(command)[1][1] in targets, command


def test_readme_config_paths_exist():
    for path in set(re.findall(r"configs/[\w/.-]+\.yaml", README)):
        assert (REPO / path).is_file(), path


def test_the_extractor_sees_continued_lines_and_drops_comments():
    text = "x\n```\npython tools/a.py --x 1 \\\n    --y \"two words\"   # note\nnot a command\n```\nand `make demo` here\n"
    assert readme_commands(text) == ['python tools/a.py --x 1 --y "two words"', "make demo"]
