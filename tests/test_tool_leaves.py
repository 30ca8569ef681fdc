"""Every script in tools/ is a leaf: it imports the library, never another tool (#13).

What two tools share lives in the library (utils/, processor/, model/, datasets/), so a
tool can change without breaking another and the demo runs its steps through the same
library functions as the tools. tools/curate/ is one package: its modules may import
each other (tools.curate.*), but nothing else of tools/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

TOOLS = REPO / "tools"
#: Calls that load a module by name or by file path.
_LOADERS = ("import_module", "__import__", "spec_from_file_location", "run_path")


def _is_tool_module(name: str) -> bool:
    return name == "tools" or name.startswith("tools.")


def tool_imports(source: str, own_package: str | None = None) -> list[str]:
    """The imports of other tools in `source` (a file of tools/), as "line: what" strings.

    `own_package` ("tools.curate") is the package the file belongs to; its own modules may be imported.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import reaches into tools/ (or its package)
                if own_package is None or node.level > 1:
                    found.append(f"{node.lineno}: relative import from {'.' * node.level}{node.module or ''}")
                continue
            names = [node.module or ""]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called == "spec_from_file_location":
                found.append(f"{node.lineno}: loads a module by file path ({called})")
            elif called in _LOADERS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) and _is_tool_module(node.args[0].value):
                names = [node.args[0].value]
        for name in names:
            if _is_tool_module(name) and not (own_package and (name == own_package or
                                                               name.startswith(own_package + "."))):
                found.append(f"{node.lineno}: {name}")
    return found


def _tool_files() -> list[tuple[Path, str | None]]:
    files: list[tuple[Path, str | None]] = [(path, None) for path in sorted(TOOLS.glob("*.py"))]
    files += [(path, "tools.curate") for path in sorted((TOOLS / "curate").rglob("*.py"))]
    return files


def test_no_tool_imports_another_tool():
    files = _tool_files()
    assert len(files) > 10, "tools/ not found where the test looks for it"
    offenders = [f"{path.relative_to(REPO)}:{hit}" for path, package in files
                 for hit in tool_imports(path.read_text(encoding="utf-8"), package)]
    assert offenders == [], "tools import other tools (move what they share into the library):\n" + "\n".join(
        offenders)


@pytest.mark.parametrize("source", [
    "from tools.search import load_run_model",
    "import tools.common",
    "import tools",
    "from tools import search",
    "from . import search",
    "from .search import load_run_model",
    "import importlib\nimportlib.import_module('tools.search')",
    "import importlib.util\nspec = importlib.util.spec_from_file_location('x', 'tools/search.py')",
    "def f():\n    from tools.pretrain_backbone import make_backbone",
])
def test_the_check_finds_every_form_of_tool_import(source):
    assert tool_imports(source), source


def test_the_check_lets_the_library_and_a_package_s_own_modules_through():
    library = "from utils.cli import run_tool\nimport processor.backbone\nfrom model.clip import CLIP"
    assert tool_imports(library) == []
    assert tool_imports("from tools.curate.store import StageDir\nfrom .net import fetch", "tools.curate") == []
    assert tool_imports("from tools.search import embed_texts", "tools.curate") == ["1: tools.search"]
