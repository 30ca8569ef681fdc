"""Image transforms (IRRA's ``build_transforms``) with CLIP normalisation.

Evaluation and tools get normalised float tensors. The training loader asks for
uint8 tensors (``uint8=True``): the same geometry, no float conversion in the
workers, a quarter of the bytes to collate and copy; the image tower normalises
them on the device (``model.clip.normalize_images``) to the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision.transforms as T

from model.clip import CLIP_MEAN, CLIP_STD

__all__ = ["CLIP_MEAN", "CLIP_STD", "RandomErasingFlags", "build_transforms"]

#: IRRA's random erasing: probability, area share and aspect-ratio range (torchvision's defaults).
ERASE_P, ERASE_SCALE, ERASE_RATIO = 0.5, (0.02, 0.4), (0.3, 3.3)


class RandomErasingFlags:
    """IRRA's random erasing for uint8 images: the erased region as a fourth (flag) channel.

    IRRA erases after ``Normalize`` and writes ``CLIP_MEAN``, a value no uint8
    pixel normalises to; so the region travels as flags and the image tower
    fills it (``model.clip.normalize_images``). The draws are torchvision's
    ``RandomErasing`` draws, in the same order, so a seed erases the same region.
    """

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        flags = torch.zeros((1, *pixels.shape[-2:]), dtype=torch.uint8)
        if torch.rand(1) < ERASE_P:
            i, j, h, w, value = T.RandomErasing.get_params(pixels, scale=ERASE_SCALE, ratio=ERASE_RATIO,
                                                           value=list(CLIP_MEAN))
            if value is not pixels:  # torchvision's "no region fits": the image is left as it is
                flags[:, i:i + h, j:j + w] = 1
        return torch.cat([pixels, flags])


def build_transforms(image_size: int | Sequence[int] = (384, 128), is_train: bool = True,
                     aug: bool = False, *, uint8: bool = False) -> Callable:
    """PIL image -> ``[3, H, W]`` tensor: normalised float, or uint8 pixels.

    Args:
        image_size: ``(height, width)``, or one int for a square.
        is_train: training transform (only differs from eval when ``aug``).
        aug: IRRA's ``img_aug``: flip, pad-and-crop and random erasing.
        uint8: uint8 pixels instead of normalised floats; with ``aug`` a fourth
            channel flags the erased pixels (``RandomErasingFlags``).
    """
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be (height, width) with positive sides, got {image_size!r}")
    augment = is_train and aug
    steps: list[Callable] = [T.Resize(size)]
    if augment:
        steps += [T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop(size)]
    if uint8:
        steps += [T.PILToTensor(), RandomErasingFlags()] if augment else [T.PILToTensor()]
        return T.Compose(steps)
    steps += [T.ToTensor(), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
    if augment:
        # Erasing runs after Normalize with value=mean, exactly as IRRA's img_aug does.
        steps.append(T.RandomErasing(p=ERASE_P, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=CLIP_MEAN))
    return T.Compose(steps)
