#!/usr/bin/env python
"""Cost of GASS inside one GA-DMS pretraining step (ViT-B/16, 384x128, CPU).

Times, in one run and interleaved round by round (so machine noise hits all
variants alike): a full training step (forward, backward, Adam step) with GASS
off, with our GASS (one autograd call for all scored layers), and with GASS done
the reference way (one autograd call per scored layer). Also times the GASS
call alone, both ways. Weights are random; only time is measured.

    python bench/train_step.py [--batch 8] [--rounds 3] [--arch ViT-B/16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.build import build_model  # noqa: E402
from model.gass import gass_scores  # noqa: E402
from utils.config import load_config  # noqa: E402

SOT, EOT, MASK = 49406, 49407, 49405


def make_batch(batch: int, image_size: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(20, 60, (1,), generator=g))  # typical caption lengths
        ids[b, 0] = SOT
        ids[b, 1:n + 1] = torch.randint(1, MASK, (n,), generator=g)
        ids[b, n + 1] = EOT
    labels = torch.zeros_like(ids)
    selected = (torch.rand(ids.shape, generator=g) < 0.3) & (ids > 0) & (ids < MASK)
    labels[selected] = ids[selected]
    mlm_ids = ids.masked_fill(selected, MASK)
    return {"images": torch.randn(batch, 3, *image_size, generator=g), "pids": torch.arange(batch) // 2,
            "caption_ids": ids, "noise_ids": ids.clone(), "mlm_ids": mlm_ids, "mlm_labels": labels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"model.clip.arch={args.arch}", "model.clip.pretrained=", "model.loss_names=sdm+mlm"])
    image_size = tuple(cfg.model.clip.image_size)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-3)
    batch = make_batch(args.batch, image_size)
    num_layers = cfg.gass.num_layers

    def step(mode: str) -> float:
        model.gass = mode != "off"
        start = time.perf_counter()
        sum(model(batch).losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def step_per_layer() -> float:
        # Same step, GASS computed the reference way inside it.
        model.gass = False
        start = time.perf_counter()
        losses = model(batch).losses
        # GASS cost does not depend on the feature values: stand-ins avoid a second image pass.
        feats = torch.randn(args.batch, model.embed_dim)
        gass_scores(model.base_model, feats, batch["caption_ids"], num_layers, single_backward=False)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def gass_only(single: bool) -> float:
        feats = torch.randn(args.batch, model.embed_dim)
        start = time.perf_counter()
        gass_scores(model.base_model, feats, batch["caption_ids"], num_layers, single_backward=single)
        return time.perf_counter() - start

    print(f"{args.arch} at {image_size[0]}x{image_size[1]}, batch {args.batch}, {num_layers} scored layers, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds after 1 warm-up")
    step("off")
    step("ours")
    times: dict[str, list[float]] = {k: [] for k in ("off", "ours", "per_layer", "gass_ours", "gass_per_layer")}
    for _ in range(args.rounds):
        times["off"].append(step("off"))
        times["ours"].append(step("ours"))
        times["per_layer"].append(step_per_layer())
        times["gass_ours"].append(gass_only(True))
        times["gass_per_layer"].append(gass_only(False))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'variant':<36}{'median s':>10}")
    print(f"{'step, GASS off':<36}{med['off']:>10.3f}")
    print(f"{'step, GASS (ours, one backward)':<36}{med['ours']:>10.3f}")
    print(f"{'step, GASS (per-layer backward)':<36}{med['per_layer']:>10.3f}")
    print(f"{'GASS alone, ours':<36}{med['gass_ours']:>10.3f}")
    print(f"{'GASS alone, per-layer':<36}{med['gass_per_layer']:>10.3f}")
    print(f"GASS overhead on the step: ours +{100 * (med['ours'] / med['off'] - 1):.1f}% (goal <= 15%), "
          f"per-layer +{100 * (med['per_layer'] / med['off'] - 1):.1f}%")
    print(f"GASS speed-up, ours vs per-layer: {med['gass_per_layer'] / med['gass_ours']:.2f}x (goal >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
