"""Text handling shared by the template and caption stages: answer cleaning,
template validation, caption checks, normalisation and word statistics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

PLACEHOLDER = re.compile(r"\[([^\[\]]*)\]")
_PLACEHOLDER_NAME = re.compile(r"^[a-z][a-z /'-]{0,38}[a-z]$")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.S)
_LABEL = re.compile(r"^(?:caption|description|template|answer|output|new template)\s*\d*\s*[:：-]\s*", re.I)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|\(\d+\))\s+")
_QUOTES = [('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`"), ("\u00ab", "\u00bb")]
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry\b|i apologi[sz]e|i cannot|i can'?t|i can not|i am unable|i'?m unable|"
    r"i'?m not able|i am not able|i won'?t|as an ai\b|unfortunately,? i\b|i do not feel comfortable|"
    r"i don'?t feel comfortable)", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")

#: Words that must not survive in a template outside placeholders: colours and concrete garments,
#: footwear, bags and hairstyles (the things a template replaces by placeholders).
DEFAULT_STOP_WORDS = frozenset("""
red blue green yellow black white gray grey brown pink purple orange beige navy khaki maroon violet
golden silver tan turquoise cyan magenta burgundy olive cream teal lavender crimson
jeans jacket t-shirt tshirt shirt skirt shorts dress coat sweater hoodie blouse vest trousers pants leggings
sneakers boots sandals heels slippers loafers backpack handbag purse ponytail bun braid braids
""".split())


def strip_wrappers(text: str) -> str:
    """Remove what models wrap answers in: code fences, labels, markdown emphasis, quotes; collapse spaces."""
    text = text.strip()
    for _ in range(3):  # wrappers nest ("```\n"Caption: ..."\n```"); a few passes undo them
        before = text
        match = _FENCE.match(text)
        if match:
            text = match.group(1).strip()
        text = _LABEL.sub("", text).strip()
        text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text).strip()
        for left, right in _QUOTES:
            if len(text) >= 2 and text.startswith(left) and text.endswith(right):
                text = text[len(left):-len(right)].strip()
        if text == before:
            break
    return " ".join(text.split())


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text))


def word_count(text: str) -> int:
    return len(text.split())


def words(text: str) -> list[str]:
    """Lower-case word tokens (for vocabulary statistics)."""
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    """Normalised form for de-duplication: lower case, punctuation dropped (brackets kept), single spaces."""
    text = re.sub(r"[^\w\[\]\s'-]", " ", text.lower())
    return " ".join(text.split())


def placeholders(text: str) -> list[str]:
    return [m.group(1).strip().lower() for m in PLACEHOLDER.finditer(text)]


def truncate_at_sentence(text: str, max_words: int) -> str | None:
    """The longest prefix of whole sentences with at most ``max_words`` words (None if even one is too long)."""
    kept: list[str] = []
    total = 0
    for sentence in _SENTENCE_END.split(text.strip()):
        n = word_count(sentence)
        if total + n > max_words:
            break
        kept.append(sentence)
        total += n
    return " ".join(kept) if kept else None


def template_problem(text: str, stop_words: Iterable[str] = DEFAULT_STOP_WORDS, min_placeholders: int = 2,
                     min_words: int = 5, max_words: int = 60) -> str | None:
    """Why ``text`` is not a usable attribute template (None if it is).

    Reasons: ``empty``, ``refusal``, ``too_short``, ``too_long``, ``malformed_placeholder``,
    ``few_placeholders``, ``leftover_specifics``.
    """
    if not text:
        return "empty"
    if is_refusal(text):
        return "refusal"
    n = word_count(text)
    if n < min_words:
        return "too_short"
    if n > max_words:
        return "too_long"
    if text.count("[") != text.count("]"):
        return "malformed_placeholder"
    names = placeholders(text)
    if any(not _PLACEHOLDER_NAME.match(name) for name in names):
        return "malformed_placeholder"
    if len(names) < min_placeholders:
        return "few_placeholders"
    outside = PLACEHOLDER.sub(" ", text).lower()
    stop = set(stop_words)
    if any(w in stop for w in re.findall(r"[a-z]+(?:-[a-z]+)*", outside)):
        return "leftover_specifics"
    return None


def template_lines(answer: str) -> list[str]:
    """Split an LLM answer listing templates (one per line, maybe numbered/bulleted) into cleaned lines."""
    lines = []
    body = strip_fence(answer)
    for line in body.splitlines():
        line = _LIST_MARKER.sub("", line)
        line = strip_wrappers(line)
        if line:
            lines.append(line)
    return lines


def strip_fence(text: str) -> str:
    match = _FENCE.match(text.strip())
    return match.group(1) if match else text


def caption_problem(text: str, min_words: int, max_words: int) -> tuple[str, str | None]:
    """Check a cleaned caption; return ``(caption, problem)`` where ``problem`` is None when usable.

    An over-long caption is cut at the last sentence boundary within the limit when that leaves
    at least ``min_words`` words. Problems: ``empty``, ``refusal``, ``placeholder_left``,
    ``too_long``, ``too_short``.
    """
    if not text:
        return text, "empty"
    if is_refusal(text):
        return text, "refusal"
    if PLACEHOLDER.search(text):
        return text, "placeholder_left"
    if word_count(text) > max_words:
        cut = truncate_at_sentence(text, max_words)
        if cut is None or word_count(cut) < min_words:
            return text, "too_long"
        text = cut
    if word_count(text) < min_words:
        return text, "too_short"
    return text, None


def parse_caption_answer(raw: str, json_mode: bool, min_words: int, max_words: int) -> tuple[str, str | None]:
    """Clean a VLM answer into a caption; return ``(caption, problem)`` (see ``caption_problem``).

    In JSON mode the answer must be an object with a string ``caption`` (``not_json`` otherwise).
    """
    text = raw.strip()
    if json_mode:
        if not text:
            return "", "empty"
        if is_refusal(strip_wrappers(text)):
            return text, "refusal"
        try:
            obj = json.loads(strip_fence(text))
        except ValueError:
            return text, "not_json"
        if not isinstance(obj, dict) or not isinstance(obj.get("caption"), str):
            return text, "not_json"
        text = obj["caption"]
    return caption_problem(strip_wrappers(text), min_words, max_words)
