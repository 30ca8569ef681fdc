"""Shared fixtures: a small synthetic corpus generated once per test session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic benchmark (CUHK-PEDES format) + WebPerson corpus."""
    from datasets.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, SyntheticConfig(identities=24, images_per_id=3, val_ids=8, test_ids=8,
                                   webperson_images=96, shard_size=48, seed=3), workers=1)
    return root


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
