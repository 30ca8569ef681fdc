"""Tokenizer: parity with open_clip, IRRA special ids, the displaced word, errors."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from model.tokenizer import Tokenizer, clean_text, cleans_to_empty

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

DISPLACED_WORD = "jekyll"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def reference() -> open_clip_tokenizer.SimpleTokenizer:
    return open_clip_tokenizer.SimpleTokenizer()


def make_corpus(n: int = 240, seed: int = 0) -> list[str]:
    """Varied pedestrian captions covering the cleaning and pre-tokenisation paths."""
    rng = random.Random(seed)
    subjects = [
        "A woman",
        "The man",
        "a young GIRL",
        "An elderly gentleman",
        "this person",
        "A boy",
        "the pedestrian",
        "Une femme",
        "a teenager",
        "She",
    ]
    colours = [
        "red",
        "dark-blue",
        "light grey",
        "black/white",
        "beige",
        "navy",
        "off‑white",
        "pinkish",
        "khaki",
        "multi-coloured",
    ]
    items = [
        "T-shirt",
        "jacket",
        "coat",
        "jeans",
        "shorts",
        "skirt",
        "backpack",
        "sneakers",
        "hat",
        "scarf",
        "umbrella",
        "hand-bag",
        "sunglasses",
        "high heels",
    ]
    extras = [
        "",
        " and is walking towards the camera.",
        ", carrying a phone!",
        "; she's holding a cup.",
        " -- he'll probably cross the street...",
        " (with 2 straps)",
        " &amp; black boots",
        " &quot;Nike&quot; logo",
        " <b>&amp;amp; double-escaped</b> &amp;lt;3",
        " &lt;b&gt;bold&lt;/b&gt;",
        " &#39;cool&#39; look",
        " 👕🎒",
        " 😀!!",
        " 穿着红色衬衫的女人",
        " 背着黑色的包",
        " リュックサック",
        " 가방을 메고",
        " café crème naïve façade",
        " Ça va? Ñandú São Paulo",
        " Größe 42, Straße",
        " size 10.5 shoes",
        " in 1990s style",
        " at 3:45pm",
        " #42 jersey",
        " $19.99 price tag",
        " wow!? ok",
        " ... ?!",
        " don't know, they've been, I'm here, we're gone, you'd see",
        " cafÃ© mojibake",
        "\t\twith\n\nnewlines   and   spaces ",
        " ½ ¾ ² ℃ ™ ©",
        " \u00a0non-breaking\u00a0space",
        " ALL CAPS WORDS",
        " e-mail: someone@example.com",
        " http://www.example.com/path?q=1&x=2",
        " ∑ √ ∞ ≈",
        " ＦＵＬＬＷＩＤＴＨ letters",
        " ‘curly’ “quotes”",
        " Ω ω α β γ",
        " 1 2 3 4 5 6 7 8 9 0",
    ]
    corpus = []
    for i in range(n):
        parts = [
            rng.choice(subjects),
            rng.choice(["wears", "is wearing", "has on", "with"]),
            "a",
            rng.choice(colours),
            rng.choice(items),
        ]
        for _ in range(rng.randint(0, 3)):
            parts.append(rng.choice(extras))
        caption = " ".join(parts)
        if i % 7 == 0:
            caption = "  " + caption.upper() + "   "
        if i % 11 == 0:
            # Long enough to need truncation at 77 tokens.
            caption = " ".join([caption] * rng.randint(3, 6))
        corpus.append(caption)
    corpus += [extra.strip() for extra in extras if extra.strip()]
    return corpus


CORPUS = make_corpus()


def test_corpus_is_varied_and_avoids_the_displaced_word() -> None:
    assert len(CORPUS) >= 200
    assert not any(DISPLACED_WORD in c.lower() for c in CORPUS)
    lengths = [len(c) for c in CORPUS]
    assert max(lengths) > 400


def test_special_ids_and_attributes(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.mask_id, tok.sot_id, tok.eot_id) == (0, 49405, 49406, 49407)
    assert tok.vocab_size == 49408 == len(tok.decoder) == len(tok.encoder)
    assert (tok.first_ordinary_id, tok.last_ordinary_id) == (1, 49404)
    assert tok.encoder["<|mask|>"] == 49405
    assert tok.encoder["<|startoftext|>"] == 49406
    assert tok.encoder["<|endoftext|>"] == 49407
    assert tok.dropped_token == DISPLACED_WORD + "</w>"
    assert tok.dropped_token not in tok.encoder


def test_every_ordinary_id_equals_openai(tok: Tokenizer, reference) -> None:
    for i in range(tok.last_ordinary_id + 1):
        assert tok.decoder[i] == reference.decoder[i], i
    # The slot we reuse for the mask held the displaced word in OpenAI's vocabulary.
    assert reference.decoder[tok.mask_id] == tok.dropped_token
    assert reference.sot_token_id == tok.sot_id
    assert reference.eot_token_id == tok.eot_id


def test_encode_matches_open_clip(tok: Tokenizer, reference) -> None:
    for caption in CORPUS:
        assert tok.encode(caption) == reference.encode(caption), caption


def test_tokenize_matches_open_clip(tok: Tokenizer) -> None:
    ours = tok.tokenize(CORPUS)
    theirs = open_clip_tokenizer.tokenize(CORPUS)
    assert ours.dtype == torch.long
    assert ours.shape == (len(CORPUS), 77)
    assert torch.equal(ours, theirs)
    # The corpus must actually exercise truncation and padding.
    assert (ours[:, -1] == tok.eot_id).any()
    assert (ours[:, -1] == 0).any()


def test_truncation_puts_eot_last_and_padding_is_zero(tok: Tokenizer) -> None:
    long_caption = " ".join(f"word{i}" for i in range(200))
    short_caption = "a man in a red shirt"
    out = tok.tokenize([long_caption, short_caption], context_length=20)
    assert out.shape == (2, 20)
    full = tok.encode(long_caption)
    assert out[0].tolist() == [tok.sot_id, *full[:18], tok.eot_id]
    short = tok.encode(short_caption)
    n = len(short) + 2
    assert out[1, :n].tolist() == [tok.sot_id, *short, tok.eot_id]
    assert (out[1, n:] == 0).all()
    # The text feature is taken at argmax(ids): it must find the EOT.
    assert out.argmax(dim=1).tolist() == [19, n - 1]


def test_exact_fit_is_not_truncated(tok: Tokenizer) -> None:
    ids = tok.encode("a man in a red shirt")
    out = tok.tokenize("a man in a red shirt", context_length=len(ids) + 2)
    assert out[0].tolist() == [tok.sot_id, *ids, tok.eot_id]


def test_truncate_false_raises_with_index(tok: Tokenizer) -> None:
    long_caption = "red " * 100
    with pytest.raises(ValueError, match=r"texts\[1\].*context_length=77"):
        tok.tokenize(["short one", long_caption], truncate=False)


def test_batch_equals_single(tok: Tokenizer) -> None:
    sample = CORPUS[:25]
    batch = tok.tokenize(sample)
    singles = torch.cat([tok.tokenize(c) for c in sample])
    assert torch.equal(batch, singles)
    assert tok.tokenize(sample[0]).shape == (1, 77)
    assert torch.equal(tok.tokenize(tuple(sample)), batch)


def test_decode_round_trip(tok: Tokenizer) -> None:
    checked = 0
    for caption in CORPUS:
        ids = tok.encode(caption)
        if len(ids) > 75:
            continue
        row = tok.tokenize(caption)[0]
        text = tok.decode(row)
        assert text == tok.decode(ids)
        assert text == text.strip()
        # Decoding restores the cleaned text up to spaces between pre-tokens.
        assert "".join(text.split()) == "".join(clean_text(caption).split()), caption
        assert tok.encode(text) == ids, caption
        checked += 1
    assert checked >= 150


def test_decode_exact_text(tok: Tokenizer) -> None:
    ids = tok.encode("A Woman, wearing a RED coat!")
    assert tok.decode(ids) == "a woman , wearing a red coat !"
    assert tok.decode(torch.tensor([tok.sot_id, *ids, tok.eot_id, 0, 0])) == tok.decode(ids)
    # Nothing after EOT is decoded.
    assert tok.decode([*tok.encode("a man"), tok.eot_id, *tok.encode("junk")]) == "a man"


def test_decode_mask_and_interior_zero(tok: Tokenizer) -> None:
    ids = tok.encode("a man in a red shirt")
    ids[3] = tok.mask_id
    text = tok.decode(ids)
    assert text == "a man in <|mask|> red shirt"
    assert tok.encode(text) == ids
    # "!" alone before more punctuation is byte token 0; inside a caption it is not padding.
    bang = tok.encode("hey !%")
    assert 0 in bang
    assert tok.decode(bang) == "hey !%"
    assert tok.decode(tok.tokenize("hey !%")[0]) == "hey !%"


def test_displaced_word_encodes_as_its_two_pieces(tok: Tokenizer, reference) -> None:
    jeky, ll = tok.encoder["jeky"], tok.encoder["ll</w>"]
    captions = [
        "jekyll",
        "Dr. Jekyll and Mr. Hyde are on his T-shirt",
        "a man reading jekyll, wearing a JEKYLL cap; jekylls",
        "jekyll jekyll jekyll",
    ]
    for caption in captions:
        ours = tok.encode(caption)
        theirs = reference.encode(caption)
        assert theirs.count(tok.mask_id) >= 1  # OpenAI's id for the displaced token
        expected = []
        for i in theirs:
            expected += [jeky, ll] if i == tok.mask_id else [i]
        assert ours == expected, caption
        assert tok.mask_id not in ours
        assert all(1 <= i <= tok.last_ordinary_id for i in ours)
        assert "".join(tok.decode(ours).split()) == "".join(clean_text(caption).split())
    assert tok.decode(tok.tokenize("Dr. Jekyll")[0]) == "dr . jekyll"


def test_special_text_handling(tok: Tokenizer) -> None:
    assert tok.encode("a <|mask|> shirt") == [*tok.encode("a"), tok.mask_id, *tok.encode("shirt")]
    # SOT/EOT are never parsed from text: argmax(ids) must still find the real EOT.
    row = tok.tokenize("a man <|endoftext|> walking")[0]
    assert (row == tok.eot_id).sum() == 1
    assert (row == tok.sot_id).sum() == 1


def test_bad_inputs(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match="text must be a str, got int"):
        tok.encode(5)
    with pytest.raises(ValueError, match="empty after cleaning"):
        tok.encode("")
    with pytest.raises(ValueError, match="empty after cleaning"):
        tok.encode("   \n\t ")
    with pytest.raises(ValueError, match="empty list"):
        tok.tokenize([])
    with pytest.raises(TypeError, match=r"texts\[1\]: text must be a str, got NoneType"):
        tok.tokenize(["ok", None])
    with pytest.raises(ValueError, match=r"texts\[2\]: text is empty"):
        tok.tokenize(["ok", "fine", "  "])
    with pytest.raises(TypeError, match="texts must be a str or a list of str"):
        tok.tokenize(123)
    with pytest.raises(ValueError, match="context_length must be an int >= 2"):
        tok.tokenize("ok", context_length=1)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5, 49408])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot read BPE merges file"):
        Tokenizer(bpe_path="does-not-exist.txt.gz")


def test_cache_and_pickle(tok: Tokenizer) -> None:
    small = Tokenizer(cache_size=3)
    text = "a woman in a long dark blue coat"
    assert small.encode(text) == tok.encode(text)
    assert len(small._cache) <= 3
    # Data-loader workers receive the tokenizer by pickling.
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone.tokenize(CORPUS[:10]), tok.tokenize(CORPUS[:10]))


def test_cleans_to_empty_agrees_with_the_cleaning() -> None:
    # Its ASCII shortcut must give clean_text's answer: strings built from the characters the
    # cleaning treats specially (entities, controls, escapes, whitespace) and a spread of ASCII, and
    # short strings of any ASCII characters.
    pieces = ["&nbsp;", "&amp;", "&", "\x00", "\x01", "\x7f", "\x1b[31m", "\x1b", " ", "\t", "\n", "\x1c", "\xa0",
              "caf\u00e9", "\u200b", "\ufeff", "<|mask|>", *(chr(i) for i in range(0, 128, 3))]
    rng = random.Random(0)
    texts = ["", "a man", "&nbsp;", "\x00\x01\x02", "\x1b[0m", "&amp;nbsp;"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 5))) for _ in range(3000)]
    texts += ["".join(chr(rng.randrange(128)) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    for text in texts:
        assert cleans_to_empty(text) == (not clean_text(text)), repr(text)
