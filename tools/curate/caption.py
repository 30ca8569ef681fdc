"""Stage 4 — caption: two template-guided VLM captions per person crop (METHOD §9).

For each crop two different templates are drawn (seeded by the crop key), and an
OpenAI-compatible vision-language endpoint (vLLM serving Qwen2.5-VL, ...) writes a
caption in each template's structure under the rules of the prompt. Answers are
cleaned (quotes, labels, markdown); empty answers, refusals, leftover placeholders,
non-JSON (in ``--json`` mode) and over-long answers that cannot be cut at a sentence
boundary are asked again with a reminder. Transport errors (429/5xx/timeouts) are
retried with backoff by the client.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from tools.curate.net import ChatClient, ChatError, bounded_map
from tools.curate.person_filter import iter_crops
from tools.curate.store import (
    StageDir,
    StageError,
    item_rng,
    item_seed,
    iter_records,
    latest_failures,
    require_stage,
    sha1_hex,
)
from tools.curate.text import normalise, parse_caption_answer, word_count

logger = logging.getLogger(__name__)

STAGE = "caption"
SYSTEM_PROMPT = ("You are a careful annotator who writes captions of pedestrian images for text-based person "
                 "retrieval.")
CAPTION_PROMPT = (
    "Write a caption of the pedestrian in this image that follows the structure of the template below: keep its "
    "sentence pattern and replace every [placeholder] with what you actually see.\n\n"
    "<template>{template}</template>\n\n"
    "Rules:\n"
    "- Describe only the dominant pedestrian: gender when evident, hair, upper and lower clothing, footwear, bags "
    "and carried items, distinctive accessories.\n"
    "- When unsure of a colour, use a vague colour word such as dark, light or bright instead of guessing.\n"
    "- Do not mention the background, the surroundings, other people or the image quality.\n"
    "- Do not speculate about identity, age, occupation, mood or anything that is not visible.\n"
    "- Use at most {max_words} words.\n"
    "{output_rule}"
)
OUTPUT_TEXT = "- Answer with the caption only: no quotes, no labels, no markdown, no square brackets."
OUTPUT_JSON = '- Answer with a JSON object {"caption": "<the caption>"} and nothing else.'
REMINDER = "\n\nYour previous answer was not usable: {hint}. Follow the rules and answer again."
HINTS = {
    "empty": "it was empty",
    "refusal": "it declined, but describing visible clothing is harmless",
    "too_long": "it exceeded the word limit; write a shorter caption",
    "too_short": "it was too short; describe the visible attributes",
    "placeholder_left": "it kept [placeholders]; replace each with what you see",
    "not_json": 'it was not a JSON object {"caption": "..."}',
    "duplicate": "it repeated the other caption; describe the person differently",
}


class CaptionFailure(Exception):
    """A crop that could not be captioned (``reason`` for the histogram)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class CaptionSettings:
    """How captions are requested and checked (see the CLI for meanings)."""

    max_words: int = 50
    min_words: int = 5
    json_mode: bool = False
    temperature: float = 0.2
    max_tokens: int = 200
    answer_attempts: int = 3
    seed: int = 0
    workers: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise StageError(f"word limits must satisfy 1 <= --min-words ({self.min_words}) <= --max-words "
                             f"({self.max_words})")
        if self.answer_attempts < 1:
            raise StageError(f"--answer-attempts must be >= 1, got {self.answer_attempts}")


def image_data_url(data: bytes) -> str:
    """A base64 ``data:`` URL of JPEG bytes, as OpenAI / vLLM accept in an ``image_url`` part."""
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def caption_messages(template: str, data_url: str, settings: CaptionSettings, hint: str | None) -> list[dict]:
    prompt = CAPTION_PROMPT.format(template=template, max_words=settings.max_words,
                                   output_rule=OUTPUT_JSON if settings.json_mode else OUTPUT_TEXT)
    if hint:
        prompt += REMINDER.format(hint=hint)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": prompt}]}]


def ask_caption(client: ChatClient, key: str, slot: int, template: str, data_url: str,
                settings: CaptionSettings, avoid: str | None = None) -> tuple[str, list[str]]:
    """One caption of a crop in a template's structure; return it with the answer problems met on the way.

    Raises:
        CaptionFailure: every attempt gave an unusable answer, or the endpoint failed.
    """
    rng = item_rng(settings.seed, "caption", key, slot)
    problems: list[str] = []
    problem = None
    for attempt in range(settings.answer_attempts):
        messages = caption_messages(template, data_url, settings, HINTS.get(problem) if problem else None)
        try:
            raw = client.complete(messages, rng, settings.temperature, settings.max_tokens,
                                  seed=item_seed(settings.seed, key, slot, attempt), json_mode=settings.json_mode)
        except ChatError as e:
            raise CaptionFailure("vlm_error", str(e)) from e
        caption, problem = parse_caption_answer(raw, settings.json_mode, settings.min_words, settings.max_words)
        if problem is None and avoid is not None and normalise(caption) == normalise(avoid):
            problem = "duplicate"
        if problem is None:
            return caption, problems
        problems.append(problem)
    raise CaptionFailure(problem or "unusable", f"{settings.answer_attempts} unusable answers ({', '.join(problems)})")


def pick_templates(seed: int, key: str, count: int) -> list[int]:
    """Template indices for a crop: a seeded random order (first two used, the third as a fallback)."""
    return item_rng(seed, "templates", key).sample(range(count), min(count, 3))


def caption_crop(key: str, source: str, crop_path: str, rel: str, templates: Sequence[str],
                 clients: Sequence[ChatClient], settings: CaptionSettings) -> dict[str, Any]:
    """Both captions of one crop as the stage record."""
    try:
        with open(crop_path, "rb") as f:
            data_url = image_data_url(f.read())
    except OSError as e:
        raise CaptionFailure("unreadable", f"{crop_path}: {e}") from e
    order = pick_templates(settings.seed, key, len(templates))
    record: dict[str, Any] = {"key": key, "source": source, "crop": rel, "problems": []}
    first_client, second_client = clients[0], clients[-1]
    caption1, problems = ask_caption(first_client, key, 1, templates[order[0]], data_url, settings)
    record["problems"] += problems
    used = order[1]
    try:
        caption2, problems = ask_caption(second_client, key, 2, templates[used], data_url, settings, avoid=caption1)
    except CaptionFailure as e:
        if e.reason != "duplicate" or len(order) < 3:
            raise
        # The two templates produced the same caption: a third template usually breaks the tie.
        used = order[2]
        caption2, problems = ask_caption(second_client, key, 3, templates[used], data_url, settings, avoid=caption1)
    record["problems"] += problems
    record.update(caption1=caption1, caption2=caption2, template1=templates[order[0]], template2=templates[used],
                  model1=first_client.model, model2=second_client.model)
    return record


def run_caption(out: str, crops: str, templates: Sequence[str], clients: Sequence[ChatClient],
                templates_source: str = "", reviewed: bool = False, settings: CaptionSettings | None = None,
                limit: int = 0, retry_failed: bool = False, shard_size: int = 10000,
                fsync: bool = False) -> dict[str, Any]:
    """Run (or resume) the caption stage over a filter folder; return its statistics.

    Args:
        out: stage output folder.
        crops: the filter stage's output folder.
        templates: template texts (at least 2).
        clients: one VLM client (both captions) or two (caption1, caption2).
        templates_source: where the templates came from (recorded in the manifest).
        reviewed: whether the templates went through the manual review.
        settings: request and answer settings.
        limit: caption at most this many new crops (0 = all).
        retry_failed: retry crops that failed in an earlier run.
        shard_size: records per JSONL shard.
        fsync: fsync records.
    """
    settings = settings or CaptionSettings()
    require_stage(crops, "filter", "--crops")
    if len(templates) < 2:
        raise StageError("captioning needs at least 2 templates")
    if not 1 <= len(clients) <= 2:
        raise StageError(f"give --vlm-model once or twice, got {len(clients)}")
    if not reviewed:
        logger.warning("captioning with templates that were not reviewed; edit templates_review.txt and pass "
                       "--reviewed to use the reviewed list")
    params = {"models": [c.model for c in clients], "templates": sha1_hex("\n".join(templates)),
              "max_words": settings.max_words, "min_words": settings.min_words, "json_mode": settings.json_mode,
              "temperature": settings.temperature, "max_tokens": settings.max_tokens, "seed": settings.seed}
    inputs = {"crops": os.path.abspath(crops), "templates": templates_source and os.path.abspath(templates_source),
              "reviewed": reviewed}
    with StageDir(out, STAGE, params, inputs, shard_size, fsync) as stage:
        done = stage.done(retry_failed)
        todo = []
        for key, source, rel in iter_crops(crops):
            if key not in done:
                todo.append((key, source, rel))
            if limit and len(todo) >= limit:
                break

        def work(item: tuple[str, str, str]) -> dict[str, Any]:
            key, source, rel = item
            return caption_crop(key, source, os.path.join(crops, rel), rel, templates, clients, settings)

        failed = 0
        for (key, source, _), result in bounded_map(work, todo, settings.workers):
            if isinstance(result, CaptionFailure):
                stage.fail(key, result.reason, result.detail, source=source)
                failed += 1
            elif isinstance(result, BaseException):
                raise result
            else:
                stage.records.append(result)
        logger.info("caption: %d crops captioned, %d failed in this run", len(todo) - failed, failed)
        stats = caption_stats(stage.out)
        stage.write_stats(stats)
    return stats


def caption_stats(folder: str) -> dict[str, Any]:
    """Statistics of a caption folder, recomputed from its records."""
    keys, lengths = [], []
    problems: collections.Counter[str] = collections.Counter()
    for record in iter_records(folder):
        keys.append(record["key"])
        lengths += [word_count(record["caption1"]), word_count(record["caption2"])]
        problems.update(record.get("problems", []))
    failures = latest_failures(folder, keys)
    return {"stage": STAGE, "images": len(keys), "captions": len(lengths),
            "mean_words": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
            "answer_problems_fixed": dict(sorted(problems.items())), "failed": len(failures),
            "failure_reasons": dict(sorted(collections.Counter(f["reason"] for f in failures.values()).items()))}
