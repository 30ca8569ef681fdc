"""Template embeddings and k-means clustering (numpy, seeded k-means++)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from tools.curate.store import StageError

logger = logging.getLogger(__name__)

Embedder = Callable[[Sequence[str]], np.ndarray]
_TOKEN = re.compile(r"\[[^\[\]]+\]|[a-z]+(?:['-][a-z]+)*")


class HashingEmbedder:
    """Deterministic offline text embedding: signed feature hashing of words and word bigrams.

    Templates that share wording and placeholders land close together, which is all the
    clustering needs when no OpenCLIP weights are at hand (and keeps tests offline).

    Args:
        dim: embedding size.
    """

    def __init__(self, dim: int = 512) -> None:
        if dim < 8:
            raise ValueError(f"hashing embedding dim must be >= 8, got {dim}")
        self.dim = dim

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            tokens = _TOKEN.findall(text.lower())
            features = tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]
            for feature in features:
                digest = hashlib.sha1(feature.encode("utf-8")).digest()
                index = int.from_bytes(digest[:4], "little") % self.dim
                out[row, index] += 1.0 if digest[4] & 1 else -1.0
        return _l2_normalise(out).astype(np.float32)


class OpenClipEmbedder:
    """Text tower of an OpenCLIP model (the paper used ViT-bigG/14) from LOCAL files only.

    Args:
        model_name: an OpenCLIP architecture name such as ``ViT-bigG-14`` (then ``weights`` is the
            weight file), or ``local-dir:DIR`` for a folder holding ``open_clip_config.json`` and the
            weights (the layout of a hub snapshot downloaded by hand).
        weights: path of the weight file (``open_clip_pytorch_model.bin`` / ``.safetensors``) for a
            named architecture; unused with ``local-dir:``.
        device: torch device string.
        batch_size: texts per forward pass.
    """

    def __init__(self, model_name: str, weights: str | None = None, device: str = "cpu",
                 batch_size: int = 64) -> None:
        # Check the files first: a wrong path should not cost a PyTorch import to report.
        if model_name.startswith("hf-hub:"):
            raise StageError(f"--embed-model {model_name}: hub models would be downloaded; download the snapshot "
                             "yourself and pass --embed-model local-dir:<folder>")
        if model_name.startswith("local-dir:"):
            folder = model_name[len("local-dir:"):]
            if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
                raise StageError(f"--embed-model {model_name}: {folder} has no open_clip_config.json")
            if not any(n.endswith((".safetensors", ".bin", ".pth")) for n in os.listdir(folder)):
                raise StageError(f"--embed-model {model_name}: no weight file (*.safetensors, *.bin, *.pth) in "
                                 f"{folder}")
            pretrained = None
        elif not weights or not os.path.isfile(weights):
            raise StageError(f"--embed-weights {weights!r}: file not found; download the OpenCLIP weights for "
                             f"{model_name} yourself (e.g. laion2b_s39b_b160k for ViT-bigG-14) and pass the local "
                             "file, or use --embed-model local-dir:<folder> - nothing is downloaded here")
        else:
            pretrained = weights
        try:
            import open_clip
            import torch
        except ImportError as e:
            raise StageError("the open_clip embedder needs PyTorch and OpenCLIP: pip install torch open_clip_torch "
                             "(or use --embedder hash)") from e
        if pretrained is not None and model_name not in open_clip.list_models():
            raise StageError(f"--embed-model {model_name!r} is not an OpenCLIP architecture; known ones include "
                             f"{', '.join(open_clip.list_models()[:8])}, ...")
        self._torch = torch
        self.device = device
        self.batch_size = batch_size
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        chunks = []
        with self._torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
                chunks.append(self.model.encode_text(tokens).float().cpu().numpy())
        if not chunks:
            return np.zeros((0, 1), dtype=np.float32)
        return _l2_normalise(np.concatenate(chunks).astype(np.float64)).astype(np.float32)


EMBEDDERS = ("hash", "open_clip")


def build_embedder(name: str, dim: int = 512, model_name: str = "ViT-bigG-14", weights: str | None = None,
                   device: str = "cpu") -> Embedder:
    """Embedder by name: ``hash`` (offline, deterministic) or ``open_clip`` (local weights)."""
    if name == "hash":
        return HashingEmbedder(dim)
    if name == "open_clip":
        return OpenClipEmbedder(model_name, weights, device)
    raise StageError(f"unknown embedder {name!r}; valid: {', '.join(EMBEDDERS)}")


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _sq_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]
    return np.maximum(d, 0.0)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` initial centers chosen by k-means++ (D^2 sampling)."""
    n = len(x)
    chosen = [int(rng.integers(n))]
    closest = _sq_distances(x, x[chosen])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:
            # All points coincide with a center already: pick any point not chosen yet.
            remaining = np.setdiff1d(np.arange(n), chosen)
            chosen.append(int(rng.choice(remaining)))
        else:
            chosen.append(int(rng.choice(n, p=closest / total)))
        closest = np.minimum(closest, _sq_distances(x, x[chosen[-1:]])[:, 0])
    return np.asarray(chosen)


def kmeans(x: np.ndarray, k: int, seed: int = 0, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ initialisation.

    Args:
        x: points ``[N, D]``.
        k: clusters (clipped to N).
        seed: seed of the initialisation.
        max_iter: iteration cap (stops earlier when assignments no longer change).

    Returns:
        ``(centers [k, D], labels [N])``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"k-means needs a non-empty [N, D] array, got shape {x.shape}")
    k = min(k, len(x))
    if k < 1:
        raise ValueError(f"k-means needs k >= 1, got {k}")
    rng = np.random.default_rng(seed)
    centers = x[kmeans_plus_plus(x, k, rng)].copy()
    labels = np.full(len(x), -1)
    for _ in range(max_iter):
        d = _sq_distances(x, centers)
        new_labels = d.argmin(1)
        for c in range(k):
            if not (new_labels == c).any():
                # An empty cluster takes the point farthest from its center among clusters that can
                # spare one (k <= N guarantees such a cluster while another is empty).
                counts = np.bincount(new_labels, minlength=k)
                spare = d[np.arange(len(x)), new_labels]
                spare[counts[new_labels] < 2] = -1.0
                new_labels[int(spare.argmax())] = c
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centers = np.stack([x[labels == c].mean(0) for c in range(k)])
    return centers, labels
