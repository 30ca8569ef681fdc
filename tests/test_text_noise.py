"""Query corruptions (datasets/text_noise.py): rates, word classes, typos, clauses, punctuation, determinism.

Every kind is checked against an independent reading of its output (the words
left, replaced or inserted, found by comparing word lists), not against the
counts the library reports about itself.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from datasets import synthetic
from datasets.text_noise import (
    DEFAULT_VOCABULARY,
    NOISE_KINDS,
    corrupt_caption,
    corrupt_captions,
    load_vocabulary,
    split_words,
)

VOCAB = load_vocabulary()

#: Captions in the styles of the benchmarks (written for this test): capitals and full stops,
#: spaced punctuation, semicolons, all capitals, apostrophes and hyphens, all lower case.
CAPTIONS = [
    "A woman with long black hair is wearing a white shirt with black stripes, black pants and black shoes. "
    "She is carrying a black bag.",
    "the man is wearing a blue jacket , grey trousers and white sneakers . he has a backpack on his back",
    "This young man wears glasses, a navy hoodie and khaki shorts; he holds an umbrella in his right hand.",
    "A PERSON IN A RED COAT WITH A YELLOW HAT AND BROWN BOOTS.",
    "The woman's t-shirt is pink, her jeans are light blue and her sandals are white.",
    "a girl in a green dress and a white cardigan walks with a red handbag over her shoulder",
    "He wears a grey jumper (with a hood), black jeans and red trainers. He is holding a phone.",
]
RATES = (0.1, 0.2, 0.3, 0.5, 0.8)


def words(text: str) -> list[str]:
    return split_words(text)[0]


def is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(any(w == x for x in it) for w in short)


def expected(rate: float, n: int) -> int:
    return int(rate * n + 0.5)


# Punctuation a corruption must not create (it may keep what the caption already had).
BAD_PATTERNS = [r"[,;:]\s*[,;:.!?]", r"\.\s*[,;:]", r"\s[,;:.!?](?!.*\s[,;:.!?])", r"^\s*[,;:.!?]", r"\S\s{2,}\S",
                r"\(\s*\)", r"[,;:]\s*$", r"\w[.!?]\w"]


def assert_sane(clean: str, noisy: str) -> None:
    assert words(noisy), f"{clean!r} lost every word"
    for pattern in BAD_PATTERNS:
        if not re.search(pattern, clean):
            assert not re.search(pattern, noisy), f"{pattern!r} in {noisy!r} (from {clean!r})"
    if clean.rstrip()[-1:] in ".!?":
        assert noisy.rstrip()[-1:] in ".!?", noisy
    if clean[:1].isupper():
        assert noisy[:1].isupper(), noisy


# --------------------------------------------------------------------------- the word list


def test_shipped_word_list_is_valid_and_covers_the_synthetic_vocabulary():
    data = json.loads(DEFAULT_VOCABULARY.read_text())
    assert set(data["clauses"]) == {"background", "other_people", "image_quality", "speculation"}
    classes = {VOCAB.word_class(w) for group in data["swap_classes"].values() for entry in group for w in entry}
    assert None not in classes and len(classes) == len(data["swap_classes"])
    # The synthetic corpus's colour words are colours here; its garment and bag nouns are swappable.
    for _, names in synthetic.PALETTE.values():
        for name in names:
            assert VOCAB.word_class(name) == "colour", name
    for noun in ("jacket", "coat", "vest", "dress", "jeans", "shorts", "skirt", "trousers", "pants", "backpack",
                 "handbag", "purse", "rucksack", "cap", "beanie", "shoes", "sneakers", "trainers", "sweater"):
        assert VOCAB.word_class(noun) is not None, noun
    # Grammatical number is kept within a class: a swap never turns "shoes" into "boot".
    assert VOCAB.word_class("shoes") == VOCAB.word_class("boots") != VOCAB.word_class("umbrella")


def test_word_list_errors_name_the_file_and_entry(tmp_path):
    data = json.loads(DEFAULT_VOCABULARY.read_text())
    cases = [
        (lambda d: d["swap_classes"]["bag"].append(["red"]), "'red' is in swap_classes.colour and swap_classes.bag"),
        (lambda d: d["swap_classes"]["bag"].append(["Tote bag"]), "is not one lower-case word"),
        (lambda d: d["swap_classes"].update(solo=[["x"]]), "needs two values or more"),
        (lambda d: d.update(clauses=[]), "clauses must be a non-empty list"),
        (lambda d: d["keyboard"].update(a="a1"), "keyboard entry 'a'"),
        (lambda d: d.update(mix_weights={"drop": 0}), "gives every entry weight 0"),
        (lambda d: d.pop("pronouns"), "missing keys ['pronouns']"),
    ]
    for change, message in cases:
        broken = json.loads(json.dumps(data))
        change(broken)
        path = tmp_path / "words.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            load_vocabulary(path)
        assert str(err.value).startswith(str(path))
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_vocabulary(path)


# --------------------------------------------------------------------------- the kinds


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_rate_zero_is_the_identity(kind):
    for i, caption in enumerate([*CAPTIONS, "", "...", "A man."]):
        noisy = corrupt_caption(caption, kind, 0.0, seed=5, index=i)
        assert (noisy.text, noisy.changed) == (caption, 0)
        assert noisy.words == len(words(caption))


def test_drop_deletes_the_rate_of_words_and_keeps_one():
    for seed in range(4):
        for i, caption in enumerate(CAPTIONS):
            clean = words(caption)
            for rate in (*RATES, 1.0):
                noisy = corrupt_caption(caption, "drop", rate, seed=seed, index=i)
                left = [w.lower() for w in words(noisy.text)]
                k = min(expected(rate, len(clean)), len(clean) - 1)
                assert len(left) == len(clean) - k == len(clean) - noisy.changed
                assert is_subsequence(left, [w.lower() for w in clean])
                assert_sane(caption, noisy.text)
    assert corrupt_caption("Pedestrian.", "drop", 1.0).text == "Pedestrian."


def test_swap_replaces_attribute_words_within_their_class():
    swapped = 0
    for seed in range(4):
        for i, caption in enumerate(CAPTIONS):
            clean = words(caption)
            swappable = sum(VOCAB.word_class(w) is not None for w in clean)
            for rate in RATES:
                noisy = corrupt_caption(caption, "swap", rate, seed=seed, index=i)
                new = words(noisy.text)
                assert len(new) == len(clean)
                diff = [(a, b) for a, b in zip(clean, new) if a != b and a.lower() not in ("a", "an")]
                assert len(diff) == noisy.changed == min(expected(rate, len(clean)), swappable)
                for a, b in diff:
                    assert VOCAB.word_class(b) == VOCAB.word_class(a) is not None, (a, b)
                    assert not VOCAB.same_value(a, b), (a, b)  # "grey" -> "gray" is no corruption
                    assert b == (b.upper() if a.isupper() and len(a) > 1 else b), (a, b)  # case kept
                for j, (a, b) in enumerate(zip(clean, new)):
                    if a != b and a.lower() in ("a", "an"):  # articles agree with the new word
                        assert b.lower() == ("an" if new[j + 1][0].lower() in "aeio" else "a"), noisy.text
                swapped += len(diff)
                assert_sane(caption, noisy.text)
    assert swapped > 100
    # A caption without attribute words is left as it is.
    assert corrupt_caption("A person walks along the street.", "swap", 0.5).changed == 0


def _one_typo_apart(a: str, b: str) -> bool:
    """b is a with one letter substituted, deleted, inserted or two neighbours transposed (any case)."""
    a, b = a.lower(), b.lower()
    if len(a) == len(b):
        diff = [j for j in range(len(a)) if a[j] != b[j]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return len(long) == len(short) + 1 and any(long[:j] + long[j + 1:] == short for j in range(len(long)))


def test_typos_change_characters_inside_the_words():
    for seed in range(4):
        for i, caption in enumerate(CAPTIONS):
            clean, seps = split_words(caption)
            for rate in RATES:
                noisy = corrupt_caption(caption, "typo", rate, seed=seed, index=i)
                new, new_seps = split_words(noisy.text)
                assert new_seps == seps  # punctuation, hyphens and apostrophes untouched
                diff = [(a, b) for a, b in zip(clean, new) if a != b]
                assert len(new) == len(clean) and len(diff) == noisy.changed == expected(rate, len(clean))
                for a, b in diff:
                    assert _one_typo_apart(a, b), (a, b)
                    assert a.count("-") == b.count("-") and a.count("'") == b.count("'")
                    assert b[:1].isupper() == a[:1].isupper(), (a, b)


def test_clauses_insert_template_sentences_of_the_rate():
    vocab_clauses = {c.replace("{pron}", p) for c in VOCAB.clauses for p in ("he", "she", "the person")}
    shortest = min(len(words(c)) for c in vocab_clauses)
    for seed in range(4):
        for i, caption in enumerate(CAPTIONS):
            clean = words(caption)
            for rate in RATES:
                noisy = corrupt_caption(caption, "clause", rate, seed=seed, index=i)
                new = words(noisy.text)
                assert len(new) - len(clean) == noisy.changed
                assert abs(noisy.changed - expected(rate, len(clean))) <= shortest / 2
                assert is_subsequence(clean, new)
                # Every sentence is either the caption's own text or a template.
                added = [s.strip() for s in re.split(r"(?<=[.!?])\s+", noisy.text)]
                own = [s.strip() for s in re.split(r"(?<=[.!?])\s+", caption)]
                inserted = [s for s in added if s not in own and s.rstrip(".") not in caption]
                assert all(s.rstrip(".").lower() in vocab_clauses for s in inserted), noisy.text
                assert sum(len(words(s)) for s in inserted) == noisy.changed
                assert_sane(caption, noisy.text)


def test_clauses_follow_the_caption_pronoun_and_case():
    def added(caption: str, seed: int) -> str:
        """The corrupted caption, lower case and padded (the clean ones use no pronoun)."""
        return f" {' '.join(words(corrupt_caption(caption, 'clause', 1.0, seed=seed).text)).lower()} "

    said = set()
    for seed in range(8):
        man = added("A man in a red shirt and blue jeans walks to the left.", seed)
        woman = added("A woman in a red shirt and blue jeans walks to the left.", seed)
        person = added("A pedestrian in a red shirt and blue jeans walks to the left.", seed)
        assert " she " not in man and " he " not in woman and " he " not in person and " she " not in person
        said.update(p for p in ("he", "she", "the person") if f" {p} " in {"he": man, "she": woman}.get(p, person))
    assert said == {"he", "she", "the person"}  # each pronoun was used
    lower = "a person in a red shirt and blue jeans walks to the left"
    upper = "A PERSON IN A RED SHIRT AND BLUE JEANS WALKS TO THE LEFT"
    for seed in range(4):
        assert not any(c.isupper() for c in corrupt_caption(lower, "clause", 0.5, seed=seed).text)
        assert not any(c.islower() for c in corrupt_caption(upper, "clause", 0.5, seed=seed).text)
    # A caption without a full stop gets one before the sentence added after it.
    text = corrupt_caption(lower, "clause", 0.5, seed=0).text
    assert lower + ". " in text or text.endswith(lower), text


def test_mix_corrupts_the_rate_of_words_with_several_kinds():
    kinds_seen = set()
    for seed in range(6):
        for i, caption in enumerate(CAPTIONS):
            n = len(words(caption))
            for rate in RATES:
                noisy = corrupt_caption(caption, "mix", rate, seed=seed, index=i)
                # Clause words are inserted whole, so they may overshoot by less than a clause.
                assert expected(rate, n) - 1 <= noisy.changed <= expected(rate, n) + 8
                assert_sane(caption, noisy.text)
                new = words(noisy.text)
                if len(new) < n:
                    kinds_seen.add("drop")
                if any(w.lower() in {c.split()[-1] for c in VOCAB.clauses} for w in new[n:]):
                    kinds_seen.add("clause")
                if any(VOCAB.word_class(w) and w not in caption for w in new):
                    kinds_seen.add("swap")
                if any(not VOCAB.word_class(w) and w not in caption for w in new):
                    kinds_seen.add("typo")
    assert kinds_seen == {"drop", "clause", "swap", "typo"}


# --------------------------------------------------------------------------- determinism and errors


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_deterministic_per_seed_and_index_whatever_the_order(kind):
    batch = corrupt_captions(CAPTIONS, kind, 0.3, seed=11)
    order = list(range(len(CAPTIONS)))
    random.Random(0).shuffle(order)
    one_by_one = {i: corrupt_caption(CAPTIONS[i], kind, 0.3, seed=11, index=i) for i in order}
    assert [one_by_one[i] for i in range(len(CAPTIONS))] == batch
    assert corrupt_captions(CAPTIONS, kind, 0.3, seed=11) == batch
    assert corrupt_captions(CAPTIONS, kind, 0.3, seed=12) != batch
    # The index is part of the draw: the same caption at another index is corrupted differently.
    same = [corrupt_caption(CAPTIONS[0], kind, 0.3, seed=11, index=i).text for i in range(8)]
    assert len(set(same)) > 1


def test_higher_rates_drop_a_superset_of_words():
    caption = CAPTIONS[0]
    clean = words(caption)
    kept = [Counter(w.lower() for w in words(corrupt_caption(caption, "drop", r, seed=4, index=2).text))
            for r in (0.1, 0.3, 0.5)]
    assert kept[0] >= kept[1] >= kept[2] and kept[2].total() < len(clean)


def test_bad_kind_or_rate_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown noise kind 'shuffle'; valid kinds: drop, swap, clause, typo, mix"):
        corrupt_caption("a man", "shuffle", 0.1)
    for rate in (-0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="noise rate must be a number in"):
            corrupt_captions(["a man"], "drop", rate)
