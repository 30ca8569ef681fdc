"""Noise detection as a metric: do token scores single out the corrupted words of a caption?

The synthetic generator records every corrupted WebPerson caption in
`noise_report.json` (its kind, the clean caption and the changed words). For each
such caption, scored with its own image, the per-caption ROC AUC of the token
scores is the share of (clean word token, corrupted word token) pairs where the
clean token scores higher, ties counting half: 1 = the scores single the noise
out (masking the lowest tokens removes it), 0.5 = they do not see it, 0 = they
point at the clean words. Scorers: the model's own (`token_scores`), GASS and CSS
(`model/gass.py`) with the model's settings, and uniform random scores (chance).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasets import build_dataset
from datasets.bases import open_image
from datasets.transforms import build_transforms
from model.gass import css_scores, gass_scores, valid_token_mask
from model.tokenizer import Tokenizer
from utils.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = ["NOISE_KINDS", "NOISE_REPORT", "SCORERS", "CaptionSource", "NoiseReportError", "WordPiece",
           "caption_auc", "clean_preference", "corrupted_positions", "group_words", "load_noise_report", "match_noise_entries",
           "noise_detection_auc", "occlusion_scores", "summarize_aucs", "token_pieces"]

NOISE_REPORT = "noise_report.json"
#: Corruption kinds of the synthetic generator's noise report.
NOISE_KINDS = ("wrong_attr", "irrelevant")
#: "model": the model's configured `token_scores`; "gass"/"css": that scoring with the model's
#: GASS settings whatever it is configured with; "occlusion": how much the image-caption cosine
#: drops when the token is deleted (what the model itself makes of each token: the reference a
#: gradient attribution such as GASS approximates); "random": uniform scores (chance level).
SCORERS = ("model", "gass", "css", "occlusion", "random")


class NoiseReportError(UserInputError):
    """No usable noise report, or a caption set it does not describe."""


# --------------------------------------------------------------------------- tokens and corrupted words


@dataclass
class WordPiece:
    """One caption token: its position in the id row, decoded text, whether it ends a word."""

    position: int
    text: str
    word_end: bool


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[WordPiece]:
    """The word pieces between SOT and EOT: decoded text and whether the piece ends a word."""
    ids = [int(i) for i in ids]
    eot = ids.index(tokenizer.eot_id) if tokenizer.eot_id in ids else len(ids)
    out = []
    for pos in range(1, eot):
        token_id = ids[pos]
        if token_id == tokenizer.mask_id:
            out.append(WordPiece(pos, "<|mask|>", True))
            continue
        piece = tokenizer.decoder[token_id]
        end = piece.endswith("</w>")
        raw = bytearray(tokenizer.byte_decoder[c] for c in (piece[:-4] if end else piece))
        out.append(WordPiece(pos, raw.decode("utf-8", errors="replace"), end))
    return out


def group_words(tokens: Sequence[WordPiece]) -> list[list[int]]:
    """Indices into `tokens` grouped into words (a word ends with a piece carrying `</w>`)."""
    words: list[list[int]] = []
    current: list[int] = []
    for i, token in enumerate(tokens):
        current.append(i)
        if token.word_end:
            words.append(current)
            current = []
    if current:
        words.append(current)
    return words


def _word_strings(tokens: Sequence[WordPiece]) -> list[str]:
    return ["".join(tokens[i].text for i in word) for word in group_words(tokens)]


def corrupted_positions(tokenizer: Tokenizer, ids: Sequence[int], clean: str | None,
                        words: Sequence[str] = ()) -> set[int]:
    """Token positions of words that are inserted or changed relative to the clean caption.

    The noisy caption's words (as the tokenizer splits them) are aligned with
    the clean caption's; replaced and inserted words are the corrupted ones.
    Without a clean caption, words listed in `words` are marked.
    """
    tokens = token_pieces(tokenizer, ids)
    groups = group_words(tokens)
    noisy_words = _word_strings(tokens)
    marked: set[int] = set()
    if clean:
        clean_ids = tokenizer.tokenize(clean, len(ids))[0].tolist()
        clean_words = _word_strings(token_pieces(tokenizer, clean_ids))
        matcher = difflib.SequenceMatcher(a=clean_words, b=noisy_words, autojunk=False)
        for tag, _, _, j1, j2 in matcher.get_opcodes():
            if tag in ("replace", "insert"):
                for w in range(j1, j2):
                    marked.update(tokens[i].position for i in groups[w])
        return marked
    wanted = {w.lower() for w in words}
    for w, text in enumerate(noisy_words):
        if text.lower() in wanted:
            marked.update(tokens[i].position for i in groups[w])
    return marked


# --------------------------------------------------------------------------- captions and the report


class CaptionSource:
    """Captions of a split with their pid and image (train: its own image; val/test: first image of the pid)."""

    def __init__(self, data: Any, split: str) -> None:
        self.split = split
        if split == "train":
            self.index = data.train
            self.eval = None
        else:
            self.eval = getattr(data, split, None)
            if self.eval is None:
                raise NoiseReportError(f"{data.name} has no {split} split")
            self.first_image: dict[int, int] = {}
            for j, pid in enumerate(np.asarray(self.eval.image_pids).tolist()):
                self.first_image.setdefault(int(pid), j)

    def __len__(self) -> int:
        return len(self.index) if self.eval is None else len(self.eval.captions)

    def caption(self, i: int) -> str:
        return self.index[i][3] if self.eval is None else self.eval.captions[i]

    def get(self, i: int) -> tuple[str, str, int]:
        """(caption, image path, pid) of caption `i`."""
        if self.eval is None:
            pid, _, path, caption = self.index[i]
            return caption, path, int(pid)
        pid = int(self.eval.caption_pids[i])
        if pid not in self.first_image:
            raise NoiseReportError(f"caption {i} (pid {pid}) has no image of its identity in the {self.split} "
                                   "gallery")
        return self.eval.captions[i], self.eval.img_paths[self.first_image[pid]], pid


def load_noise_report(root: str) -> dict[str, Any] | None:
    """`noise_report.json` of the synthetic generator at the data root (or its parent), or None if absent."""
    candidates = [os.path.join(root, NOISE_REPORT), os.path.join(os.path.dirname(os.path.normpath(root)), NOISE_REPORT)]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise NoiseReportError(f"cannot read {path}: {err}") from err
    if not isinstance(report, dict):
        raise NoiseReportError(f"{path}: expected a JSON object with 'benchmark' and 'webperson' sections")
    return report


def match_noise_entries(report: dict[str, Any], dataset: str, source: CaptionSource) -> dict[int, dict[str, Any]]:
    """Caption index in `source` -> noise-report entry, for the entries of this dataset and split.

    Report keys are flat caption indices in annotation order, which equal the
    training sample index for WebPerson; each match is confirmed by the
    caption text, and entries whose key does not line up (e.g. the benchmark,
    whose keys also count val/test records) are found by their text.
    """
    section = report.get("webperson" if dataset == "WebPerson" else "benchmark") or {}
    entries = [(int(k), e) for k, e in section.items()
               if str(k).isdigit() and isinstance(e, dict) and e.get("split") == source.split]
    found: dict[int, dict[str, Any]] = {}
    unresolved = []
    for key, entry in sorted(entries, key=lambda item: item[0]):
        if 0 <= key < len(source) and source.caption(key) == entry.get("text"):
            found[key] = entry
        else:
            unresolved.append(entry)
    if unresolved:
        by_text: dict[str, list[int]] = {}
        for i in range(len(source)):
            by_text.setdefault(source.caption(i), []).append(i)
        for entry in unresolved:
            candidates = [i for i in by_text.get(entry.get("text"), []) if i not in found]
            if candidates:
                found[candidates[0]] = entry
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------- the metric


def caption_auc(scores: Sequence[float] | Tensor | np.ndarray, corrupted: Sequence[bool] | np.ndarray) -> float:
    """ROC AUC of one caption's word-token scores for "clean scores above corrupted".

    Args:
        scores: one score per word token (SOT, EOT and padding already removed).
        corrupted: per token, whether it belongs to a corrupted word.

    Returns:
        The share of (clean, corrupted) token pairs ordered clean > corrupted, ties
        counting half; NaN when the caption has no clean or no corrupted token.
    """
    values = np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores, dtype=np.float64)
    bad = np.asarray(corrupted, dtype=bool)
    if values.shape != bad.shape or values.ndim != 1:
        raise ValueError(f"caption_auc: scores {values.shape} and corrupted {bad.shape} must be equal 1-D shapes")
    clean, noisy = values[~bad][:, None], values[bad][None, :]
    if clean.size == 0 or noisy.size == 0:
        return float("nan")
    return float(((clean > noisy) + 0.5 * (clean == noisy)).mean())


@torch.no_grad()
def occlusion_scores(model: nn.Module, image_feats: Tensor, ids: Tensor) -> Tensor:
    """Per token, cos(image, caption) minus cos(image, caption without that token); 0 outside `0 < j < eot`.

    Args:
        model: anything with `encode_text(ids) -> [B, D]` (the EOT feature).
        image_feats: image features [B, D].
        ids: caption token ids [B, L].
    """
    image = F.normalize(image_feats.float(), dim=-1)
    valid = valid_token_mask(ids)
    full = (F.normalize(model.encode_text(ids).float(), dim=-1) * image).sum(-1)
    scores = torch.zeros(ids.shape, device=ids.device)
    pad = ids.new_zeros(1)
    for row in range(ids.shape[0]):
        positions = torch.nonzero(valid[row]).flatten().tolist()
        if not positions:
            continue
        deleted = torch.stack([torch.cat([ids[row, :j], ids[row, j + 1:], pad]) for j in positions])
        sims = F.normalize(model.encode_text(deleted).float(), dim=-1) @ image[row]
        scores[row, positions] = full[row] - sims
    return scores


def _scorer(name: str, model: nn.Module, generator: torch.Generator) -> Callable[[Tensor, Tensor], Tensor]:
    """`(image features [B, D], ids [B, L]) -> scores [B, L]` of one scorer."""
    if name == "model":
        return model.token_scores
    if name == "gass":
        return lambda feats, ids: gass_scores(model.base_model, feats, ids, model.gass_layers,
                                              scales=model.gass_scales, attn_norm=model.gass_attn_norm,
                                              normalize=model.gass_normalize)
    if name == "css":
        return lambda feats, ids: css_scores(model.base_model, feats, ids, normalize=model.gass_normalize)
    if name == "occlusion":
        return lambda feats, ids: occlusion_scores(model, feats, ids)
    if name == "random":
        return lambda feats, ids: torch.rand(ids.shape, generator=generator)
    raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(SCORERS)}")


def _noisy_training_captions(root: str, annotation: str) -> tuple[CaptionSource, dict[int, dict[str, Any]]]:
    """The WebPerson training captions of `root`, and the noise-report entries of the corrupted ones by caption index.

    Raises:
        NoiseReportError: `root` has no noise report.
    """
    report = load_noise_report(root)
    if report is None:
        raise NoiseReportError(f"{root} has no {NOISE_REPORT} (made by tools/make_synthetic.py)")
    source = CaptionSource(build_dataset("WebPerson", root, annotation=annotation), "train")
    return source, match_noise_entries(report, "WebPerson", source)


def _image_batches(source: CaptionSource, keys: list[int], *, image_size: Sequence[int], batch_size: int,
                   device: torch.device | str) -> Iterator[tuple[list[int], list[tuple[str, str, int]], Tensor]]:
    """Per batch of `batch_size` captions: their indices, (caption, image path, pid) rows, and their own
    images (evaluation transform) on `device`."""
    transform = build_transforms(tuple(image_size), is_train=False)
    for start in range(0, len(keys), batch_size):
        chunk = keys[start:start + batch_size]
        rows = [source.get(i) for i in chunk]
        images = torch.stack([transform(open_image(path)) for _, path, _ in rows])
        yield chunk, rows, images.to(torch.device(device))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block, its training flag restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def noise_detection_auc(model: nn.Module, root: str, *, image_size: Sequence[int], annotation: str = "",
                        text_length: int = 77, batch_size: int = 32, device: torch.device | str = "cpu",
                        scorers: Iterable[str] = ("model",), seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Per-caption AUCs of each scorer on every corrupted WebPerson training caption of `root`.

    Each caption is scored with its own image in batches of `batch_size` (as in
    training: GASS's batch min-max normalisation is one affine map per batch, so it
    never changes the order within a caption). The model is put in eval mode and
    restored afterwards.

    Args:
        model: a retrieval model (`encode_image`, `token_scores`; GASS/CSS also read
            `base_model` and its `gass_*` settings).
        root: the synthetic data root (holding `noise_report.json` and `WebPerson/`).
        image_size: model input (H, W).
        annotation: WebPerson annotation to read ("" = the one found).
        scorers: names from :data:`SCORERS`.
        seed: seed of the random scorer.

    Returns:
        scorer -> corruption kind -> per-caption AUCs (captions with both clean and
        corrupted word tokens).

    Raises:
        NoiseReportError: `root` has no noise report or no corrupted training caption.
    """
    scorers = list(scorers)
    for name in scorers:
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(SCORERS)}")
    source, noisy = _noisy_training_captions(root, annotation)
    if not noisy:
        raise NoiseReportError(f"no noisy WebPerson training caption of {root} is listed in its noise report")
    tokenizer = Tokenizer()
    generator = torch.Generator().manual_seed(seed)
    score_fns = {name: _scorer(name, model, generator) for name in scorers}
    aucs: dict[str, dict[str, list[float]]] = {name: {} for name in scorers}
    with _eval_mode(model):
        for chunk, rows, images in _image_batches(source, list(noisy), image_size=image_size, batch_size=batch_size,
                                                  device=device):
            ids = tokenizer.tokenize([caption for caption, _, _ in rows], text_length).to(images.device)
            with torch.no_grad():
                feats = model.encode_image(images)
            # GASS differentiates through the text tower: no inference_mode around the scorers.
            scores = {name: fn(feats, ids).float().cpu() for name, fn in score_fns.items()}
            valid = valid_token_mask(ids).cpu()
            for row, key in enumerate(chunk):
                entry = noisy[key]
                bad = corrupted_positions(tokenizer, ids[row].tolist(), entry.get("clean"), entry.get("words", ()))
                positions = torch.nonzero(valid[row]).flatten().tolist()
                flags = [p in bad for p in positions]
                kind = str(entry.get("kind", "unknown"))
                for name in scorers:
                    auc = caption_auc(scores[name][row, positions], flags)
                    if not np.isnan(auc):
                        aucs[name].setdefault(kind, []).append(auc)
    if not any(aucs[name] for name in scorers):
        raise NoiseReportError("no corrupted caption has both clean and corrupted word tokens")
    return aucs


@torch.no_grad()
def clean_preference(model: nn.Module, root: str, *, image_size: Sequence[int], annotation: str = "",
                     text_length: int = 77, batch_size: int = 32, device: torch.device | str = "cpu"
                     ) -> dict[str, float]:
    """Per corruption kind, the share of corrupted captions whose clean version matches their image better.

    A caption-level check of whether the model sees the noise at all (cosine of the
    image with the clean caption of the noise report vs with the corrupted one; ties
    count half): no token score can single out words the model itself ignores.
    """
    source, noisy = _noisy_training_captions(root, annotation)
    noisy = {k: e for k, e in noisy.items() if e.get("clean")}
    tokenizer = Tokenizer()
    prefers: dict[str, list[float]] = {}
    with _eval_mode(model):
        for chunk, rows, images in _image_batches(source, list(noisy), image_size=image_size, batch_size=batch_size,
                                                  device=device):
            image = F.normalize(model.encode_image(images).float(), dim=-1)
            sims = []
            for texts in ([caption for caption, _, _ in rows], [noisy[k]["clean"] for k in chunk]):
                ids = tokenizer.tokenize(texts, text_length).to(images.device)
                sims.append((F.normalize(model.encode_text(ids).float(), dim=-1) * image).sum(-1).cpu())
            for row, key in enumerate(chunk):
                noisy_sim, clean_sim = float(sims[0][row]), float(sims[1][row])
                won = 1.0 if clean_sim > noisy_sim else 0.5 if clean_sim == noisy_sim else 0.0
                prefers.setdefault(str(noisy[key].get("kind", "unknown")), []).append(won)
    return summarize_aucs(prefers)


def summarize_aucs(per_kind: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """`{"all": mean over captions, <kind>: mean per kind (NaN if none), "captions": count}`."""
    every = [a for values in per_kind.values() for a in values]
    out = {"all": float(np.mean(every)) if every else float("nan"), "captions": float(len(every))}
    for kind in (*NOISE_KINDS, *sorted(set(per_kind) - set(NOISE_KINDS))):
        values = per_kind.get(kind) or []
        out[kind] = float(np.mean(values)) if values else float("nan")
    return out
