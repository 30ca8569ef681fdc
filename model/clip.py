"""CLIP ViT backbone with OpenAI's state-dict key names, and OpenAI weight loading.

The module tree mirrors OpenAI's ``clip/model.py`` key for key (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``,
``text_projection``, ...) so OpenAI's released checkpoints and IRRA / GA-DMS checkpoints
load without renaming. Unlike OpenAI's model, there is no learnable ``logit_scale``
(retrieval uses a fixed temperature, and IRRA's and the GA-DMS authors' backbones have
no such key, so our state dict matches theirs exactly; OpenAI files that carry it still
load, the value is dropped). Both towers return *all* projected tokens
(the MLM branch needs them) and attention is our own small module so that GASS can reach
the internals of each text block.

The image tower takes float images already normalised, or a uint8 batch that it
normalises itself (``normalize_images``): training workers ship uint8 pixels, a
quarter of the bytes, and skip the float conversion.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.weights import IncompatibleWeightsError, unwrap_state_dict
from utils.checkpoint import CheckpointNotFoundError, CheckpointReadError, read_checkpoint
from utils.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP",
    "CLIP_MEAN",
    "CLIP_PRESETS",
    "CLIP_STD",
    "OPENAI_URLS",
    "MultiheadSelfAttention",
    "QuickGELU",
    "ResidualAttentionBlock",
    "Transformer",
    "NotAClipViTError",
    "VisionTransformer",
    "build_clip",
    "backbone_state_dict",
    "build_clip_from_config",
    "check_image_grid",
    "check_preset",
    "clip_from_state_dict",
    "clip_preset",
    "infer_clip_config",
    "load_clip_state_dict",
    "normalize_images",
    "resize_pos_embed",
    "resolve_clip_checkpoint",
]

def _preset(*, embed_dim: int, vision_width: int, vision_layers: int, vision_heads: int, vision_patch_size: int,
            transformer_width: int, transformer_heads: int, transformer_layers: int) -> dict[str, int]:
    return dict(embed_dim=embed_dim, vision_width=vision_width, vision_layers=vision_layers,
                vision_heads=vision_heads, vision_patch_size=vision_patch_size, transformer_width=transformer_width,
                transformer_heads=transformer_heads, transformer_layers=transformer_layers, context_length=77,
                vocab_size=49408)


# Architecture presets (keyword arguments of ``CLIP`` minus image size and stride).
CLIP_PRESETS: dict[str, dict[str, int]] = {
    "ViT-B/32": _preset(embed_dim=512, vision_width=768, vision_layers=12, vision_heads=12, vision_patch_size=32,
                        transformer_width=512, transformer_heads=8, transformer_layers=12),
    "ViT-B/16": _preset(embed_dim=512, vision_width=768, vision_layers=12, vision_heads=12, vision_patch_size=16,
                        transformer_width=512, transformer_heads=8, transformer_layers=12),
    "ViT-L/14": _preset(embed_dim=768, vision_width=1024, vision_layers=24, vision_heads=16, vision_patch_size=14,
                        transformer_width=768, transformer_heads=12, transformer_layers=12),
    # Fast CPU model for tests and the demo (use image size (64, 32): a 4 x 2 grid).
    "tiny": _preset(embed_dim=64, vision_width=128, vision_layers=2, vision_heads=2, vision_patch_size=16,
                    transformer_width=128, transformer_heads=2, transformer_layers=4),
}

# OpenAI's published ViT checkpoints. The second-to-last URL path component is the
# SHA-256 of the file, which is how downloads are verified.
OPENAI_URLS: dict[str, str] = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/"
    "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

#: OpenAI CLIP's per-channel pixel mean and std (RGB, pixels in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DOWNLOAD_TIMEOUT_S = 30.0
# Keys of OpenAI's TorchScript archives that are attributes, not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
# The image tower's non-persistent normalisation buffers: a TorchScript archive traced
# from our model stores them, but they are constants, never weights.
_BUFFER_KEYS = ("visual.pixel_mean", "visual.pixel_std")
# OpenAI's learnable temperature: retrieval uses a fixed one, and the reference
# backbones (IRRA, GA-DMS) have no such key.
_UNUSED_KEYS = ("logit_scale",)


class NotAClipViTError(IncompatibleWeightsError, ValueError):
    """Weights that are no OpenAI-keyed CLIP ViT (a ResNet CLIP, another model's state dict)."""


def normalize_images(images: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """A uint8 batch ``[B, 3 or 4, H, W]`` as CLIP-normalised float32 ``[B, 3, H, W]``.

    The same float operations as torchvision's ``ToTensor`` then ``Normalize``
    (``x / 255``, minus the mean, over the std), so the result equals theirs. A fourth
    channel flags the pixels IRRA's random erasing erased (``datasets.transforms``):
    IRRA erases after normalising and writes the mean itself, so they get ``mean``.

    Args:
        images: uint8 pixels, channels RGB (+ erased-pixel flags).
        mean: per-channel mean, float32 ``[3]`` (default ``CLIP_MEAN``).
        std: per-channel std, float32 ``[3]`` (default ``CLIP_STD``).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (3, 4):
        raise ValueError(f"expected uint8 images [B, 3 or 4, H, W], got {images.dtype} {tuple(images.shape)}")
    mean = (torch.tensor(CLIP_MEAN) if mean is None else mean).to(images.device, torch.float32).view(3, 1, 1)
    std = (torch.tensor(CLIP_STD) if std is None else std).to(images.device, torch.float32).view(3, 1, 1)
    pixels = images[:, :3].float().div(255).sub(mean).div(std)
    if images.shape[1] == 4:
        pixels = torch.where(images[:, 3:].bool(), mean, pixels)
    return pixels


class QuickGELU(nn.Module):
    """GELU approximation ``x * sigmoid(1.702 x)`` that OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """Batch-first multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    Parameters are ``in_proj_weight`` [3d, d], ``in_proj_bias`` [3d] and ``out_proj``
    (``nn.Linear``), so OpenAI checkpoints load unchanged; the computation goes through
    ``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU).

    Args:
        d_model: Embedding width.
        n_head: Number of heads; must divide ``d_model``.
    """

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.d_model = d_model
        self.n_head = n_head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        # Same defaults as nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        """Attend over ``x`` [B, L, d]; ``causal`` lets token i see only tokens <= i."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    Args:
        d_model: Embedding width.
        n_head: Number of attention heads.
    """

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = MultiheadSelfAttention(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(d_model, 4 * d_model),
                gelu=QuickGELU(),
                c_proj=nn.Linear(4 * d_model, d_model),
            )
        )

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Stack of ``ResidualAttentionBlock`` on batch-first tensors.

    Args:
        width: Embedding width.
        layers: Number of blocks.
        heads: Number of attention heads.
        causal: Whether attention is causal (text tower) or full (vision tower).
        grad_checkpointing: Recompute block activations in backward to save memory.
    """

    def __init__(
        self, width: int, layers: int, heads: int, causal: bool = False, grad_checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.grad_checkpointing = grad_checkpointing
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Run blocks ``resblocks[start:end]`` on ``x`` [B, L, width]."""
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.resblocks[start:end]:
            if use_checkpoint:
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, causal=self.causal)
        return x


class VisionTransformer(nn.Module):
    """OpenAI's ViT image tower returning all projected tokens.

    Args:
        image_size: Input (H, W).
        patch_size: Side of the square patches.
        stride_size: Conv stride; smaller than ``patch_size`` gives overlapping patches.
        width: Embedding width.
        layers: Number of transformer blocks.
        heads: Number of attention heads.
        output_dim: Joint embedding size.
        grad_checkpointing: Recompute block activations in backward.
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        patch_size: int,
        stride_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        height, img_width = image_size
        if height < patch_size or img_width < patch_size:
            raise ValueError(f"image_size {tuple(image_size)} is smaller than the patch size {patch_size}")
        if stride_size <= 0:
            raise ValueError(f"stride_size must be positive, got {stride_size}")
        self.image_size = (int(height), int(img_width))
        self.grid_size = ((height - patch_size) // stride_size + 1, (img_width - patch_size) // stride_size + 1)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=stride_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        num_positions = 1 + self.grid_size[0] * self.grid_size[1]
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_positions, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, causal=False, grad_checkpointing=grad_checkpointing)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        # Not persistent: the state dict keeps OpenAI's keys exactly.
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Map images [B, 3, H, W] to projected tokens [B, 1 + gh * gw, output_dim].

        Float images are taken as normalised; uint8 ones are normalised here
        (``normalize_images``, erased-pixel flags in a fourth channel allowed).
        """
        if images.shape[-2:] != self.image_size:
            raise ValueError(f"expected images of size {self.image_size} (H, W), got {tuple(images.shape[-2:])}")
        if images.dtype == torch.uint8:
            images = normalize_images(images, self.pixel_mean, self.pixel_std)
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, gh*gw, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        # IRRA convention: ln_post and the projection apply to every token, not only CLS.
        return self.ln_post(x) @ self.proj


class CLIP(nn.Module):
    """CLIP with a ViT image tower and a causal text transformer (OpenAI key names).

    Args:
        embed_dim: Joint embedding size.
        image_size: Input (H, W).
        vision_layers: Vision transformer depth.
        vision_width: Vision transformer width.
        vision_patch_size: Patch side.
        stride_size: Patch-embedding stride (``vision_patch_size`` for no overlap).
        context_length: Maximum text length (77 for OpenAI's tokenizer).
        vocab_size: Token vocabulary size.
        transformer_width: Text transformer width.
        transformer_heads: Text attention heads.
        transformer_layers: Text transformer depth.
        vision_heads: Vision attention heads (default ``vision_width // 64``, as OpenAI).
        grad_checkpointing: Activation checkpointing in both towers while training.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_size: tuple[int, int],
        vision_layers: int,
        vision_width: int,
        vision_patch_size: int,
        stride_size: int,
        context_length: int,
        vocab_size: int,
        transformer_width: int,
        transformer_heads: int,
        transformer_layers: int,
        vision_heads: int | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.visual = VisionTransformer(
            image_size=tuple(image_size),
            patch_size=vision_patch_size,
            stride_size=stride_size,
            width=vision_width,
            layers=vision_layers,
            heads=vision_heads if vision_heads is not None else vision_width // 64,
            output_dim=embed_dim,
            grad_checkpointing=grad_checkpointing,
        )
        self.transformer = Transformer(
            transformer_width,
            transformer_layers,
            transformer_heads,
            causal=True,
            grad_checkpointing=grad_checkpointing,
        )
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.initialize_parameters()

    @property
    def grad_checkpointing(self) -> bool:
        """Whether both towers recompute activations in backward while training."""
        return self.transformer.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enabled: bool) -> None:
        self.transformer.grad_checkpointing = enabled
        self.visual.transformer.grad_checkpointing = enabled

    def compile_towers(self, backend: str = "inductor") -> None:
        """Compile both towers in place with `torch.compile` (`train.compile`; state-dict keys unchanged).

        GASS re-runs the text layers itself, uncompiled. Where compilation fails when a tower
        first runs (no compiler, an unsupported platform), torch logs the error and runs that
        code eagerly (``torch._dynamo.config.suppress_errors``): slower, same numbers.
        """
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        self.visual.compile(backend=backend)
        self.transformer.compile(backend=backend)
        logger.info("train.compile: image and text towers compiled with torch.compile (eager fallback on errors)")

    def initialize_parameters(self) -> None:
        """OpenAI's random init: small normals with depth-scaled projection std.

        OpenAI applies the schedule to the text tower only (its vision blocks keep
        ``nn.MultiheadAttention``'s defaults); we apply it to both towers so a random
        model is well scaled on either side. Only random models (tests, demo) see this.
        """
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            attn_std = tower.width**-0.5
            proj_std = tower.width**-0.5 * (2 * tower.layers) ** -0.5
            fc_std = (2 * tower.width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def encode_image(self, images: Tensor) -> Tensor:
        """Projected image tokens [B, 1 + gh * gw, embed_dim]; index 0 is the image feature."""
        return self.visual(images)

    def embed_text(self, ids: Tensor) -> Tensor:
        """Token plus positional embeddings [B, L, width] for token ids [B, L]."""
        length = ids.shape[-1]
        if length > self.context_length:
            raise ValueError(f"text length {length} exceeds context_length {self.context_length}")
        return self.token_embedding(ids) + self.positional_embedding[:length]

    def text_layers_forward(self, x: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Run text blocks ``resblocks[start:end]`` (causal) on embeddings [B, L, width]."""
        return self.transformer(x, start, end)

    def project_text(self, x: Tensor) -> Tensor:
        """``ln_final`` then ``text_projection`` on text-tower outputs [B, L, width]."""
        return self.ln_final(x) @ self.text_projection

    def encode_text(self, ids: Tensor) -> Tensor:
        """Projected text tokens [B, L, embed_dim]; the text feature sits at ``ids.argmax(-1)``."""
        return self.project_text(self.text_layers_forward(self.embed_text(ids)))

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Both towers: (image tokens, text tokens), each projected to ``embed_dim``."""
        return self.encode_image(images), self.encode_text(ids)


def clip_preset(name: str) -> dict[str, int]:
    """Keyword arguments of the architecture preset ``name`` (a copy).

    Raises:
        ConfigError: an unknown name (``model.clip.arch``), listing the valid ones.
    """
    if name not in CLIP_PRESETS:
        raise ConfigError(f"model.clip.arch: unknown CLIP preset {name!r}; valid presets: {sorted(CLIP_PRESETS)}")
    return dict(CLIP_PRESETS[name])


def check_image_grid(image_size: tuple[int, int], patch_size: int, source: str) -> None:
    """Fail unless ``image_size`` holds at least one patch of the backbone ``source`` describes.

    Raises:
        ConfigError: naming ``model.clip.image_size``, the patch size and where it comes from.
    """
    if min(image_size) < patch_size:
        raise ConfigError(f"model.clip.image_size={list(image_size)}: smaller than the {patch_size}-pixel patch of "
                          f"{source}, so the image has no patch grid; give a height and width of at least "
                          f"{patch_size}")


def resize_pos_embed(posemb: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None) -> Tensor:
    """Resize a ViT positional embedding [1 + gh * gw, D] to ``new_grid`` (as IRRA does).

    The class position is kept; patch positions are laid out on ``old_grid`` (default:
    the square grid implied by their count) and bilinearly interpolated
    (``align_corners=False``) to ``new_grid``.
    """
    num_patches = posemb.shape[0] - 1
    if old_grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"positional embedding has {num_patches} patch positions, not a square grid; pass old_grid=(gh, gw)"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(f"old_grid {tuple(old_grid)} does not match {num_patches} patch positions")
    if tuple(old_grid) == tuple(new_grid):
        return posemb.clone()
    cls_pos, patch_pos = posemb[:1], posemb[1:]
    grid = patch_pos.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    # Interpolate in fp32 (fp16 bilinear is not implemented on every device).
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bilinear", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(posemb.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def _default_cache_dir() -> str:
    return os.environ.get("GADMS_CLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clip")


def _download_verified(url: str, dest: str) -> None:
    """Download ``url`` to ``dest`` through a temp file, checking the SHA-256 in the URL."""
    expected_sha = url.split("/")[-2]
    directory = os.path.dirname(dest) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(dest) + ".", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected_sha:
            raise CheckpointReadError(
                f"SHA-256 mismatch for {url}: got {digest.hexdigest()}, expected {expected_sha}; "
                f"the download was discarded. Put a verified copy at {dest}"
            )
        os.replace(tmp_path, dest)
    except (urllib.error.URLError, OSError) as err:
        raise CheckpointNotFoundError(
            f"CLIP weights not found at {dest} and the download from {url} failed ({err}). "
            f"Download that file and put it at {dest} (or set GADMS_CLIP_CACHE / cache_dir)."
        ) from err
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def resolve_clip_checkpoint(name_or_path: str, cache_dir: str | None = None, *, key: str | None = None) -> str:
    """Path of a CLIP checkpoint given as a file path or an OpenAI model name.

    Names resolve to ``<cache_dir>/<basename of OpenAI's URL>`` (default cache
    ``$GADMS_CLIP_CACHE`` or ``~/.cache/clip``) and are downloaded (SHA-256 checked)
    when missing.

    Args:
        name_or_path: A checkpoint file or a key of ``OPENAI_URLS``.
        cache_dir: Where named checkpoints live.
        key: The config key or option that gave ``name_or_path``, for the messages.

    Raises:
        CheckpointNotFoundError: neither a file nor a known name, a folder, or a named
            checkpoint that is not in the cache and cannot be downloaded (a FileNotFoundError).
        CheckpointReadError: a download whose SHA-256 does not match.
    """
    given = f"{key}={name_or_path!r}" if key else f"CLIP checkpoint {name_or_path!r}"
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        raise CheckpointNotFoundError(f"{given} is a directory, expected a checkpoint file")
    if name_or_path not in OPENAI_URLS:
        raise CheckpointNotFoundError(
            f"{given} is neither an existing file nor a known model name; valid names: {sorted(OPENAI_URLS)}"
        )
    url = OPENAI_URLS[name_or_path]
    directory = cache_dir or _default_cache_dir()
    path = os.path.join(os.path.expanduser(directory), os.path.basename(url))
    if not os.path.isfile(path):
        logger.info("downloading %s from %s to %s", name_or_path, url, path)
        _download_verified(url, path)
    return path


def is_torchscript_archive(path: str) -> bool:
    """Whether `path` is a TorchScript archive (OpenAI's release format)."""
    # torch.save and torch.jit.save both write zip files; only TorchScript stores code.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def backbone_state_dict(state: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """The OpenAI-keyed fp32 CLIP weights inside a CLIP or retrieval state dict.

    Takes an (unwrapped) state dict of OpenAI's CLIP, or of a retrieval model (ours,
    the GA-DMS authors', IRRA's), whose backbone sits under ``base_model.``. Drops
    OpenAI's non-parameter entries and its unused ``logit_scale``; casts to fp32 (the
    model is fp32; autocast handles low precision).
    """
    state = dict(state)
    if "visual.conv1.weight" not in state and "base_model.visual.conv1.weight" in state:
        state = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}
    for key in (*_NON_PARAMETER_KEYS, *_BUFFER_KEYS):
        state.pop(key, None)
    dropped = [key for key in _UNUSED_KEYS if state.pop(key, None) is not None]
    if dropped:
        logger.info("%s: ignoring %s (CLIP's learnable temperature; retrieval uses model.temperature)",
                    source, ", ".join(dropped))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_clip_state_dict(path: str, *, trust: bool = False) -> dict[str, Tensor]:
    """The fp32 CLIP weights of a file: OpenAI's TorchScript archive, a CLIP state dict,
    or a retrieval checkpoint (wrapped as ``{'model': ...}``, DDP's ``module.`` prefix)."""
    if is_torchscript_archive(path):
        with warnings.catch_warnings():
            # torch deprecates TorchScript, but OpenAI's releases are TorchScript archives.
            warnings.filterwarnings("ignore", message=".*torch.jit", category=FutureWarning)
            state = dict(torch.jit.load(path, map_location="cpu").state_dict())
    else:
        obj = read_checkpoint(path, trust=trust)
        try:
            state = unwrap_state_dict(obj, source=path)
        except IncompatibleWeightsError as err:
            detail = str(err).removeprefix(f"{path}: ")
            raise IncompatibleWeightsError(
                f"{path} is neither a TorchScript archive nor a state dict of tensors: {detail}") from err
    return backbone_state_dict(state, source=path)


def infer_clip_config(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """``CLIP`` kwargs (minus image size / stride) of an OpenAI-keyed ViT state dict.

    Sizes are read from tensor shapes and key counts as OpenAI's ``build_model`` does;
    head counts assume OpenAI's 64-dim heads.
    """
    if "visual.proj" not in state_dict:
        if any(k.startswith("visual.layer1.") for k in state_dict):
            raise ValueError("this is a ResNet CLIP checkpoint; only ViT checkpoints are supported")
        raise ValueError(
            f"state dict lacks 'visual.proj'; not an OpenAI-keyed CLIP ViT (first keys: {sorted(state_dict)[:5]})"
        )

    def count_blocks(prefix: str) -> int:
        return sum(1 for k in state_dict if k.startswith(prefix) and k.endswith(".attn.in_proj_weight"))

    conv = state_dict["visual.conv1.weight"]
    transformer_width = state_dict["ln_final.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        vision_width=conv.shape[0],
        vision_layers=count_blocks("visual.transformer.resblocks."),
        vision_heads=conv.shape[0] // 64,
        vision_patch_size=conv.shape[-1],
        transformer_width=transformer_width,
        transformer_heads=transformer_width // 64,
        transformer_layers=count_blocks("transformer.resblocks."),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
    )


def clip_from_state_dict(
    state: Mapping[str, Tensor],
    image_size: tuple[int, int] = (384, 128),
    stride_size: int = 16,
    grad_checkpointing: bool = False,
    source: str = "state dict",
) -> CLIP:
    """Build an fp32 ``CLIP`` holding exactly the OpenAI-keyed weights ``state``.

    The architecture is inferred from the weights; a square positional grid
    (OpenAI's) is resized to the patch grid of ``image_size`` and ``stride_size``, a
    non-square one (IRRA / GA-DMS checkpoints) must already match it.
    """
    state = dict(state)
    try:
        arch = infer_clip_config(state)
    except KeyError as err:
        raise NotAClipViTError(f"{source}: missing CLIP key {err}; not an OpenAI-keyed CLIP ViT") from err
    except ValueError as err:
        raise NotAClipViTError(f"{source}: {err}") from err
    check_image_grid(image_size, arch["vision_patch_size"], source)
    model = CLIP(**arch, image_size=tuple(image_size), stride_size=stride_size, grad_checkpointing=grad_checkpointing)
    new_grid = model.visual.grid_size
    pretrained_num_patches = state["visual.positional_embedding"].shape[0] - 1
    if math.isqrt(pretrained_num_patches) ** 2 == pretrained_num_patches:
        # OpenAI checkpoints: square grid (14 x 14 for ViT-B/16 at 224).
        state["visual.positional_embedding"] = resize_pos_embed(state["visual.positional_embedding"], new_grid)
    elif pretrained_num_patches != new_grid[0] * new_grid[1]:
        # Non-square grids come from IRRA / GA-DMS checkpoints already trained at our size.
        raise ConfigError(
            f"{source}: positional embedding has {pretrained_num_patches} patch positions (not a square grid) "
            f"and cannot be resized to the {new_grid} grid of image_size={tuple(image_size)}, "
            f"stride_size={stride_size}; set model.clip.image_size and stride_size to the ones it was trained with"
        )
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise IncompatibleWeightsError(
            f"{source}: state dict does not match CLIP; missing keys: {missing}; unexpected keys: {unexpected}"
        )
    mismatched = [f"{key} {tuple(state[key].shape)} vs model {tuple(value.shape)}"
                  for key, value in own.items() if state[key].shape != value.shape]
    if mismatched:
        raise IncompatibleWeightsError(
            f"{source}: state dict does not match CLIP; shape mismatches ({len(mismatched)}): "
            f"{', '.join(mismatched[:5])}{', ...' if len(mismatched) > 5 else ''}"
        )
    model.load_state_dict(state, strict=True)
    logger.info(
        "loaded CLIP weights from %s (vision %d x %d, patch %d, grid %s, text %d x %d)",
        source,
        arch["vision_layers"],
        arch["vision_width"],
        arch["vision_patch_size"],
        new_grid,
        arch["transformer_layers"],
        arch["transformer_width"],
    )
    return model


def build_clip(
    name_or_path: str,
    image_size: tuple[int, int] = (384, 128),
    stride_size: int = 16,
    cache_dir: str | None = None,
    grad_checkpointing: bool = False,
    trust: bool = False,
    key: str | None = None,
) -> CLIP:
    """Build an fp32 ``CLIP`` from OpenAI-keyed weights (file path or OpenAI model name).

    The file may also be a retrieval checkpoint (its ``base_model.`` weights are used).
    See :func:`clip_from_state_dict` for the architecture and the positional grid;
    ``key`` (the config key or option that named the file) is named when it cannot be found.
    """
    path = resolve_clip_checkpoint(name_or_path, cache_dir, key=key)
    state = load_clip_state_dict(path, trust=trust)
    return clip_from_state_dict(state, image_size, stride_size, grad_checkpointing, source=path)


def check_preset(model: CLIP, arch: str, source: str) -> None:
    """Fail when the loaded ``model`` is not the size preset ``arch`` names."""
    preset = clip_preset(arch)
    loaded = dict(
        embed_dim=model.embed_dim,
        vision_width=model.visual.conv1.out_channels,
        vision_layers=model.visual.transformer.layers,
        vision_patch_size=model.visual.conv1.kernel_size[0],
        transformer_width=model.transformer.width,
        transformer_layers=model.transformer.layers,
    )
    mismatched = {k: (v, preset[k]) for k, v in loaded.items() if preset[k] != v}
    if mismatched:
        raise ConfigError(
            f"{source} does not match model.clip.arch={arch!r}: "
            + ", ".join(
                f"{k} is {got} in the checkpoint but {want} in the preset" for k, (got, want) in mismatched.items()
            )
        )


def build_clip_from_config(cfg: Any, state_dict: Mapping[str, Tensor] | None = None, source: str = "") -> CLIP:
    """Build the backbone from the ``model.clip`` config node.

    Keys: ``arch`` (preset name), ``pretrained`` ("" = random init from the preset, else
    a name or path for ``build_clip``), ``image_size`` [H, W], ``stride_size``,
    ``cache_dir`` ("" = default cache), ``grad_checkpointing``.

    Args:
        cfg: The ``model.clip`` node.
        state_dict: OpenAI-keyed backbone weights to use instead of ``pretrained``
            (e.g. the backbone of a full checkpoint being fine-tuned).
        source: Where ``state_dict`` came from (for messages).
    """
    image_size = tuple(int(v) for v in cfg.image_size)
    if len(image_size) != 2:
        raise ConfigError(f"model.clip.image_size must be [H, W], got {list(cfg.image_size)}")
    # Pretrained weights must have the preset's patch size (`check_preset`): check it before reading them.
    check_image_grid(image_size, clip_preset(cfg.arch)["vision_patch_size"], f"model.clip.arch={cfg.arch!r}")
    if state_dict is not None:
        model = clip_from_state_dict(state_dict, image_size, int(cfg.stride_size), bool(cfg.grad_checkpointing),
                                     source=source or "state dict")
        check_preset(model, cfg.arch, source or "state dict")
        return model
    if not cfg.pretrained:
        return CLIP(
            **clip_preset(cfg.arch),
            image_size=image_size,
            stride_size=int(cfg.stride_size),
            grad_checkpointing=bool(cfg.grad_checkpointing),
        )
    model = build_clip(
        cfg.pretrained,
        image_size=image_size,
        stride_size=int(cfg.stride_size),
        cache_dir=cfg.cache_dir or None,
        grad_checkpointing=bool(cfg.grad_checkpointing),
        key="model.clip.pretrained",
    )
    check_preset(model, cfg.arch, f"model.clip.pretrained={cfg.pretrained!r}")
    return model
