"""Generate the synthetic person-retrieval corpus (CUHK-PEDES-format benchmark + WebPerson-format pretraining set).

Example:
    python tools/make_synthetic.py --out data/synthetic --identities 200 --seed 0 --workers 2

--out must be a new or empty folder, or one this tool made (it holds .gadms-synthetic);
a folder of other files (e.g. your real data root) is refused, never written into.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from datasets.synthetic import (  # noqa: E402
    MARKER,
    SyntheticConfig,
    check_claimable,
    contact_sheet,
    generate,
    render_person,
    sample_identities,
)
from utils.cli import ToolError, run_tool  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SyntheticConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True,
                   help=f"output root (gets CUHK-PEDES/, WebPerson/, meta.json, ...): new, empty or made by this "
                        f"tool ({MARKER})")
    p.add_argument("--identities", type=int, default=d.identities, help="benchmark training identities")
    p.add_argument("--images-per-id", type=int, default=d.images_per_id)
    p.add_argument("--val-ids", type=int, default=d.val_ids)
    p.add_argument("--test-ids", type=int, default=d.test_ids)
    p.add_argument("--webperson-images", type=int, default=d.webperson_images)
    p.add_argument("--noise-rate", type=float, default=d.noise_rate, help="share of noisy WebPerson captions")
    p.add_argument(
        "--benchmark-noise-rate",
        type=float,
        default=d.benchmark_noise_rate,
        help="share of noisy benchmark train captions (val/test stay clean)",
    )
    p.add_argument("--wrong-attr-rate", type=float, default=d.wrong_attr_rate)
    p.add_argument("--irrelevant-rate", type=float, default=d.irrelevant_rate)
    p.add_argument("--image-size", type=int, nargs=2, default=list(d.image_size), metavar=("H", "W"))
    p.add_argument("--shard-size", type=int, default=d.shard_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--image-format", choices=("jpg", "png"), default=d.image_format)
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true",
                   help="replace the CUHK-PEDES/ and WebPerson/ folders of an earlier run of this tool "
                        "(and an existing --sheet file)")
    p.add_argument("--sheet", default=None, help="also save a contact sheet PNG of 24 sample renders here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Generate the corpus (and the contact sheet) as `args` says."""
    try:
        cfg = SyntheticConfig(
            identities=args.identities,
            images_per_id=args.images_per_id,
            val_ids=args.val_ids,
            test_ids=args.test_ids,
            webperson_images=args.webperson_images,
            noise_rate=args.noise_rate,
            benchmark_noise_rate=args.benchmark_noise_rate,
            wrong_attr_rate=args.wrong_attr_rate,
            irrelevant_rate=args.irrelevant_rate,
            image_size=tuple(args.image_size),
            shard_size=args.shard_size,
            seed=args.seed,
            image_format=args.image_format,
            jpeg_quality=args.jpeg_quality,
        )
    except ValueError as exc:
        raise ToolError(str(exc)) from exc
    # Every refusal comes before minutes of rendering, not after.
    check_claimable(Path(args.out), what="--out")
    if args.sheet:
        if Path(args.sheet).is_file() and not args.overwrite:
            raise ToolError(f"--sheet {args.sheet} exists; choose another file name or pass --overwrite to replace it")
        check_output_path(args.sheet, "--sheet")
        if Path(args.sheet).suffix.lower() not in Image.registered_extensions():
            raise ToolError(f"--sheet {args.sheet}: unknown image file extension; name a .png (or .jpg) file")
    start = time.perf_counter()
    counts = generate(args.out, cfg, workers=max(1, args.workers), overwrite=args.overwrite)
    elapsed = time.perf_counter() - start
    print(json.dumps(counts, indent=2, sort_keys=True))
    print(f"wrote {args.out} in {elapsed:.1f} s with {max(1, args.workers)} worker(s)")
    if args.sheet:
        people = sample_identities(24, cfg.seed)
        images = [render_person(p, random.Random(i), cfg.image_size) for i, p in enumerate(people)]
        contact_sheet(images, columns=12, scale=3).save(args.sheet)
        print(f"contact sheet: {args.sheet}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
