"""Shared fixtures: a small synthetic corpus generated once per test session."""

from __future__ import annotations

import importlib
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
    """tools/<name>.py as the module `tools.<name>`, imported once per process.

    One module object per tool: a second import under another name (or a re-execution)
    would give its functions a second identity, and a worker pool pickling them by
    name (tools/prepare_webperson.py) would then fail.
    """
    return importlib.import_module(f"tools.{name}")
