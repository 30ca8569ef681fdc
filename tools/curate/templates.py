"""Stage 3 — templates: benchmark captions -> attribute templates (METHOD §9).

1. Read training captions (CUHK-PEDES ``reid_raw.json``, ICFG-PEDES ``ICFG-PEDES.json``,
   RSTPReid ``data_captions.json`` or a text file with one caption per line).
2. Ask an LLM (OpenAI-compatible endpoint) to turn each caption into a template with
   placeholders such as ``[colored top]``; validate the answers (one record per caption).
3. Embed the unique valid templates and cluster them (seeded k-means++); the template
   nearest each centroid plus up to N random members seed the LLM, which writes more
   in the same style (one record per cluster, keyed by its seed texts).
4. Write ``templates.jsonl`` (``reviewed: false``) and ``templates_review.txt`` for the
   manual pass; ``caption --reviewed FILE`` then uses only the reviewed list.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tools.curate.embed import Embedder, kmeans
from tools.curate.net import ChatClient, ChatError, bounded_map
from tools.curate.store import (
    RecordStore,
    StageDir,
    StageError,
    atomic_write_bytes,
    item_rng,
    item_seed,
    iter_records,
    latest_failures,
    sha1_hex,
)
from tools.curate.text import (
    DEFAULT_STOP_WORDS,
    PLACEHOLDER,
    normalise,
    placeholders,
    template_lines,
    template_problem,
)

logger = logging.getLogger(__name__)

STAGE = "templates"
TEMPLATES_FILE = "templates.jsonl"
REVIEW_FILE = "templates_review.txt"
SYNTH_PREFIX = "synth"
#: Answer problems worth asking again (with a reminder); content problems are final.
RETRY_PROBLEMS = ("empty", "refusal", "malformed_placeholder")

SYSTEM_PROMPT = "You turn descriptions of pedestrians into reusable attribute templates for image captioning."
EXTRACT_PROMPT = (
    "Rewrite the pedestrian description below as a template. Keep its sentence structure and wording, but "
    "replace every concrete attribute value (colours, garments, hairstyles, footwear, bags, accessories, carried "
    "objects) by a short placeholder in square brackets that names the attribute type, for example "
    "[colored top], [colored bottom], [hairstyle], [footwear], [bag], [accessory]. No colour word or specific "
    "garment name may remain outside the brackets. Answer with the template only, on one line, without quotes "
    "or explanations.\n\n<caption>{caption}</caption>"
)
SYNTH_PROMPT = (
    "Below are attribute templates that describe a pedestrian; each [placeholder] stands for an attribute "
    "value.\n\n<examples>\n{examples}\n</examples>\n\nWrite {n} new templates in the same style: the same kinds "
    "of bracketed placeholders (at least two per template), varied sentence structure, attribute order and "
    "wording, at most {max_words} words each, and no concrete colours, garments or hairstyles outside the "
    "brackets. Answer with one template per line and nothing else."
)
REMINDER = "\n\nYour previous answer was not usable ({problem}). Follow the instructions exactly."


@dataclasses.dataclass(frozen=True)
class TemplateRules:
    """Validation of LLM-written templates.

    Args:
        stop_words: words that must not remain outside placeholders.
        min_placeholders: placeholders a template needs.
        min_words: shortest template (words).
        max_words: longest template (words).
    """

    stop_words: frozenset[str] = DEFAULT_STOP_WORDS
    min_placeholders: int = 2
    min_words: int = 5
    max_words: int = 60

    def problem(self, text: str) -> str | None:
        return template_problem(text, self.stop_words, self.min_placeholders, self.min_words, self.max_words)


def read_stop_words(path: str) -> frozenset[str]:
    """One word per line; ``#`` starts a comment."""
    if not os.path.isfile(path):
        raise StageError(f"--stop-words {path}: file not found")
    with open(path, encoding="utf-8") as f:
        words = {line.split("#", 1)[0].strip().lower() for line in f}
    words.discard("")
    if not words:
        raise StageError(f"--stop-words {path}: no words found (one word per line)")
    return frozenset(words)


# --------------------------------------------------------------------------- caption sources


def read_captions(path: str, split: str = "train") -> list[str]:
    """Captions of one benchmark annotation file or a plain text file.

    JSON files are lists of image records with ``captions`` and ``split`` (the CUHK-PEDES,
    ICFG-PEDES and RSTPReid layout, see docs/data.md); only records of ``split`` are
    used (``all`` for every record). A ``.txt`` file holds one caption per line.
    """
    if not os.path.isfile(path):
        raise StageError(f"--captions {path}: file not found")
    if not path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise StageError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise StageError(f"{path}: expected a JSON list of image records with 'captions' and 'split' "
                         f"(CUHK-PEDES / ICFG-PEDES / RSTPReid layout), got {type(data).__name__}")
    captions = []
    for index, record in enumerate(data):
        if not isinstance(record, dict) or not isinstance(record.get("captions"), list):
            raise StageError(f"{path} record {index}: expected an object with a 'captions' list")
        if split != "all" and record.get("split") != split:
            continue
        for caption in record["captions"]:
            if not isinstance(caption, str):
                raise StageError(f"{path} record {index}: captions must be strings, got {type(caption).__name__}")
            if caption.strip():
                captions.append(" ".join(caption.split()))
    return captions


def select_captions(paths: Sequence[str], split: str, max_captions: int, seed: int) -> list[tuple[str, str]]:
    """Unique captions as ``(key, caption)``; a seeded subset when ``max_captions`` is set."""
    unique: dict[str, str] = {}
    for path in paths:
        for caption in read_captions(path, split):
            unique.setdefault(sha1_hex(normalise(caption)), caption)
    if not unique:
        raise StageError(f"no captions found in {', '.join(paths)} (split {split!r})")
    keys = sorted(unique, key=lambda k: sha1_hex(f"{seed}:{k}"))
    if max_captions:
        keys = keys[:max_captions]
    return [(k, unique[k]) for k in keys]


# --------------------------------------------------------------------------- LLM calls


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]


def _pick_template(answer: str) -> str:
    lines = template_lines(answer)
    with_placeholders = [line for line in lines if PLACEHOLDER.search(line)]
    return (with_placeholders or lines or [""])[0]


@dataclasses.dataclass(frozen=True)
class LLMSettings:
    """How the LLM is asked (see the CLI for meanings)."""

    temperature: float = 0.0
    max_tokens: int = 512
    answer_attempts: int = 3
    seed: int = 0
    workers: int = 8


def extract_template(llm: ChatClient, key: str, caption: str, rules: TemplateRules,
                     settings: LLMSettings) -> dict[str, Any]:
    """Ask for the template of one caption; return the record (``template`` None when rejected)."""
    rng = item_rng(settings.seed, "extract", key)
    prompt = EXTRACT_PROMPT.format(caption=caption)
    problem = None
    problems = []
    text = ""
    for attempt in range(settings.answer_attempts):
        content = prompt + (REMINDER.format(problem=problem) if problem else "")
        answer = llm.complete(_user(content), rng, settings.temperature, settings.max_tokens,
                              seed=item_seed(settings.seed, "extract", key, attempt))
        text = _pick_template(answer)
        problem = rules.problem(text)
        if problem is None:
            break
        problems.append(problem)
        if problem not in RETRY_PROBLEMS:
            break
    return {"key": key, "caption": caption, "template": text if problem is None else None, "reason": problem,
            "rejected_answer": text if problem is not None else None, "problems": problems}


def synthesise(llm: ChatClient, key: str, seeds: list[str], n: int, rules: TemplateRules,
               settings: LLMSettings) -> tuple[list[str], dict[str, int]]:
    """Ask for ``n`` new templates in the style of ``seeds``; return the valid ones and rejection counts."""
    rng = item_rng(settings.seed, "synth", key)
    prompt = SYNTH_PROMPT.format(examples="\n".join(f"- {s}" for s in seeds), n=n, max_words=rules.max_words)
    valid: list[str] = []
    rejected: collections.Counter[str] = collections.Counter()
    for attempt in range(settings.answer_attempts):
        answer = llm.complete(_user(prompt), rng, settings.temperature, settings.max_tokens * 4,
                              seed=item_seed(settings.seed, "synth", key, attempt))
        seen = {normalise(t) for t in seeds} | {normalise(t) for t in valid}
        for line in template_lines(answer):
            problem = rules.problem(line)
            if problem is None and normalise(line) in seen:
                problem = "duplicate"
            if problem is None:
                valid.append(line)
                seen.add(normalise(line))
            else:
                rejected[problem] += 1
        if valid:
            break
        rejected["empty_answer" if not answer.strip() else "no_valid_template"] += 1
    return valid, dict(rejected)


# --------------------------------------------------------------------------- clustering


@dataclasses.dataclass(frozen=True)
class Cluster:
    index: int
    members: list[str]
    seeds: list[str]

    @property
    def key(self) -> str:
        return sha1_hex("\n".join(self.seeds))


def cluster_templates(templates: list[str], embedder: Embedder, clusters: int, seeds_per_cluster: int,
                      seed: int) -> list[Cluster]:
    """K-means over template embeddings; per cluster the template nearest the centroid + random members.

    ``templates`` must be in a deterministic order (the stage sorts them) so the result is reproducible.
    """
    vectors = np.asarray(embedder(templates), dtype=np.float64)
    if vectors.shape[0] != len(templates):
        raise StageError(f"the embedder returned {vectors.shape[0]} vectors for {len(templates)} templates")
    centers, labels = kmeans(vectors, clusters, seed=seed)
    out = []
    for c in range(len(centers)):
        members = np.flatnonzero(labels == c)
        distances = ((vectors[members] - centers[c]) ** 2).sum(1)
        nearest = int(members[int(np.argmin(distances))])
        others = [int(m) for m in members if m != nearest]
        rng = item_rng(seed, "cluster-seeds", templates[nearest])
        picked = rng.sample(others, min(seeds_per_cluster, len(others)))
        out.append(Cluster(c, [templates[m] for m in members], [templates[nearest]] + [templates[m] for m in picked]))
    return out


# --------------------------------------------------------------------------- stage


def run_templates(out: str, caption_files: Sequence[str], llm: ChatClient, embedder: Embedder,
                  embedder_name: str = "hash", split: str = "train", max_captions: int = 0, clusters: int = 50,
                  seeds_per_cluster: int = 5, synth_per_cluster: int = 20, rules: TemplateRules | None = None,
                  settings: LLMSettings | None = None, shard_size: int = 10000, fsync: bool = False) -> dict[str, Any]:
    """Run (or resume) the templates stage; return its statistics.

    Args:
        out: stage output folder.
        caption_files: benchmark annotation files or caption text files.
        llm: chat client of the template-writing LLM.
        embedder: text embedding function for clustering.
        embedder_name: recorded in the statistics.
        split: benchmark split whose captions are used (``all`` for every split).
        max_captions: use a seeded subset of this many unique captions (0 = all).
        clusters: k of k-means.
        seeds_per_cluster: random members added to the nearest-to-centroid seed.
        synth_per_cluster: new templates asked for per cluster.
        rules: template validation.
        settings: LLM request settings.
        shard_size: records per JSONL shard.
        fsync: fsync records and files.
    """
    rules = rules or TemplateRules()
    settings = settings or LLMSettings()
    if clusters < 1:
        raise StageError(f"--clusters must be >= 1, got {clusters}")
    captions = select_captions(caption_files, split, max_captions, settings.seed)
    params = {"llm_model": llm.model, "split": split, "max_captions": max_captions, "seed": settings.seed,
              "temperature": settings.temperature, "stop_words": sha1_hex("\n".join(sorted(rules.stop_words))),
              "min_placeholders": rules.min_placeholders, "min_words": rules.min_words, "max_words": rules.max_words}
    inputs = {"captions": [os.path.abspath(p) for p in caption_files]}
    with StageDir(out, STAGE, params, inputs, shard_size, fsync) as stage:
        done = stage.done(retry_failed=True)
        todo = [(k, c) for k, c in captions if k not in done]
        for (key, _), result in bounded_map(lambda kc: extract_template(llm, kc[0], kc[1], rules, settings),
                                            todo, settings.workers):
            if isinstance(result, ChatError):
                stage.fail(key, "llm_error", str(result))
            elif isinstance(result, BaseException):
                raise result
            else:
                stage.records.append(result)
        wanted = {k for k, _ in captions}
        extracted = sorted({normalise(r["template"]): r["template"] for r in iter_records(stage.out)
                            if r["template"] and r["key"] in wanted}.items())
        unique = [text for _, text in extracted]
        if not unique:
            raise StageError(f"no valid template was extracted from {len(captions)} captions; see "
                             f"{stage.path('part-00000.jsonl')} for the rejected answers")
        groups = cluster_templates(unique, embedder, clusters, seeds_per_cluster, settings.seed)
        synth_store = RecordStore(stage.out, SYNTH_PREFIX, 0, fsync=fsync)
        try:
            pending = [g for g in groups if g.key not in synth_store]
            for group, result in bounded_map(
                    lambda g: synthesise(llm, g.key, g.seeds, synth_per_cluster, rules, settings),
                    pending, settings.workers):
                if isinstance(result, ChatError):
                    stage.fail(group.key, "llm_error", str(result), cluster=group.index)
                elif isinstance(result, BaseException):
                    raise result
                else:
                    valid, rejected = result
                    synth_store.append({"key": group.key, "cluster": group.index, "seeds": group.seeds,
                                        "templates": valid, "rejected": rejected})
        finally:
            synth_store.close()
        synthesised = {r["key"]: r for r in iter_records(stage.out, SYNTH_PREFIX)}
        final = _final_templates(groups, synthesised)
        _write_outputs(stage, final)
        stats = templates_stats(stage.out, captions, unique, groups, synthesised, final, embedder_name)
        stage.write_stats(stats)
    return stats


def _final_templates(groups: list[Cluster], synthesised: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    final: list[dict[str, Any]] = []
    seen: set[str] = set()
    for group in groups:
        candidates = [(t, "benchmark") for t in group.seeds]
        candidates += [(t, "synthesised") for t in synthesised.get(group.key, {}).get("templates", [])]
        for text, source in candidates:
            norm = normalise(text)
            if norm in seen:
                continue
            seen.add(norm)
            final.append({"id": f"t{len(final):05d}", "text": text, "source": source, "cluster": group.index,
                          "reviewed": False})
    return final


def _write_outputs(stage: StageDir, final: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(t, sort_keys=True, ensure_ascii=False) + "\n" for t in final)
    atomic_write_bytes(stage.path(TEMPLATES_FILE), lines.encode("utf-8"), stage.tmp, stage.fsync)
    review = [f"# {len(final)} attribute templates for review (GA-DMS curation).",
              "# Delete the lines of biased or unusable templates and fix wording freely; keep the [placeholders].",
              "# Lines starting with '#' and blank lines are ignored. Then run the caption stage with",
              f"#   --reviewed {stage.path(REVIEW_FILE)}"]
    review += [t["text"] for t in final]
    atomic_write_bytes(stage.path(REVIEW_FILE), ("\n".join(review) + "\n").encode("utf-8"), stage.tmp, stage.fsync)


def templates_stats(folder: str, captions: list[tuple[str, str]], unique: list[str], groups: list[Cluster],
                    synthesised: dict[str, dict[str, Any]], final: list[dict[str, Any]],
                    embedder_name: str) -> dict[str, Any]:
    wanted = {k for k, _ in captions}
    records = [r for r in iter_records(folder) if r["key"] in wanted]
    reasons = collections.Counter(r["reason"] for r in records if r["reason"])
    answer_problems = collections.Counter(p for r in records for p in r.get("problems", []))
    synth_rejected: collections.Counter[str] = collections.Counter()
    for r in synthesised.values():
        synth_rejected.update(r["rejected"])
    failures = latest_failures(folder, [r["key"] for r in records] + list(synthesised))
    return {"stage": STAGE, "captions": len(captions), "extracted": sum(1 for r in records if r["template"]),
            "rejections": dict(sorted(reasons.items())), "answer_problems": dict(sorted(answer_problems.items())),
            "unique_extracted": len(unique), "embedder": embedder_name, "clusters": len(groups),
            "seeds": sum(len(g.seeds) for g in groups),
            "synthesised": sum(len(r["templates"]) for r in synthesised.values()),
            "synthesis_rejections": dict(sorted(synth_rejected.items())),
            "templates": len(final), "failed": len(failures),
            "failure_reasons": dict(sorted(collections.Counter(f["reason"] for f in failures.values()).items()))}


# --------------------------------------------------------------------------- loading for later stages


def load_templates(path: str) -> tuple[list[str], bool]:
    """Templates for captioning: ``(texts, reviewed)``.

    ``path`` is a templates stage folder or its ``templates.jsonl`` (not reviewed), or a review text
    file (reviewed: one template per line, ``#`` comments).
    """
    if os.path.isdir(path):
        path = os.path.join(path, TEMPLATES_FILE)
    if not os.path.isfile(path):
        raise StageError(f"templates file {path} not found (run the templates stage, or pass --reviewed FILE)")
    texts: list[str] = []
    reviewed = not path.endswith(".jsonl")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if reviewed:
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
            else:
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise StageError(f"{path} line {number}: expected a JSON object with 'text' ({e})") from e
            if text.count("[") != text.count("]") or not placeholders(text):
                raise StageError(f"{path} line {number}: {text!r} is not a template (it needs [placeholders] "
                                 "with balanced brackets)")
            texts.append(" ".join(text.split()))
    unique = list(dict.fromkeys(texts))
    if len(unique) < 2:
        raise StageError(f"{path}: {len(unique)} template(s); captioning needs at least 2 (two captions per image "
                         "use different templates)")
    return unique, reviewed
