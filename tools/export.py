"""Export a training checkpoint as a weights-only release file.

    python tools/export.py --checkpoint RUN/last.pth --out release.pth [--safetensors] [--trust]

The release holds ``{"model", "config", "num_classes", "format_version"}``: no
optimizer, scheduler, RNG or score-cache state. It loads with
``torch.load(weights_only=True)`` and through ``model.weights.load_pretrained``.
With ``--safetensors`` the state dict is also written as ``<out stem>.safetensors``,
with the config (JSON), ``num_classes`` and ``format_version`` in its metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Scripts run from anywhere: make the repository's top-level packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import save as safetensors_bytes  # noqa: E402

from model.weights import read_checkpoint, unwrap_state_dict  # noqa: E402
from utils.checkpoint import FORMAT_VERSION, atomic_save, atomic_write, to_weights_only_safe  # noqa: E402

RELEASE_FORMAT = "gadms_release"


def _num_classes(ckpt: object, state: dict[str, torch.Tensor]) -> int:
    if isinstance(ckpt, dict) and isinstance(ckpt.get("num_classes"), int):
        return ckpt["num_classes"]
    # Reference checkpoints do not record it; the ID classifier's rows are the identities.
    weight = state.get("classifier.weight")
    return int(weight.shape[0]) if weight is not None else 0


def _megabytes(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MB"


def export(checkpoint: Path, out: Path, *, write_safetensors: bool = False, trust: bool = False) -> list[Path]:
    """Write the release file (and optionally the safetensors file); returns the paths written."""
    if checkpoint.resolve() == out.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; choose another file name")
    if write_safetensors and out.suffix == ".safetensors":
        raise ValueError(f"--out {out}: name the .pth release; the .safetensors file is written beside it")
    ckpt = read_checkpoint(checkpoint, trust=trust)
    # Plain CPU tensors: a release must not depend on the device it was trained on.
    state = {k: v.detach().cpu() for k, v in unwrap_state_dict(ckpt, source=str(checkpoint)).items()}
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict):
        print(f"warning: {checkpoint} stores no config; the release has an empty one", file=sys.stderr)
        config = {}
    num_classes = _num_classes(ckpt, state)
    release = {"model": state, "config": config, "num_classes": num_classes,
               "format_version": FORMAT_VERSION, "format": RELEASE_FORMAT}
    # Reference checkpoints loaded with --trust may hold odd types in their config.
    atomic_save(to_weights_only_safe(release, "release"), out)
    written = [out]
    if write_safetensors:
        st_path = out.with_suffix(".safetensors")
        metadata = {"config": json.dumps(config, sort_keys=True), "num_classes": str(num_classes),
                    "format_version": str(FORMAT_VERSION), "format": RELEASE_FORMAT}
        # safetensors refuses tensors that share storage (e.g. tied weights): give each its own.
        tensors = {k: v.contiguous().clone() for k, v in state.items()}
        data = safetensors_bytes(tensors, metadata=metadata)
        atomic_write(st_path, lambda f: f.write(data))
        written.append(st_path)
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
    parser.add_argument("--trust", action="store_true",
                        help="allow checkpoints that need full unpickling (only for files you trust)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export(args.checkpoint, args.out, write_safetensors=args.safetensors, trust=args.trust)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
