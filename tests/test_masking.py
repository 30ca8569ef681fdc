"""Masking: formulas, empirical rates, 80/10/10 split, eligibility, force-one, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from datasets.masking import (
    apply_mask,
    informative_mask,
    informative_probability,
    noise_mask,
    noise_probability,
    random_mask,
)

PAD, MASK, SOT, EOT = 0, 49405, 49406, 49407


def make_ids(batch: int, lengths: list[int], context: int = 77, seed: int = 0) -> torch.Tensor:
    """SOT + random ordinary ids + EOT + padding, one caption length per row (cycled)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, context, dtype=torch.long)
    for b in range(batch):
        n = lengths[b % len(lengths)]
        ids[b, 0] = SOT
        ids[b, 1 : n + 1] = torch.randint(1, 49405, (n,), generator=g)
        ids[b, n + 1] = EOT
    return ids


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_noise(s: float) -> float:
    return 0.2 / (1 + math.exp(-20 * ((1 - s) - 0.9)))


def hand_informative(s: float) -> float:
    return 0.3 / (1 + math.exp(-20 * (s - 0.1)))


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    # 1/n allows for the discreteness of counts when p is tiny.
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1.0 / n


SCORE_VALUES = [0.0, 0.05, 0.1, 0.3, 0.5, 0.85, 1.0]


def test_probability_formulas_match_hand_computation() -> None:
    s = torch.tensor(SCORE_VALUES)
    noise = noise_probability(s)
    informative = informative_probability(s)
    for i, v in enumerate(SCORE_VALUES):
        assert noise[i].item() == pytest.approx(hand_noise(v), rel=1e-5, abs=1e-12)
        assert informative[i].item() == pytest.approx(hand_informative(v), rel=1e-5, abs=1e-12)
    # Hand-computed anchors: s=0.1 is the centre of both curves.
    assert noise[2].item() == pytest.approx(0.1, rel=1e-6)
    assert informative[2].item() == pytest.approx(0.15, rel=1e-6)
    custom = noise_probability(torch.tensor([0.4]), max_prob=0.5, slope=10.0, center=0.2)
    assert custom.item() == pytest.approx(0.5 / (1 + math.exp(-10 * (0.6 - 0.2))), rel=1e-6)
    custom = informative_probability(torch.tensor([0.4]), max_prob=0.5, slope=10.0, center=0.2)
    assert custom.item() == pytest.approx(0.5 / (1 + math.exp(-10 * (0.4 - 0.2))), rel=1e-6)


def test_initial_scores_give_plain_random_mlm() -> None:
    s = torch.full((2, 77), 0.85)
    # By hand: 0.3 / (1 + e^-15) and 0.2 / (1 + e^15).
    assert 0.3 / (1 + math.exp(-15)) == pytest.approx(0.29999990, abs=1e-8)
    assert 0.2 / (1 + math.exp(15)) == pytest.approx(6.118e-8, rel=1e-3)
    assert torch.allclose(informative_probability(s), torch.full_like(s, 0.3 / (1 + math.exp(-15))))
    assert torch.allclose(noise_probability(s), torch.full_like(s, 0.2 / (1 + math.exp(15))), rtol=1e-4, atol=0)
    assert noise_probability(s).max() < 1e-7


@pytest.mark.parametrize("branch", ["noise", "informative"])
def test_empirical_selection_rates(branch: str) -> None:
    batch, context = 1500, 77
    ids = make_ids(batch, [70])
    # Column j gets score SCORE_VALUES[j % 7]: every value is tested on ~10 columns x 1500 rows.
    scores = torch.tensor([SCORE_VALUES[j % len(SCORE_VALUES)] for j in range(context)])
    scores = scores.expand(batch, context).contiguous()
    g = gen(123)
    if branch == "noise":
        out = noise_mask(ids, scores, g)
        selected_cols = None
        changed = out != ids
        hand = hand_noise
    else:
        out, labels = informative_mask(ids, scores, g)
        selected_cols = labels != 0
        changed = out != ids
        hand = hand_informative
    # Columns 2..70 are ordinary tokens; column 1 is skipped because force-one
    # adds to its rate in the informative branch.
    for k, value in enumerate(SCORE_VALUES):
        cols = [j for j in range(2, 71) if j % len(SCORE_VALUES) == k]
        n = batch * len(cols)
        p = hand(value)
        if selected_cols is not None:
            assert within_binomial(int(selected_cols[:, cols].sum()), n, p), (value, p)
        # A selected token is changed unless kept (10%) or replaced by itself (~0).
        assert within_binomial(int(changed[:, cols].sum()), n, 0.9 * p), (value, p)


def test_random_mask_rate_and_replacement_split() -> None:
    batch = 2000
    ids = make_ids(batch, [75])
    out, labels = random_mask(ids, gen(7))
    selected = labels != 0
    cols = slice(2, 76)
    n = batch * 74
    assert within_binomial(int(selected[:, cols].sum()), n, 0.15)

    n_sel = int(selected.sum())
    masked = selected & (out == MASK)
    kept = selected & (out == ids)
    randomised = selected & (out != MASK) & (out != ids)
    assert int(masked.sum() + kept.sum() + randomised.sum()) == n_sel
    assert within_binomial(int(masked.sum()), n_sel, 0.8)
    assert within_binomial(int(randomised.sum()), n_sel, 0.1)
    assert within_binomial(int(kept.sum()), n_sel, 0.1)
    # Random replacements are uniform over the ordinary ids 1..49404.
    replacements = out[randomised].double()
    assert replacements.min() >= 1 and replacements.max() <= 49404
    mean, std = (1 + 49404) / 2, math.sqrt((49404**2 - 1) / 12)
    assert abs(replacements.mean().item() - mean) < 5 * std / math.sqrt(replacements.numel())


def test_custom_ratios_and_range() -> None:
    ids = make_ids(500, [60])
    out, labels = random_mask(ids, gen(3), prob=0.5, mask_ratio=0.0, random_ratio=1.0, vocab_low=100, vocab_high=110)
    selected = labels != 0
    # Eligibility is [vocab_low, vocab_high] too, so almost nothing is selected.
    eligible = (ids >= 100) & (ids <= 110)
    assert not (selected & ~eligible).any()
    assert ((out[selected] >= 100) & (out[selected] <= 110)).all()
    out, labels = random_mask(ids, gen(3), prob=0.5, mask_ratio=0.0, random_ratio=0.0)
    assert torch.equal(out, ids)
    assert (labels != 0).float().mean() > 0.3


def test_special_and_padding_tokens_never_touched() -> None:
    ids = make_ids(400, [3, 10, 40, 75])
    ids[::5, 4] = MASK  # a mask token already present is not eligible either
    special = (ids == PAD) | (ids == SOT) | (ids == EOT) | (ids == MASK)
    ones = torch.ones(ids.shape)
    for (out, labels), p_is_one in [
        (apply_mask(ids, ones, gen(0)), True),
        (informative_mask(ids, ones, gen(1)), False),
        (random_mask(ids, gen(2), prob=1.0), True),
        ((noise_mask(ids, torch.zeros(ids.shape), gen(3)), None), False),
    ]:
        assert torch.equal(out[special], ids[special])
        assert (out != ids).any()
        if labels is not None:
            assert (labels[special] == 0).all()
            assert (labels != 0).any()
        if p_is_one:
            # With p = 1 every ordinary token is labelled.
            assert torch.equal(labels != 0, ~special)


def test_force_one_rule() -> None:
    ids = make_ids(6, [1, 5, 20])
    ids[5, 1] = PAD  # position 1 not eligible: nothing may be forced there
    zero = torch.zeros(ids.shape)
    for out, labels in [
        apply_mask(ids, zero, gen(0)),
        random_mask(ids, gen(0), prob=0.0),
    ]:
        expected_labels = torch.zeros_like(ids)
        expected_labels[:5, 1] = ids[:5, 1]
        expected_out = ids.clone()
        expected_out[:5, 1] = MASK
        assert torch.equal(labels, expected_labels)
        assert torch.equal(out, expected_out)
    # Scores far below 0 make p_mlm underflow to exactly 0 (at s = 0 it is still 0.036).
    very_low = torch.full(ids.shape, -10.0)
    assert informative_probability(very_low).max() == 0
    out, labels = informative_mask(ids, very_low, gen(0))
    assert torch.equal(labels[:5, 1], ids[:5, 1]) and (labels[:5, 1] != 0).all()
    assert (labels[:, 2:] == 0).all() and labels[5].eq(0).all()
    assert (out[:5, 1] == MASK).all() and torch.equal(out[:, 2:], ids[:, 2:])
    # Noise masking has no force-one: p = 0 leaves every caption untouched.
    assert torch.equal(noise_mask(ids, torch.ones(ids.shape) + 10.0, gen(0)), ids)
    assert noise_probability(torch.ones(ids.shape) + 10.0).max() == 0
    # force_one=False on the MLM functions leaves captions untouched too.
    out, labels = random_mask(ids, gen(0), prob=0.0, force_one=False)
    assert torch.equal(out, ids) and (labels == 0).all()


def test_force_one_only_when_caption_has_no_label() -> None:
    ids = make_ids(1, [30])
    prob = torch.zeros(ids.shape)
    prob[0, 10] = 1.0
    out, labels = apply_mask(ids, prob, gen(0), mask_ratio=1.0, random_ratio=0.0)
    assert labels[0, 1] == 0 and out[0, 1] == ids[0, 1]
    assert labels[0, 10] == ids[0, 10] and out[0, 10] == MASK


def test_seed_determinism_and_independence_from_eligibility() -> None:
    ids = make_ids(64, [10, 50, 75])
    scores = torch.rand(ids.shape, generator=gen(99))
    a = informative_mask(ids, scores, gen(5))
    b = informative_mask(ids, scores, gen(5))
    c = informative_mask(ids, scores, gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(noise_mask(ids, scores, gen(5)), noise_mask(ids, scores, gen(5)))
    assert not torch.equal(noise_mask(ids, 0 * scores, gen(5)), noise_mask(ids, 0 * scores, gen(6)))
    # Making some positions ineligible must not shift the draws of the others.
    other = ids.clone()
    other[:, 5:8] = PAD
    d = informative_mask(other, scores, gen(5))
    keep = torch.ones(ids.shape, dtype=torch.bool)
    keep[:, 5:8] = False
    keep[:, 1] = False  # force-one may differ where a caption lost its only label
    assert torch.equal(d[0][keep], a[0][keep]) and torch.equal(d[1][keep], a[1][keep])


def test_matches_naive_reference() -> None:
    """Compare with a per-element loop that consumes the same draws in the same order."""
    ids = make_ids(12, [0, 1, 4, 30, 75])
    ids[3, 6] = MASK
    prob = torch.rand(ids.shape, generator=gen(11)) * 0.6
    prob[4] = 0.0
    seed = 21
    out, labels = apply_mask(ids, prob, gen(seed), mask_ratio=0.6, random_ratio=0.25)

    g = gen(seed)
    u = torch.rand(ids.shape, generator=g)
    action = torch.rand(ids.shape, generator=g)
    rand_ids = torch.randint(1, 49405, ids.shape, generator=g)
    exp_out, exp_labels = ids.clone(), torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            t = int(ids[b, j])
            if 1 <= t <= 49404 and u[b, j] < prob[b, j]:
                exp_labels[b, j] = t
                if action[b, j] < 0.6:
                    exp_out[b, j] = MASK
                elif action[b, j] < 0.85:
                    exp_out[b, j] = rand_ids[b, j]
        if all(int(x) == 0 for x in exp_labels[b]) and 1 <= int(ids[b, 1]) <= 49404:
            exp_labels[b, 1] = ids[b, 1]
            exp_out[b, 1] = MASK
    assert torch.equal(labels, exp_labels)
    assert torch.equal(out, exp_out)
    assert (exp_labels[4] != 0).sum() == 1  # the force-one row is exercised
    assert (exp_labels[0] == 0).all()  # an empty caption has nothing to force


def test_one_dimensional_input_and_no_in_place_change() -> None:
    ids = make_ids(3, [20])
    scores = torch.rand(ids.shape, generator=gen(1))
    before_ids, before_scores = ids.clone(), scores.clone()
    informative_mask(ids, scores, gen(4))
    noise_mask(ids, 1 - scores, gen(4))
    random_mask(ids, gen(4), prob=1.0)
    assert torch.equal(ids, before_ids) and torch.equal(scores, before_scores)

    row_out, row_labels = informative_mask(ids[0], scores[0], gen(4))
    assert row_out.shape == (77,) and row_labels.shape == (77,)
    # An [L] caption is handled exactly as the [1, L] batch holding it.
    one_out, one_labels = informative_mask(ids[:1], scores[:1], gen(4))
    assert torch.equal(row_out, one_out[0]) and torch.equal(row_labels, one_labels[0])
    assert (row_labels != 0).any()
    assert noise_mask(ids[0], scores[0], gen(4)).shape == (77,)
    assert row_out.dtype == torch.long and row_labels.dtype == torch.long


def test_labels_consistent() -> None:
    ids = make_ids(300, [8, 40, 75])
    scores = torch.rand(ids.shape, generator=gen(2))
    out, labels = informative_mask(ids, scores, gen(8))
    selected = labels != 0
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(out[~selected], ids[~selected])
    assert ((out[selected] == MASK) | ((out[selected] >= 1) & (out[selected] <= 49404))).all()
    assert selected.any(dim=1).all()


def test_bad_inputs() -> None:
    ids = make_ids(2, [5])
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        apply_mask(ids.float(), 0.1, gen(0))
    with pytest.raises(ValueError, match=r"shape \[B, L\] or \[L\]"):
        apply_mask(ids[None], 0.1, gen(0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        random_mask(ids, 0)
    with pytest.raises(ValueError, match="prob shape"):
        informative_mask(ids, torch.zeros(2, 10), gen(0))
    with pytest.raises(TypeError, match="scores must be a floating-point tensor"):
        noise_mask(ids, ids, gen(0))
    with pytest.raises(ValueError, match="prob must lie in"):
        apply_mask(ids, 1.5, gen(0))
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(ids, gen(0), mask_ratio=0.9, random_ratio=0.2)
    with pytest.raises(ValueError, match="vocab_low"):
        random_mask(ids, gen(0), vocab_low=0)
    with pytest.raises(ValueError, match="mask_id=49405 must lie outside"):
        random_mask(ids, gen(0), vocab_high=49406)
