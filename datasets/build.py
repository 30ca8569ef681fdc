"""Training and evaluation datasets, samplers and loaders.

A training batch is a dict of tensors: the images (uint8 pixels, plus a
fourth channel flagging randomly erased pixels when augmenting; the image
tower normalises them on the device), their pids and image ids, the samples'
global indices (rows of the GASS score cache), the clean caption ids, and —
depending on the masking mode — the noise-masked captions (contrastive branch)
and the masked captions with their labels (MLM branch). A sample carries the
image and the clean ids; the masks are drawn per batch in the collate function
(one score-cache read, one vectorised corruption), every sample from its own
generator seeded by (seed, epoch, index). Image augmentation is seeded the same
way, so batches do not depend on worker count or order and a resumed run draws
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from datasets import build_dataset
from datasets.bases import EvalSplit, ImageReadError, TrainIndex, open_image
from datasets.masking import informative_mask, noise_mask, random_mask
from datasets.sampler import DistributedRandomSampler, IdentitySampler
from datasets.transforms import build_transforms
from model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["MaskingSpec", "TrainDataset", "ImageDataset", "TextDataset", "collate_train", "add_host_facts", "build_train_dataset",
           "build_train_loader", "build_eval_loaders", "masking_spec_from_config", "position_loader",
           "set_loader_epoch"]

MLM_MODES = ("informative", "random", "none")
SAMPLERS = ("random", "identity")
#: `data.<key>` settings that only some training corpora take, forwarded to their class when not empty.
CORPUS_DATA_KEYS: dict[str, tuple[str, ...]] = {"WebPerson": ("annotation", "cache_dir")}


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """Which captions a training sample carries and the masking constants (docs/method.md §5)."""

    noise: bool = True
    mlm: str = "informative"
    noise_max_prob: float = 0.2
    noise_slope: float = 20.0
    noise_center: float = 0.9
    noise_force_one: bool = False
    mlm_max_prob: float = 0.3
    mlm_slope: float = 20.0
    mlm_center: float = 0.1
    random_prob: float = 0.15
    mask_ratio: float = 0.8
    random_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.mlm not in MLM_MODES:
            raise ValueError(f"unknown masking.mlm {self.mlm!r}; valid: {', '.join(MLM_MODES)}")

    @property
    def needs_scores(self) -> bool:
        return self.noise or self.mlm == "informative"


def masking_spec_from_config(cfg: Any) -> MaskingSpec:
    """The `masking` config node as a MaskingSpec."""
    return MaskingSpec(**{f.name: cfg.masking[f.name] for f in dataclasses.fields(MaskingSpec)})


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # A fixed mix of the three numbers (not Python's randomised hash).
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 0x9E3779B9) % (2**63 - 1)


class TrainDataset(Dataset):
    """Training samples of a corpus, tokenised; `collate` stacks them and adds the masks.

    Args:
        index: The corpus' training index.
        transform: Image transform (PIL -> tensor; `build_transforms(..., uint8=True)` for training).
        tokenizer: CLIP tokenizer.
        text_length: Context length of the token ids.
        masking: Which masked captions to produce.
        score_cache: GASS score cache (needed when `masking.needs_scores`); read per sample.
        seed: Base seed of the per-sample mask generators.
        skip_bad_images: Return None for an unreadable image (dropped by `collate_train`
            and counted) instead of raising.
        draft_size: (height, width) to decode JPEGs at reduced scale for (`open_image`;
            opt-in: pixels differ slightly from a full decode).
    """

    def __init__(self, index: TrainIndex, transform: Callable, tokenizer: Tokenizer, *,
                 text_length: int = 77, masking: MaskingSpec | None = None, score_cache: Any = None,
                 seed: int = 0, skip_bad_images: bool = False, draft_size: tuple[int, int] | None = None) -> None:
        self.index = index
        self.transform = transform
        self.tokenizer = tokenizer
        self.text_length = text_length
        self.masking = masking or MaskingSpec(noise=False, mlm="none")
        if self.masking.needs_scores and score_cache is None:
            raise ValueError("noise/informative masking needs a score cache")
        self.score_cache = score_cache
        self.seed = seed
        self.skip_bad_images = skip_bad_images
        self.draft_size = draft_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Masks of epoch `epoch` (set before creating the loader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        pid, image_id, path, caption = self.index[i]
        try:
            image = open_image(path, self.draft_size)
        except ImageReadError:
            if self.skip_bad_images:
                logger.warning("skipping unreadable image %s (sample %d)", path, i)
                return None
            raise
        ids = self.tokenizer.tokenize(caption, self.text_length)[0]
        # Augmentation draws from torch's global RNG; seeding it per sample (in a
        # forked RNG scope) makes every sample a pure function of (seed, epoch,
        # index): identical for any worker count and after a mid-epoch resume.
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also queues CUDA seeding,
            # which records a stack trace per call (milliseconds per sample).
            torch.default_generator.manual_seed(_sample_seed(self.seed, self.epoch, i) ^ 0x5DEECE66D)
            pixels = self.transform(image)
        sample = {
            "images": pixels,
            "pids": torch.tensor(pid, dtype=torch.long),
            "image_ids": torch.tensor(image_id, dtype=torch.long),
            "index": torch.tensor(i, dtype=torch.long),
            "caption_ids": ids,
        }
        return sample

    def collate(self, samples: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        """`collate_train`, plus the masked captions of the batch's samples."""
        batch = collate_train(samples)
        if "index" in batch:
            batch.update(self.mask(batch["caption_ids"], batch["index"]))
        return add_host_facts(batch)

    def mask(self, ids: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The masked captions of samples `indices` ([B]) with clean `ids` ([B, L]).

        Row b is drawn from the generator of sample `indices[b]` (seeded by seed,
        epoch and index), so a sample's masks do not depend on its batch.
        """
        spec = self.masking
        out: dict[str, torch.Tensor] = {}
        if not spec.noise and spec.mlm == "none":
            return out
        generators = [torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, i)) for i in indices.tolist()]
        scores = self.score_cache.get(indices) if spec.needs_scores else None
        common = dict(mask_ratio=spec.mask_ratio, random_ratio=spec.random_ratio)
        if spec.noise:
            out["noise_ids"] = noise_mask(ids, scores, generators, max_prob=spec.noise_max_prob,
                                          slope=spec.noise_slope, center=spec.noise_center,
                                          force_one=spec.noise_force_one, **common)
        if spec.mlm == "informative":
            out["mlm_ids"], out["mlm_labels"] = informative_mask(
                ids, scores, generators, max_prob=spec.mlm_max_prob, slope=spec.mlm_slope,
                center=spec.mlm_center, **common)
        elif spec.mlm == "random":
            out["mlm_ids"], out["mlm_labels"] = random_mask(ids, generators, prob=spec.random_prob, **common)
        return out


def add_host_facts(batch: dict[str, Any]) -> dict[str, Any]:
    """Add what the model would otherwise read back from the device, computed on the host.

    `text_length` (int): the longest caption of the batch, EOT included (the text
    tower runs on that many positions); `mlm_positions` (int64): the labelled
    positions of the flattened ``mlm_labels`` [B * L], in row-major order (the MLM head
    runs on those only). With both, a training step never makes the host wait for the
    device (bench/host_syncs.py). `batch` is changed in place and returned.
    """
    if "caption_ids" in batch:
        batch["text_length"] = int(batch["caption_ids"].argmax(dim=-1).max()) + 1
    if "mlm_labels" in batch:
        batch["mlm_positions"] = batch["mlm_labels"].flatten().nonzero().squeeze(1)
    return batch


def collate_train(samples: Sequence[dict | None]) -> dict[str, torch.Tensor]:
    """Stack samples; skipped (None) samples are dropped and counted in `num_skipped`."""
    kept = [s for s in samples if s is not None]
    batch = default_collate(kept) if kept else {}
    batch["num_skipped"] = torch.tensor(len(samples) - len(kept))
    return batch


class ImageDataset(Dataset):
    """Evaluation gallery: (pid, image tensor)."""

    def __init__(self, img_paths: Sequence[str], pids: np.ndarray, transform: Callable) -> None:
        self.img_paths = img_paths
        self.pids = np.asarray(pids, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.img_paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return int(self.pids[i]), self.transform(open_image(self.img_paths[i]))


class TextDataset(Dataset):
    """Evaluation queries: (pid, token ids)."""

    def __init__(self, captions: Sequence[str], pids: np.ndarray, tokenizer: Tokenizer,
                 text_length: int = 77) -> None:
        self.captions = captions
        self.pids = np.asarray(pids, dtype=np.int64)
        self.tokenizer = tokenizer
        self.text_length = text_length

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return int(self.pids[i]), self.tokenizer.tokenize(self.captions[i], self.text_length)[0]


def build_train_dataset(cfg: Any) -> TrainIndex:
    """The training index of the corpus `data.name` under `data.root`.

    Every corpus gets `data.skip_bad_records`; WebPerson also its annotation
    source (`data.annotation`, "" = auto-detect) and index cache folder
    (`data.cache_dir`), as `CORPUS_DATA_KEYS` lists.

    Raises:
        ConfigError: `data.name` names no registered corpus.
    """
    data = cfg.data
    kwargs: dict[str, Any] = {"skip_bad_records": data.skip_bad_records}
    kwargs.update({key: data[key] for key in CORPUS_DATA_KEYS.get(data.name, ()) if data[key]})
    return build_dataset(data.name, data.root, key="data.name", **kwargs).train


def build_train_loader(cfg: Any, index: TrainIndex, tokenizer: Tokenizer, *, score_cache: Any = None,
                       rank: int = 0, world_size: int = 1) -> DataLoader:
    """The training loader of `index` as the config describes it.

    The loader's sampler and dataset both have `set_epoch`; call
    `set_loader_epoch(loader, epoch)` before iterating each epoch.
    """
    spec = masking_spec_from_config(cfg)
    image_size = tuple(cfg.model.clip.image_size)
    transform = build_transforms(image_size, is_train=True, aug=cfg.data.img_aug, uint8=True)
    dataset = TrainDataset(index, transform, tokenizer, text_length=cfg.data.text_length, masking=spec,
                           score_cache=score_cache if spec.needs_scores else None, seed=cfg.seed,
                           skip_bad_images=cfg.data.skip_bad_images,
                           draft_size=image_size if cfg.data.jpeg_draft else None)
    # Each optimisation step takes train.accum_steps micro-batches of data.batch_size per process; the
    # samplers deal every global batch the same way whatever the split into processes and micro-batches.
    accum = int(cfg.train.accum_steps)
    if cfg.data.sampler == "identity":
        sampler: Any = IdentitySampler(index.pids, cfg.data.batch_size * accum * world_size, cfg.data.num_instances,
                                       seed=cfg.seed, rank=rank, world_size=world_size)
    elif cfg.data.sampler == "random":
        sampler = DistributedRandomSampler(len(index), seed=cfg.seed, rank=rank, world_size=world_size,
                                           shuffle=True, drop_last=True, accum_steps=accum,
                                           batch_size=cfg.data.batch_size)
    else:
        raise ValueError(f"unknown data.sampler {cfg.data.sampler!r}; valid: {', '.join(SAMPLERS)}")
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.data.num_workers, collate_fn=dataset.collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the sampler (order) and the dataset (masks) which epoch starts."""
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)


def position_loader(loader: DataLoader, epoch: int, batches_done: int = 0, *, world_size: int = 1) -> None:
    """Set the loader's epoch and skip the `batches_done` batches every rank already consumed in it
    (with gradient accumulation, a whole number of optimisation steps).

    After this, `len(loader)` counts only the batches still to come.
    """
    set_loader_epoch(loader, epoch)
    if batches_done:
        # The sampler counts global indices: every rank consumed `batches_done` batches.
        loader.sampler.load_state_dict({"epoch": epoch, "position": batches_done * loader.batch_size * world_size})


def build_eval_loaders(cfg: Any, split: EvalSplit, tokenizer: Tokenizer) -> tuple[DataLoader, DataLoader]:
    """(image loader, text loader) of an evaluation split, in dataset order."""
    transform = build_transforms(tuple(cfg.model.clip.image_size), is_train=False)
    kwargs = dict(batch_size=cfg.data.test_batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    images = DataLoader(ImageDataset(split.img_paths, split.image_pids, transform), **kwargs)
    texts = DataLoader(TextDataset(split.captions, split.caption_pids, tokenizer, cfg.data.text_length), **kwargs)
    return images, texts
