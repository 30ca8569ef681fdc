"""Export a training checkpoint as a weights-only release file.

    python tools/export.py --checkpoint RUN/last.pth --out release.pth [--safetensors] [--trust] [--overwrite]

The release holds ``{"model", "config", "num_classes", "format_version"}``: no
optimizer, scheduler, RNG or score-cache state. It loads with
``torch.load(weights_only=True)`` and through ``model.weights.load_pretrained``.
With ``--safetensors`` the state dict is also written as ``<out stem>.safetensors``,
with the config (JSON), ``num_classes`` and ``format_version`` in its metadata.

Nothing is written unless the weights are verified first: they must load strictly
(every key, every shape) into the model the checkpoint's stored config describes. A
checkpoint without a config (the GA-DMS authors', IRRA's) is checked as far as it
can be: its CLIP backbone must build from it exactly. An existing output file is
replaced only with ``--overwrite``, and the checkpoint itself never is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Scripts run from anywhere: make the repository's top-level packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import save as safetensors_bytes  # noqa: E402

from model import build_model  # noqa: E402
from model.clip import backbone_state_dict, clip_from_state_dict  # noqa: E402
from model.weights import IncompatibleWeightsError, load_model_weights, unwrap_state_dict  # noqa: E402
from utils.checkpoint import FORMAT_VERSION, atomic_save, atomic_write, read_checkpoint, to_weights_only_safe  # noqa: E402
from utils.cli import ToolError, run_tool  # noqa: E402
from utils.config import Config, load_config  # noqa: E402
from utils.output_paths import unwritable_reason  # noqa: E402

RELEASE_FORMAT = "gadms_release"


def _num_classes(ckpt: object, state: dict[str, torch.Tensor]) -> int:
    if isinstance(ckpt, dict) and isinstance(ckpt.get("num_classes"), int):
        return ckpt["num_classes"]
    # Reference checkpoints do not record it; the ID classifier's rows are the identities.
    weight = state.get("classifier.weight")
    return int(weight.shape[0]) if weight is not None else 0


def _megabytes(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MB"


def _same_file(a: Path, b: Path) -> bool:
    # samefile also catches hard links, which resolve() cannot see.
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def _check_outputs(checkpoint: Path, outputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that are the checkpoint, a folder, unwritable, or (without `overwrite`) an existing file."""
    for path in outputs:
        if _same_file(path, checkpoint):
            raise ToolError(f"--out {path} is the checkpoint itself; choose another file name")
        if path.is_dir():
            raise ToolError(f"--out {path} is a folder; name the release file, e.g. {path / 'release.pth'}")
        if path.exists() and not overwrite:
            raise ToolError(f"{path} exists and is left as it is; choose another --out, or pass --overwrite "
                            "to replace it")
        reason = unwritable_reason(path)
        if reason is not None:
            raise ToolError(f"--out {path} cannot be written: {reason}; choose another path")


def _overlay(base: dict, stored: Mapping) -> dict:
    """`stored` over `base`, recursively: keys added since a config was saved keep their defaults."""
    for key, value in stored.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _overlay(base[key], value)
        else:
            base[key] = value
    return base


def _one_line(err: Exception) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _any_grid_size(clip_state: Mapping[str, torch.Tensor]) -> tuple[tuple[int, int], int]:
    """(image_size, stride) whose patch grid has as many positions as the checkpoint's.

    Without a config the grid's height and width are unknown, but no weight's shape
    depends on them: an n x 1 grid of n positions fits every layout.
    """
    pos, conv = clip_state.get("visual.positional_embedding"), clip_state.get("visual.conv1.weight")
    if pos is None or conv is None:  # clip_from_state_dict names what is missing
        return (384, 128), 16
    patch, positions = int(conv.shape[-1]), int(pos.shape[0]) - 1
    return (positions * patch, patch), patch


def verify(state: dict[str, torch.Tensor], config: dict | None, num_classes: int, checkpoint: Path) -> bool:
    """Check that `state` loads into the model `config` describes, strictly.

    Without a config only the CLIP backbone can be checked (it must build from `state`
    exactly). Returns whether the whole model was verified.

    Raises:
        ToolError: naming `checkpoint` and the keys that do not fit.
    """
    # Loading checks keys and shapes only, so a weightless ("meta") model does: it builds
    # instantly at any size, and copying weights into it is a no-op.
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        if not config:
            clip_state = backbone_state_dict(state, source=str(checkpoint))
            image_size, stride = _any_grid_size(clip_state)
            try:
                clip_from_state_dict(clip_state, image_size, stride, source=str(checkpoint))
            except (RuntimeError, ValueError) as err:
                raise ToolError(f"{checkpoint}: its CLIP backbone does not build from it: {_one_line(err)}; "
                                "nothing written") from err
            return False
        try:
            cfg = Config(_overlay(load_config(None).to_dict(), config))
            # The architecture preset, not a weights file: every weight must come from `state`.
            cfg.model.clip.pretrained = ""
            model = build_model(cfg, num_classes=num_classes)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ToolError(f"{checkpoint}: cannot build the model its stored config describes "
                            f"({_one_line(err)}); nothing written") from err
        try:
            load_model_weights(model, state, source=str(checkpoint))
        except IncompatibleWeightsError as err:
            raise ToolError(f"{_one_line(err)}; nothing written") from err
    return True


def export(checkpoint: Path, out: Path, *, write_safetensors: bool = False, trust: bool = False,
           overwrite: bool = False) -> list[Path]:
    """Verify the checkpoint, then write the release file (and optionally the safetensors file).

    Returns:
        The paths written.

    Raises:
        ToolError: a refused output path, an unreadable checkpoint, or weights that do
            not fit the model; then nothing is written.
    """
    if write_safetensors and out.suffix == ".safetensors":
        raise ToolError(f"--out {out}: name the .pth release; the .safetensors file is written beside it")
    st_path = out.with_suffix(".safetensors")
    _check_outputs(checkpoint, [out, st_path] if write_safetensors else [out], overwrite)
    try:
        ckpt: Any = read_checkpoint(checkpoint, trust=trust)
    except (FileNotFoundError, RuntimeError) as err:
        raise ToolError(str(err)) from err
    # Plain CPU tensors: a release must not depend on the device it was trained on.
    state = {k: v.detach().cpu() for k, v in unwrap_state_dict(ckpt, source=str(checkpoint)).items()}
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict):
        config = {}
    num_classes = _num_classes(ckpt, state)
    if not verify(state, config, num_classes, checkpoint):
        print(f"note: {checkpoint} stores no config, so the release has an empty one, and only its CLIP backbone "
              "was verified (every key and shape); its heads and classifier could not be", file=sys.stderr)
    release = {"model": state, "config": config, "num_classes": num_classes,
               "format_version": FORMAT_VERSION, "format": RELEASE_FORMAT}
    # Reference checkpoints loaded with --trust may hold odd types in their config.
    release = to_weights_only_safe(release, "release")
    written = []
    try:
        atomic_save(release, out)
        written.append(out)
        if write_safetensors:
            metadata = {"config": json.dumps(config, sort_keys=True), "num_classes": str(num_classes),
                        "format_version": str(FORMAT_VERSION), "format": RELEASE_FORMAT}
            # safetensors refuses tensors that share storage (e.g. tied weights): give each its own.
            tensors = {k: v.contiguous().clone() for k, v in state.items()}
            data = safetensors_bytes(tensors, metadata=metadata)
            atomic_write(st_path, lambda f: f.write(data))
            written.append(st_path)
    except OSError as err:
        target, done = (st_path, f"only {out} was written") if written else (out, "nothing written")
        raise ToolError(f"cannot write {target}: {err.strerror or err}; {done}") from err
    params = sum(v.numel() for v in state.values())
    for path in written:
        print(f"wrote {path} ({_megabytes(path)}; {len(state)} tensors, {params:,} values, "
              f"num_classes={num_classes})")
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="training checkpoint, e.g. RUN/last.pth")
    parser.add_argument("--out", required=True, type=Path, help="release file to write, e.g. release.pth")
    parser.add_argument("--safetensors", action="store_true", help="also write <out stem>.safetensors")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (never the checkpoint itself)")
    parser.add_argument("--trust", action="store_true",
                        help="allow checkpoints that need full unpickling (only for files you trust)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Export as `args` says."""
    export(args.checkpoint, args.out, write_safetensors=args.safetensors, trust=args.trust,
           overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
