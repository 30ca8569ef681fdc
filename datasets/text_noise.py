"""Controlled corruption of retrieval queries: the textual noise GA-DMS claims robustness to.

Five kinds, each at a rate = the fraction of the caption's words corrupted
(docs/robustness.md):

* ``drop``: words deleted (at least one word is kept);
* ``swap``: attribute substitution, a colour / garment / bag / accessory word
  replaced by another word of its class (``a red jacket`` -> ``a green parka``);
* ``clause``: irrelevant sentences inserted (background, other people, image
  quality, speculation: what the curation prompt forbids an MLLM to write), as
  many words as the rate asks, to within half the shortest clause;
* ``typo``: one character typo per word (keyboard neighbour, deletion,
  insertion, transposition), inside the word;
* ``mix``: every corrupted word draws one of the four above.

The words, clauses and typo model come from a word list
(``datasets/text_noise_words.json``, general English, so it applies to real
CUHK-PEDES / ICFG-PEDES / RSTPReid captions as well as to the synthetic ones).

Determinism: the corruption of a caption depends only on (seed, kind, rate,
caption index, caption text), never on the order in which captions or models
are processed; a word's own choices (its replacement, its typo) depend on
(seed, kind, index, position), so the words corrupted at a higher rate include
those corrupted at a lower one for ``drop``, ``swap`` and ``typo``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_VOCABULARY", "NOISE_KINDS", "NoiseVocabulary", "NoisyCaption", "corrupt_caption",
           "corrupt_captions", "load_vocabulary", "split_words"]

NOISE_KINDS = ("drop", "swap", "clause", "typo", "mix")
#: The word list shipped with the repository.
DEFAULT_VOCABULARY = Path(__file__).resolve().parent / "text_noise_words.json"

#: A word: letters/digits, with inner hyphens or apostrophes ("t-shirt", "woman's").
_WORD_RE = re.compile(r"[^\W_]+(?:[-'\u2019][^\W_]+)*")
_SENTENCE_END = ".!?"
# Separator marks after a deletion, strongest first; brackets and quotes around a deleted word go with it.
_CLAUSE_MARKS = ";:,"
_PAIRED_MARKS = "()[]{}\"\u201c\u201d"
_MIX_KINDS = ("drop", "swap", "clause", "typo")
_TYPO_OPERATIONS = ("substitute", "delete", "insert", "transpose")


def split_words(caption: str) -> tuple[list[str], list[str]]:
    """A caption's words and the separators around them: ``seps[0] + words[0] + seps[1] + ... + seps[-1]``."""
    parts = re.split(f"({_WORD_RE.pattern})", caption)
    return parts[1::2], parts[0::2]


@dataclass(frozen=True)
class NoisyCaption:
    """A corrupted caption.

    Attributes:
        text: The corrupted caption.
        words: Words in the clean caption (the rate's denominator).
        changed: Words corrupted: deleted, replaced or typo'd, plus the words inserted.
    """

    text: str
    words: int
    changed: int

    @property
    def fraction(self) -> float:
        """Corrupted words / clean words (0 for a caption without words)."""
        return self.changed / self.words if self.words else 0.0


@dataclass(frozen=True)
class NoiseVocabulary:
    """What the corruptions draw from (see ``datasets/text_noise_words.json``).

    Attributes:
        swap_classes: Class name -> groups of words; a group holds spellings or synonyms
            of one value (``grey``/``gray``), so a swap always changes the value.
        clauses: Irrelevant sentences, lower case; ``{pron}`` becomes he / she / the person.
        pronouns: ``he`` / ``she`` -> caption words that suggest that pronoun.
        keyboard: Letter -> the letters next to it (typo substitutions and insertions).
        typo_operations: Typo operation -> relative weight.
        mix_weights: Kind -> relative weight of a ``mix`` word.
    """

    swap_classes: Mapping[str, tuple[tuple[str, ...], ...]]
    clauses: tuple[str, ...]
    pronouns: Mapping[str, frozenset[str]]
    keyboard: Mapping[str, str]
    typo_operations: Mapping[str, float]
    mix_weights: Mapping[str, float]

    @functools.cached_property
    def _word_groups(self) -> dict[str, tuple[str, int]]:
        return {word: (name, g) for name, groups in self.swap_classes.items()
                for g, group in enumerate(groups) for word in group}

    @functools.cached_property
    def _typo_cache(self) -> dict[str, dict[str, list[str]]]:
        return {}

    @functools.cached_property
    def _clause_cache(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        return {}

    def _clauses_for(self, pron: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The clauses with ``{pron}`` filled in, and their word counts."""
        if pron not in self._clause_cache:
            clauses = tuple(c.replace("{pron}", pron) for c in self.clauses)
            self._clause_cache[pron] = clauses, tuple(len(split_words(c)[0]) for c in clauses)
        return self._clause_cache[pron]

    def word_class(self, word: str) -> str | None:
        """The swap class of ``word`` (any case), or None."""
        found = self._word_groups.get(word.lower())
        return found[0] if found else None

    def same_value(self, a: str, b: str) -> bool:
        """Whether two words are spellings of one value of a class (``grey``, ``Gray``)."""
        ga, gb = self._word_groups.get(a.lower()), self._word_groups.get(b.lower())
        return ga is not None and ga == gb


def _fail(path: str, message: str) -> ValueError:
    return ValueError(f"{path}: {message}")


def _weights(data: Any, valid: Sequence[str], key: str, path: str) -> dict[str, float]:
    if not isinstance(data, dict) or set(data) - set(valid):
        raise _fail(path, f"{key} must map some of {list(valid)} to weights, got {data!r}")
    weights = {}
    for name, weight in data.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise _fail(path, f"{key}.{name} must be a weight >= 0, got {weight!r}")
        weights[name] = float(weight)
    if not any(weights.values()):
        raise _fail(path, f"{key} gives every entry weight 0")
    return weights


def load_vocabulary(path: str | os.PathLike | None = None) -> NoiseVocabulary:
    """Read and check a word list (default: the shipped ``datasets/text_noise_words.json``).

    Raises:
        ValueError: a malformed list (names the file and the entry): a word in two
            groups, a multi-word or upper-case swap entry, a class of one value, an
            empty clause list, a keyboard entry that is not letters.
    """
    if path is None:
        return _default_vocabulary()
    return _load(os.fspath(path))


@functools.lru_cache(maxsize=1)
def _default_vocabulary() -> NoiseVocabulary:
    return _load(os.fspath(DEFAULT_VOCABULARY))


def _load(path: str) -> NoiseVocabulary:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise _fail(path, f"not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(data, dict):
        raise _fail(path, "expected a JSON object")
    missing = [k for k in ("swap_classes", "clauses", "pronouns", "keyboard", "typo_operations", "mix_weights")
               if k not in data]
    if missing:
        raise _fail(path, f"missing keys {missing}")

    classes: dict[str, tuple[tuple[str, ...], ...]] = {}
    owner: dict[str, str] = {}
    for name, entries in data["swap_classes"].items():
        if not isinstance(entries, list):
            raise _fail(path, f"swap_classes.{name} must be a list")
        groups = []
        for entry in entries:
            group = tuple(entry) if isinstance(entry, list) else (entry,)
            for word in group:
                if not isinstance(word, str) or _WORD_RE.fullmatch(word) is None or word != word.lower():
                    raise _fail(path, f"swap_classes.{name}: {word!r} is not one lower-case word")
                if word in owner:
                    raise _fail(path, f"{word!r} is in swap_classes.{owner[word]} and swap_classes.{name}")
                owner[word] = name
            groups.append(group)
        if len(groups) < 2:
            raise _fail(path, f"swap_classes.{name} needs two values or more to swap between")
        classes[name] = tuple(groups)

    raw_clauses = data["clauses"]
    flat = [c for group in raw_clauses.values() for c in group] if isinstance(raw_clauses, dict) else raw_clauses
    if not isinstance(flat, list) or not flat:
        raise _fail(path, "clauses must be a non-empty list (or a dict of lists)")
    for clause in flat:
        if not isinstance(clause, str) or not split_words(clause.replace("{pron}", "he"))[0]:
            raise _fail(path, f"clause {clause!r} has no words")

    pronouns = {}
    for name in ("he", "she"):
        words = data["pronouns"].get(name) if isinstance(data["pronouns"], dict) else None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise _fail(path, f"pronouns.{name} must be a list of words")
        pronouns[name] = frozenset(w.lower() for w in words)

    keyboard = data["keyboard"]
    if not isinstance(keyboard, dict) or not keyboard:
        raise _fail(path, "keyboard must map letters to their neighbours")
    for letter, near in keyboard.items():
        if len(letter) != 1 or not letter.isalpha() or not isinstance(near, str) or not near.isalpha() \
                or letter in near:
            raise _fail(path, f"keyboard entry {letter!r}: {near!r} must be other letters")

    return NoiseVocabulary(
        swap_classes=classes, clauses=tuple(flat), pronouns=pronouns,
        keyboard={k.lower(): v.lower() for k, v in keyboard.items()},
        typo_operations=_weights(data["typo_operations"], _TYPO_OPERATIONS, "typo_operations", path),
        mix_weights=_weights(data["mix_weights"], _MIX_KINDS, "mix_weights", path))


# --------------------------------------------------------------------------- helpers


def _rng(*parts: object) -> random.Random:
    """A generator seeded from names and indices with SHA-256 (stable across processes and runs)."""
    text = "\x1f".join(str(p) for p in parts)
    return random.Random(int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big"))


def _budget(rate: float, words: int) -> int:
    """round(rate * words), halves up."""
    return int(math.floor(rate * words + 0.5))


def _match_case(template: str, word: str) -> str:
    if len(template) > 1 and template.isupper():
        return word.upper()
    return word[:1].upper() + word[1:] if template[:1].isupper() else word


def _article_for(word: str) -> str:
    lower = word.lower()
    # A rough sound rule: "a uniform", "a euro", "an umbrella", "an orange".
    vowel = lower[:1] in "aeiou" and not lower.startswith(("uni", "use", "eu", "one"))
    return "an" if vowel else "a"


def _starts_sentence(seps: Sequence[str], i: int) -> bool:
    return i == 0 or any(c in _SENTENCE_END for c in seps[i])


def _merged_separator(sep: str, where: str, first_sep: str) -> str:
    """What is left between two kept words (or at an end) once the words between them are deleted."""
    if where == "start":
        return first_sep
    marks = [c for c in sep if not c.isspace() and c not in _PAIRED_MARKS]
    ends = [c for c in marks if c in _SENTENCE_END]
    if where == "end":
        return ends[0] if ends else ""
    if ends:
        return ends[0] + " "
    for mark in _CLAUSE_MARKS:
        if mark in marks:
            return mark + " "
    return " " + "".join(marks) + " " if marks else " "


def _join(words: Sequence[str], seps: Sequence[str], dropped: set[int]) -> str:
    """The caption without the words at `dropped`, with sane punctuation and capitals around the gaps."""
    if not dropped:
        return "".join(s + w for s, w in zip(seps, words)) + seps[-1]
    out: list[str] = []
    pending, merged, capitalise = seps[0], False, False
    for i, word in enumerate(words):
        if i in dropped:
            pending += seps[i + 1]
            merged = True
            capitalise = capitalise or (word[:1].isupper() and _starts_sentence(seps, i))
            continue
        sep = _merged_separator(pending, "start" if not out else "middle", seps[0]) if merged else pending
        if capitalise and (not out or any(c in _SENTENCE_END for c in sep)) and word[:1].islower():
            word = word[:1].upper() + word[1:]
        out.append(sep + word)
        pending, merged, capitalise = seps[i + 1], False, False
    out.append(_merged_separator(pending, "end", seps[0]) if merged else pending)
    return "".join(out)


# --------------------------------------------------------------------------- the corruptions


def _swap_word(word: str, vocab: NoiseVocabulary, rng: random.Random) -> str:
    name, own = vocab._word_groups[word.lower()]
    groups = vocab.swap_classes[name]
    other = rng.randrange(len(groups) - 1)
    return _match_case(word, rng.choice(groups[other + (other >= own)]))


def _fix_article(words: list[str], seps: Sequence[str], i: int) -> None:
    """Make ``a``/``an`` right before word i agree with it (not counted as a corruption)."""
    if i > 0 and words[i - 1].lower() in ("a", "an") and seps[i].strip() == "":
        words[i - 1] = _match_case(words[i - 1], _article_for(words[i]))


def _typo_candidates(word: str, vocab: NoiseVocabulary) -> dict[str, list[str]]:
    """Every one-typo variant of ``word`` by operation, each still one word (hyphens and apostrophes inside it)."""
    cache = vocab._typo_cache
    if word in cache:
        return cache[word]
    lower = word.lower()
    found: dict[str, list[str]] = {op: [] for op in _TYPO_OPERATIONS if vocab.typo_operations.get(op, 0.0) > 0}
    for j, c in enumerate(word):
        if not c.isalpha():
            continue
        near = [n.upper() if c.isupper() else n for n in vocab.keyboard.get(c.lower(), "")]
        variants = {"substitute": [word[:j] + n + word[j + 1:] for n in near],
                    "insert": [word[:j + 1] + n + word[j + 1:] for n in near],
                    "delete": [word[:j] + word[j + 1:]],
                    "transpose": [word[:j] + word[j + 1] + word[j] + word[j + 2:]] if j + 1 < len(word) else []}
        for op, texts in variants.items():
            if op in found:
                found[op] += [t for t in texts if t.lower() != lower and _WORD_RE.fullmatch(t)]
    cache[word] = {op: texts for op, texts in found.items() if texts}
    return cache[word]


def _typo_word(word: str, vocab: NoiseVocabulary, rng: random.Random) -> str:
    candidates = _typo_candidates(word, vocab)
    ops = list(candidates)
    typo = rng.choice(candidates[rng.choices(ops, [vocab.typo_operations[op] for op in ops])[0]])
    # "She" -> "Hse", not "hSe": the word keeps its capitalisation.
    return _match_case(word, typo.lower()) if word[:1].isupper() and not word[1:].isupper() else typo


def _pronoun(words: Sequence[str], vocab: NoiseVocabulary) -> str:
    lower = {w.lower() for w in words}
    he, she = bool(lower & vocab.pronouns["he"]), bool(lower & vocab.pronouns["she"])
    return "he" if he and not she else "she" if she and not he else "the person"


def _insert_clauses(text: str, budget: int, vocab: NoiseVocabulary, rng: random.Random) -> tuple[str, int]:
    """``text`` with irrelevant sentences of about ``budget`` words in all; returns it and the words inserted."""
    words, seps = split_words(text)
    if budget <= 0 or not words:
        return text, 0
    clauses, lengths = vocab._clauses_for(_pronoun(words, vocab))
    shortest = min(lengths)
    chosen: list[str] = []
    inserted = 0
    # Greedy fill: a clause that fits the words left, else (while more than half the
    # shortest clause is missing) a shortest one; the count ends within shortest/2 of the budget.
    while budget - inserted >= shortest / 2:
        left = budget - inserted
        fitting = [j for j, n in enumerate(lengths) if n <= left] or \
            [j for j, n in enumerate(lengths) if n == shortest]
        j = rng.choice(fitting)
        chosen.append(clauses[j])
        inserted += lengths[j]
    # Sentence boundaries: the start, after each inner sentence end, the end.
    inner = [i for i in range(1, len(words)) if any(c in _SENTENCE_END for c in seps[i])]
    boundaries = [0, *inner, len(words)]
    at: dict[int, list[str]] = {}
    for clause in chosen:
        at.setdefault(rng.choice(boundaries), []).append(clause)
    # The caption's style: all lower case, all capitals, or sentences with a capital.
    lower_case, upper_case = not any(c.isupper() for c in text), not any(c.islower() for c in text)

    def sentence(clause: str) -> str:
        text = clause if lower_case else clause.upper() if upper_case else clause[:1].upper() + clause[1:]
        return text + "."

    out = []
    for i, word in enumerate(words):
        sep = seps[i]
        if i in at and i == 0:
            out.append(sep + " ".join(sentence(c) for c in at[i]) + " ")
        elif i in at:
            cut = max(sep.rfind(c) for c in _SENTENCE_END) + 1
            out.append(sep[:cut] + " " + " ".join(sentence(c) for c in at[i]) + " ")
        else:
            out.append(sep)
        out.append(word)
    tail = seps[-1]
    if len(words) in at:
        ends = [c for c in tail if c in _SENTENCE_END]
        tail = (tail.rstrip() if ends else ".") + " " + " ".join(sentence(c) for c in at[len(words)])
    out.append(tail)
    return "".join(out), inserted


def _check(kind: str, rate: float) -> None:
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid kinds: {', '.join(NOISE_KINDS)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be a number in [0, 1] (a fraction of the words), got {rate!r}")


def corrupt_caption(caption: str, kind: str, rate: float, *, seed: int = 0, index: int = 0,
                    vocabulary: NoiseVocabulary | None = None) -> NoisyCaption:
    """Corrupt about ``rate`` of a caption's words with noise of ``kind``.

    The number of words corrupted is round(rate x words) -- fewer for ``swap`` when
    the caption has fewer attribute words, and for ``drop`` at most all words but
    one; ``clause`` inserts that many words to within half the shortest clause.
    Rate 0 returns the caption unchanged.

    Args:
        caption: The clean caption.
        kind: One of :data:`NOISE_KINDS`.
        rate: Fraction of the words, in [0, 1].
        seed: Noise seed.
        index: The caption's index in its split (with ``seed``, what the draws depend on).
        vocabulary: Word list (default: the shipped one).

    Raises:
        ValueError: an unknown kind or a rate outside [0, 1].
    """
    _check(kind, rate)
    vocab = vocabulary or load_vocabulary()
    words, seps = split_words(caption)
    n = len(words)
    budget = _budget(rate, n)
    if budget == 0:
        return NoisyCaption(caption, n, 0)
    order = _rng(seed, kind, index).sample(range(n), n)

    def word_rng(i: int) -> random.Random:
        return _rng(seed, kind, index, i)

    new = list(words)
    if kind == "drop":
        dropped = set(order[:min(budget, n - 1)])
        return NoisyCaption(_join(words, seps, dropped), n, len(dropped))
    if kind == "swap":
        chosen = [i for i in order if vocab.word_class(words[i])][:budget]
        for i in sorted(chosen):
            new[i] = _swap_word(words[i], vocab, word_rng(i))
            _fix_article(new, seps, i)
        return NoisyCaption(_join(new, seps, set()), n, len(chosen))
    if kind == "typo":
        chosen = [i for i in order if _typo_candidates(words[i], vocab)][:budget]
        for i in chosen:
            new[i] = _typo_word(words[i], vocab, word_rng(i))
        return NoisyCaption(_join(new, seps, set()), n, len(chosen))
    if kind == "clause":
        text, inserted = _insert_clauses(caption, budget, vocab, _rng(seed, kind, index, "clauses"))
        return NoisyCaption(text, n, inserted)

    # mix: each of the first `budget` words of the order draws a kind; a word that kind
    # cannot change (no attribute word, no letter) falls back to a typo, then to deletion.
    kinds = list(vocab.mix_weights)
    weights = [vocab.mix_weights[k] for k in kinds]
    dropped: set[int] = set()
    changed, clause_words = 0, 0
    for i in order[:budget]:
        chosen_kind = word_rng(i).choices(kinds, weights)[0]
        if chosen_kind == "clause":
            clause_words += 1
            continue
        if chosen_kind == "swap" and vocab.word_class(words[i]):
            new[i] = _swap_word(words[i], vocab, word_rng(i))
            _fix_article(new, seps, i)
        elif chosen_kind in ("swap", "typo") and _typo_candidates(words[i], vocab):
            new[i] = _typo_word(words[i], vocab, word_rng(i))
        elif len(dropped) < n - 1:
            dropped.add(i)
        else:
            continue
        changed += 1
    text, inserted = _insert_clauses(_join(new, seps, dropped), clause_words, vocab,
                                     _rng(seed, kind, index, "clauses"))
    return NoisyCaption(text, n, changed + inserted)


def corrupt_captions(captions: Sequence[str], kind: str, rate: float, *, seed: int = 0,
                     vocabulary: NoiseVocabulary | None = None) -> list[NoisyCaption]:
    """:func:`corrupt_caption` of every caption, caption i with ``index=i``."""
    _check(kind, rate)
    vocab = vocabulary or load_vocabulary()
    return [corrupt_caption(c, kind, rate, seed=seed, index=i, vocabulary=vocab) for i, c in enumerate(captions)]
