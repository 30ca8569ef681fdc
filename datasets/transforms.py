"""Image transforms (IRRA's ``build_transforms``) with CLIP normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torchvision.transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_transforms(image_size: int | Sequence[int] = (384, 128), is_train: bool = True,
                     aug: bool = False) -> T.Compose:
    """PIL image -> normalised ``[3, H, W]`` float tensor.

    Args:
        image_size: ``(height, width)``, or one int for a square.
        is_train: training transform (only differs from eval when ``aug``).
        aug: IRRA's ``img_aug``: flip, pad-and-crop and random erasing.
    """
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be (height, width) with positive sides, got {image_size!r}")
    normalize = T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)
    if not (is_train and aug):
        return T.Compose([T.Resize(size), T.ToTensor(), normalize])
    return T.Compose([
        T.Resize(size),
        T.RandomHorizontalFlip(0.5),
        T.Pad(10),
        T.RandomCrop(size),
        T.ToTensor(),
        normalize,
        # Erasing runs after Normalize with value=mean, exactly as IRRA's img_aug does.
        T.RandomErasing(scale=(0.02, 0.4), value=CLIP_MEAN),
    ])
