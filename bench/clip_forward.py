"""CPU forward throughput of our CLIP vs open_clip's, same ViT-B/16 weights, at 384 x 128.

Usage: python bench/clip_forward.py [--batch 8] [--text-batch 32] [--iters 3] [--warmup 1] [--threads N]

Both models are timed in the same process, call by call in alternation, so machine load
affects them alike; the ratio ours / open_clip (throughput, >= 1.0 means ours is not
slower) is the median over paired calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.clip import CLIP, CLIP_PRESETS  # noqa: E402

IMAGE_SIZE = (384, 128)


def build_open_clip(preset: dict[str, int]) -> torch.nn.Module:
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return OpenCLIP(
        preset["embed_dim"],
        vision_cfg=CLIPVisionCfg(
            layers=preset["vision_layers"],
            width=preset["vision_width"],
            head_width=preset["vision_width"] // preset["vision_heads"],
            patch_size=preset["vision_patch_size"],
            image_size=IMAGE_SIZE,
        ),
        text_cfg=CLIPTextCfg(
            context_length=preset["context_length"],
            vocab_size=preset["vocab_size"],
            width=preset["transformer_width"],
            heads=preset["transformer_heads"],
            layers=preset["transformer_layers"],
        ),
        quick_gelu=True,
    )


def timed(fn, arg: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument("--text-batch", type=int, default=32, help="captions per forward")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per model and tower")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    preset = CLIP_PRESETS["ViT-B/16"]
    ours = CLIP(**preset, image_size=IMAGE_SIZE, stride_size=16).eval()
    theirs = build_open_clip(preset).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)

    images = torch.randn(args.batch, 3, *IMAGE_SIZE)
    ids = torch.zeros(args.text_batch, preset["context_length"], dtype=torch.long)
    ids[:, 0] = 49406
    ids[:, 1:30] = torch.randint(1, 49400, (args.text_batch, 29))
    ids[:, 30] = 49407

    towers = {
        "image": (images, args.batch, ours.encode_image, theirs.encode_image),
        "text": (ids, args.text_batch, ours.encode_text, theirs.encode_text),
    }
    print(
        f"ViT-B/16 random weights, {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, batch {args.batch} images / {args.text_batch} captions, "
        f"{args.warmup} warm-up + {args.iters} timed iters (interleaved, medians)"
    )
    with torch.inference_mode():
        for name, (inputs, n, ours_fn, theirs_fn) in towers.items():
            for fn in (ours_fn, theirs_fn):
                for _ in range(args.warmup):
                    fn(inputs)
            # Alternate the two models call by call so load from other processes hits
            # both alike; medians discard the calls that were badly disturbed.
            # The order flips every iteration so neither model always runs second.
            ours_t, theirs_t = [], []
            for i in range(args.iters):
                if i % 2:
                    theirs_t.append(timed(theirs_fn, inputs))
                    ours_t.append(timed(ours_fn, inputs))
                else:
                    ours_t.append(timed(ours_fn, inputs))
                    theirs_t.append(timed(theirs_fn, inputs))
            paired_ratio = statistics.median(t / o for o, t in zip(ours_t, theirs_t, strict=True))
            unit = "images/s" if name == "image" else "captions/s"
            ours_rate, theirs_rate = n / statistics.median(ours_t), n / statistics.median(theirs_t)
            print(
                f"{name:5s}: ours {ours_rate:6.2f} {unit}  open_clip {theirs_rate:6.2f} {unit}  "
                f"ratio ours/open_clip {paired_ratio:.3f} (median of paired calls)"
            )


if __name__ == "__main__":
    main()
