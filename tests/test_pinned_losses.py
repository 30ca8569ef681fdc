"""Pinned losses: the first training steps of the tiny presets, as literal numbers.

Contract tests compare two implementations; when both drift together (a change
in the model, the masks, the data path or the loop), they stay green. These
tests do not: they run `tools/train.py` on the synthetic corpus of
`conftest.synthetic_root` (fp32, CPU, one thread, seed 1, no evaluation) and
compare what the run logged to TensorBoard at every step - each `*_loss` term,
their sum `loss`, and the masking rates - with numbers recorded once.

Two epochs of three steps each: epoch 0 trains on the initial GASS scores
(0.85, which leave every contrastive caption clean), epoch 1 on the scores that
epoch 0 wrote into the cache, so the GASS -> score cache -> noise mask path is
pinned too (its `noise_mask_rate` is not 0).

A failure means the numbers of a training run changed. If that is intended
(a new default, a fixed bug), say so in the commit and re-record:
`python -m tests.test_pinned_losses` prints the current values as Python literals.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, load_tool

PRETRAIN = REPO / "configs" / "demo" / "tiny_pretrain.yaml"
FINETUNE = REPO / "configs" / "demo" / "tiny_finetune.yaml"
#: fp32 on one CPU thread is bit-reproducible here; the tolerance leaves room for another CPU's kernels.
REL_TOL = 1e-5
#: The logged scalars that are pinned (TensorBoard tags without `train/`).
RATES = ("noise_mask_rate", "mlm_mask_rate")

# Recorded at b12bc1b (after the uint8 data path of 9dd0864); identical, bit for bit, at c2c8e2b (before it).
# Fine-tuning re-recorded when configs/demo/tiny_finetune.yaml's lr went from 1e-3 to 3e-4 (step 1, computed
# before any update, is unchanged).
# Six steps: epoch 0 (steps 1-3, warm-up lr 0.1 x lr), epoch 1 (steps 4-6, lr: pretraining 1e-3, fine-tuning 3e-4).
PINNED = {
    "pretrain": {
        "loss": [32.213623, 32.9877701, 32.1879158, 32.2212715, 31.4627705, 32.6566086],
        "mlm_loss": [3.33535576, 3.3036077, 3.28264856, 3.2643683, 3.29155993, 3.23060775],
        "sdm_loss": [28.8782673, 29.6841621, 28.9052658, 28.9569035, 28.1712112, 29.4260025],
        "mlm_mask_rate": [0.341356665, 0.296450943, 0.278008312, 0.257861644, 0.208333328, 0.284738034],
        "noise_mask_rate": [0, 0, 0, 0.0314465426, 0.0604166649, 0.0364464708],
    },
    "finetune": {
        "loss": [42.5355377, 44.202919, 42.0102997, 41.8011818, 42.184906, 41.2600517],
        "id_loss": [3.17608309, 3.17941236, 3.18291998, 3.1773901, 3.16903114, 3.15694714],
        "mlm_loss": [11.0842791, 11.2619982, 10.9333887, 11.0207491, 10.7860346, 10.5146322],
        "sdm_loss": [28.275177, 29.7615089, 27.8939915, 27.6030426, 28.2298393, 27.5884724],
        "mlm_mask_rate": [0.158351406, 0.154684097, 0.14705883, 0.168016195, 0.14791666, 0.148648649],
    },
}
CONFIGS = {"pretrain": PRETRAIN, "finetune": FINETUNE}


def overrides(root: Path, out: Path) -> list[str]:
    """Everything that could vary between machines or runs, fixed; the preset otherwise."""
    return [f"data.root={root}", f"output_dir={out}", "device=cpu", "precision=fp32", "num_threads=1", "seed=1",
            "data.num_workers=0", "data.batch_size=16", "solver.epochs=2", "train.max_steps=3", "eval.period=0",
            "log_period=1"]


def logged_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every `train/*` scalar the run wrote to TensorBoard, by name, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith("train/"):
            points = sorted(events.Scalars(tag), key=lambda e: e.step)
            scalars[tag.removeprefix("train/")] = [p.value for p in points]
    return scalars


def train_and_read(task: str, root: Path, out: Path) -> dict[str, list[float]]:
    """Run the task's tiny preset and return its pinned quantities per step."""
    threads = torch.get_num_threads()
    try:
        assert load_tool("train").main(["--config", str(CONFIGS[task]), *overrides(root, out)]) == 0
    finally:
        torch.set_num_threads(threads)  # num_threads=1 is set process-wide
    scalars = logged_scalars(out)
    return {k: v for k, v in scalars.items() if k == "loss" or k.endswith("_loss") or k in RATES}


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_first_steps_match_pinned_values(task, synthetic_root, tmp_path):
    got = train_and_read(task, synthetic_root, tmp_path / task)
    pinned = PINNED[task]
    assert sorted(got) == sorted(pinned), "the logged loss terms changed"
    for name, values in pinned.items():
        assert len(got[name]) == len(values), f"{name}: {len(got[name])} steps logged, {len(values)} pinned"
        for step, (value, expected) in enumerate(zip(got[name], values), start=1):
            assert math.isclose(value, expected, rel_tol=REL_TOL, abs_tol=1e-9), (
                f"{task} step {step} {name}: {value!r}, pinned {expected!r} (all steps: {got[name]})")
    # The total is the plain sum of the terms (the loop adds every `*_loss` entry).
    terms = [name for name in pinned if name.endswith("_loss")]
    for step in range(len(pinned["loss"])):
        assert math.isclose(got["loss"][step], sum(got[t][step] for t in terms), rel_tol=1e-6)


def test_pretraining_pins_exercise_gass_noise_masks():
    """Epoch 1's pinned steps draw noise masks from GASS scores (not only the clean initial ones)."""
    rates = PINNED["pretrain"]["noise_mask_rate"]
    assert rates[:3] == [0, 0, 0] and all(r > 0 for r in rates[3:])


def main() -> None:
    """Print the current values in the form of `PINNED` (to re-record after an intended change)."""
    from datasets.synthetic import SyntheticConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        # The corpus of conftest.synthetic_root.
        generate(root, SyntheticConfig(identities=24, images_per_id=3, val_ids=8, test_ids=8,
                                       webperson_images=96, shard_size=48, seed=3), workers=1)
        print("PINNED = {")
        for task in CONFIGS:
            values = train_and_read(task, root, Path(tmp) / task)
            print(f'    "{task}": {{')
            for name in sorted(values, key=lambda k: (k != "loss", k.endswith("rate"), k)):
                print(f'        "{name}": [{", ".join(f"{v:.9g}" for v in values[name])}],')
            print("    },")
        print("}")


if __name__ == "__main__":
    sys.exit(main())
