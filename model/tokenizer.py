"""CLIP byte-level BPE tokenizer with IRRA's ``<|mask|>`` token (docs/method.md §3).

The merges are read from the vocabulary file bundled with the installed
``open_clip`` package, so there is no vendored copy. Text cleaning and the
pre-tokenisation regex follow OpenAI CLIP / open_clip exactly; ids equal
OpenAI's for every ordinary token except the one whose slot holds the mask
token (see :class:`Tokenizer`).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch

logger = logging.getLogger(__name__)

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI keeps 49152 - 256 - 2 merges so that bytes (256) + byte</w> (256) +
# merges + 2 specials = 49408 entries.
NUM_MERGES = 49152 - 256 - 2
MASK_TOKEN = "<|mask|>"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"

# OpenAI's pattern; the only special text recognised is the mask token, so a
# decoded masked caption re-encodes to the same ids. SOT/EOT are never parsed
# from text: a caption containing "<|endoftext|>" must not end the caption
# early, because the text feature is taken at argmax(ids) (the first EOT).
_PRETOKEN_PATTERN = regex.compile(
    r"""<\|mask\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from the 256 byte values to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, [chr(c) for c in code_points], strict=True))


def clean_text(text: str) -> str:
    """Clean a caption as OpenAI CLIP / open_clip do ("lower" cleaning).

    ftfy fix, HTML unescape (twice, as OpenAI does), whitespace collapse,
    lower-case.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


# Printable ASCII other than the space: what survives the cleaning of ASCII text without '&' or ESC.
_VISIBLE_ASCII = re.compile(r"[!-~]")


def cleans_to_empty(text: str) -> bool:
    """Whether :func:`clean_text` leaves nothing of ``text`` (a caption that has no tokens).

    Loaders call this on every caption, so it answers ASCII text without HTML
    entities or terminal escapes without running ftfy (about 20 us a caption):
    on such text the cleaning only drops control characters and whitespace.
    """
    if text.isascii() and "&" not in text and "\x1b" not in text:
        return _VISIBLE_ASCII.search(text) is None
    return not clean_text(text)


def default_bpe_path() -> str:
    """Path of the merges file bundled with the installed ``open_clip`` package.

    Found through the package's import spec rather than
    ``importlib.resources.files("open_clip")``: the latter imports open_clip
    (and timm, and open_clip's own tokenizer), which costs seconds in every
    data-loader worker.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package open_clip (pip: open_clip_torch) is not installed; it provides {BPE_FILENAME}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{BPE_FILENAME} not found in the open_clip package at {path}")
    return str(path)


def _read_merges(bpe_path: str) -> list[tuple[str, str]]:
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except OSError as exc:
        raise ValueError(f"cannot read BPE merges file {bpe_path!r}: {exc}") from exc
    # Line 0 is the "#version" header.
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"BPE merges file {bpe_path!r} must hold at least {NUM_MERGES} merge lines "
            "of two symbols each after its header"
        )
    return merges


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:], strict=True))


class Tokenizer:
    """CLIP BPE tokenizer with IRRA's mask token.

    Vocabulary (49408 entries): 256 byte symbols, 256 byte symbols + ``</w>``,
    the joined tokens of the first 48894 merges, except that the last merged
    entry is dropped, then ``<|mask|>`` (49405), ``<|startoftext|>`` (49406),
    ``<|endoftext|>`` (49407). Padding is 0. Every other id equals OpenAI's.

    The dropped entry is the last merge, ``jeky + ll</w>`` (the word
    "jekyll"). IRRA drops it from the vocabulary only, so that word raises a
    KeyError there. Here the merge is also removed from the BPE ranks, so BPE
    never produces the dropped token: "jekyll" encodes as its two sub-pieces
    ``jeky`` and ``ll</w>``, both in the vocabulary. Being the last-ranked
    merge, nothing is merged after it, so no other word's encoding changes.

    Literal ``<|mask|>`` in input text encodes to the mask id (so decoded
    masked captions re-encode identically); SOT/EOT are never parsed from text.

    Args:
        bpe_path: gzip merges file; defaults to the one bundled with open_clip.
        cache_size: maximum number of pre-tokens whose BPE result is cached;
            the cache is cleared when full so memory stays bounded.
    """

    pad_id = 0
    first_ordinary_id = 1
    last_ordinary_id = 49404
    mask_id = 49405
    sot_id = 49406
    eot_id = 49407
    vocab_size = 49408

    def __init__(self, bpe_path: str | None = None, cache_size: int = 200_000) -> None:
        self.bpe_path = bpe_path if bpe_path is not None else default_bpe_path()
        merges = _read_merges(self.bpe_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}

        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        self.dropped_token = vocab.pop()
        vocab += [MASK_TOKEN, SOT_TOKEN, EOT_TOKEN]
        if len(vocab) != self.vocab_size:
            raise ValueError(f"vocabulary built from {self.bpe_path!r} has {len(vocab)} entries")
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        # Without the last merge BPE can never produce the dropped token.
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges[:-1])}
        self.cache_size = cache_size
        self._cache: dict[str, tuple[int, ...]] = {}

    def _bpe(self, token: str) -> tuple[int, ...]:
        """BPE-encode one byte-mapped pre-token into ids (cached)."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        while pairs:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            pairs = _pairs(word)
        ids = tuple(self.encoder[piece] for piece in word)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[token] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Encode a caption into token ids, without SOT/EOT.

        Raises:
            TypeError: ``text`` is not a string.
            ValueError: ``text`` is empty after cleaning.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        cleaned = clean_text(text)
        if not cleaned:
            raise ValueError(f"text is empty after cleaning: {text!r}")
        ids: list[int] = []
        for pretoken in _PRETOKEN_PATTERN.findall(cleaned):
            if pretoken == MASK_TOKEN:
                ids.append(self.mask_id)
                continue
            mapped = "".join(self.byte_encoder[b] for b in pretoken.encode("utf-8"))
            ids.extend(self._bpe(mapped))
        return ids

    def tokenize(self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
        """Encode captions into ``[B, context_length]`` ids: SOT, tokens, EOT, zero padding.

        Captions longer than ``context_length`` are cut and EOT is put in the
        last slot (when ``truncate``; otherwise a ValueError names the caption).
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is an empty list")
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2, got {context_length!r}")

        rows: list[list[int]] = []
        for index, text in enumerate(texts):
            try:
                ids = self.encode(text)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"texts[{index}]: {exc}") from exc
            row = [self.sot_id, *ids, self.eot_id]
            if len(row) > context_length:
                if not truncate:
                    raise ValueError(
                        f"texts[{index}] has {len(row)} tokens with SOT/EOT, more than "
                        f"context_length={context_length}; pass truncate=True to cut it"
                    )
                row = row[:context_length]
                row[-1] = self.eot_id
            rows.append(row)

        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(lengths.sum()))
        out = np.zeros((len(rows), context_length), dtype=np.int64)
        # Row-major boolean fill places each row's ids left-aligned in one step.
        out[np.arange(context_length)[None, :] < lengths[:, None]] = flat
        return torch.from_numpy(out)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Turn ids back into text.

        Stops at the first EOT and skips SOT. Trailing zeros are padding and
        skipped; an interior 0 is the byte token "!" and kept. The mask token
        is shown as a separate word ``<|mask|>``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        while ids and ids[-1] == self.pad_id:
            ids.pop()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range [0, {self.vocab_size}): {bad[:5]}")

        pieces: list[str] = []
        pending: list[str] = []

        def flush() -> None:
            # Bytes of one UTF-8 character can be split over tokens, so decode
            # whole runs of ordinary tokens at once.
            if pending:
                raw = bytearray(self.byte_decoder[c] for c in "".join(pending))
                pieces.append(raw.decode("utf-8", errors="replace"))
                pending.clear()

        for i in ids:
            if i == self.sot_id:
                continue
            if i == self.mask_id:
                flush()
                pieces.append(f" {MASK_TOKEN} ")
            else:
                # "</w>" holds no byte-mapped characters; split it off first.
                token = self.decoder[i]
                if token.endswith("</w>"):
                    pending.append(token[: -len("</w>")])
                    flush()
                    pieces.append(" ")
                else:
                    pending.append(token)
        flush()
        return " ".join("".join(pieces).split())
