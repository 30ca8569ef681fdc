"""Samplers (PK identity batches, distributed shuffling, resume) and image transforms."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DistributedSampler

from datasets.sampler import DistributedRandomSampler, IdentitySampler
from datasets.transforms import CLIP_MEAN, CLIP_STD, build_transforms

# --------------------------------------------------------------------------- DistributedRandomSampler


@pytest.mark.parametrize("n, world_size, drop_last, shuffle", [
    (10, 1, False, True), (11, 2, False, True), (11, 2, True, True), (13, 4, False, True),
    (13, 4, True, False), (3, 4, False, True),
])
def test_distributed_random_matches_torch_distributed_sampler(n, world_size, drop_last, shuffle):
    for epoch in (0, 3):
        for rank in range(world_size):
            ours = DistributedRandomSampler(n, seed=5, rank=rank, world_size=world_size, shuffle=shuffle,
                                            drop_last=drop_last)
            ref = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=5,
                                     drop_last=drop_last)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref)
            assert len(ours) == len(ref)


def test_distributed_random_shards_are_disjoint_and_cover():
    n, world_size = 20, 4
    parts = [list(DistributedRandomSampler(n, seed=1, rank=r, world_size=world_size)) for r in range(world_size)]
    assert all(len(p) == 5 for p in parts)
    assert sorted(sum(parts, [])) == list(range(n))


def test_set_epoch_changes_order_deterministically():
    a = DistributedRandomSampler(50, seed=3)
    b = DistributedRandomSampler(50, seed=3)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    second = list(a)
    assert second == list(b) and second != first and sorted(second) == sorted(first)
    a.set_epoch(0)
    assert list(a) == first
    assert list(DistributedRandomSampler(50, seed=4)) != first


@pytest.mark.parametrize("world_size", [1, 3])
def test_distributed_random_resume_skips_exactly_the_consumed(world_size):
    n, consumed = 31, 4
    for rank in range(world_size):
        sampler = DistributedRandomSampler(n, seed=9, rank=rank, world_size=world_size)
        sampler.set_epoch(2)
        full = list(sampler)
        it = iter(sampler)
        taken = [next(it) for _ in range(consumed + 3)]  # the loader prefetched 3 more than were trained on
        assert taken == full[:consumed + 3]
        state = sampler.state_dict(consumed=consumed)
        assert state == {"epoch": 2, "position": consumed * world_size}

        resumed = DistributedRandomSampler(n, seed=9, rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the loop's usual call at the top of the epoch keeps the position
        assert len(resumed) == len(full) - consumed
        assert list(resumed) == full[consumed:]
        assert list(resumed) == full  # a finished pass starts over
        resumed.set_epoch(3)
        assert len(resumed) == len(full)


def test_distributed_random_resume_on_another_world_size():
    n = 24
    old = [DistributedRandomSampler(n, seed=2, rank=r, world_size=2) for r in range(2)]
    global_order = old[0].global_order()
    state = old[0].state_dict(consumed=3)
    new = [DistributedRandomSampler(n, seed=2, rank=r, world_size=3) for r in range(3)]
    for s in new:
        s.load_state_dict(state)
    rest = [list(s) for s in new]
    assert all(len(r) == 6 for r in rest)
    assert sorted(sum(rest, [])) == sorted(global_order[6:].tolist())


def test_default_state_counts_yielded_indices():
    sampler = DistributedRandomSampler(10, seed=0)
    it = iter(sampler)
    next(it), next(it)
    assert sampler.state_dict() == {"epoch": 0, "position": 2}


def test_bad_positions_and_arguments_are_rejected():
    sampler = DistributedRandomSampler(10, seed=0)
    with pytest.raises(ValueError, match=r"position 11 is outside \[0, 10\]"):
        sampler.load_state_dict({"epoch": 0, "position": 11})
    with pytest.raises(ValueError, match="rank must be in"):
        DistributedRandomSampler(10, rank=2, world_size=2)


# --------------------------------------------------------------------------- IdentitySampler


def make_pids(seed=0):
    """Identities with 1..9 samples each (some below K), shuffled positions."""
    rng = np.random.default_rng(seed)
    pids = np.concatenate([np.full(c, pid) for pid, c in enumerate(rng.integers(1, 10, size=40))])
    return pids[rng.permutation(len(pids))] + 100


def test_pk_batches_hold_p_identities_times_k_instances():
    pids = make_pids()
    k, batch = 4, 32
    sampler = IdentitySampler(pids, batch, k, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) and len(order) % batch == 0
    per_identity = collections.defaultdict(list)
    for b in np.asarray(order).reshape(-1, batch):
        labels, counts = np.unique(pids[b], return_counts=True)
        assert len(labels) == batch // k and (counts == k).all()
        for group in b.reshape(-1, k):
            per_identity[int(pids[group[0]])].append(group)
    counts = collections.Counter(pids.tolist())
    leftover = 0
    for pid, groups in per_identity.items():
        flat = np.concatenate(groups)
        if counts[pid] >= k:
            # Groups are disjoint chunks of a shuffled identity: no index repeats in an epoch.
            assert len(set(flat.tolist())) == len(flat) and len(groups) <= counts[pid] // k
            leftover += counts[pid] // k > len(groups)
        else:
            assert len(groups) == 1
    unused = [p for p in counts if p not in per_identity]
    # IRRA stops when fewer than P identities still have groups.
    assert leftover + len(unused) < batch // k


def test_pk_rank_shards_split_each_global_batch():
    pids = make_pids(1)
    batch, world_size = 24, 3
    full = IdentitySampler(pids, batch, 4, seed=7)
    full.set_epoch(5)
    global_batches = np.asarray(list(full)).reshape(-1, batch)
    parts = []
    for rank in range(world_size):
        s = IdentitySampler(pids, batch, 4, seed=7, rank=rank, world_size=world_size)
        s.set_epoch(5)
        parts.append(np.asarray(list(s)).reshape(-1, batch // world_size))
        assert len(s) == len(global_batches) * batch // world_size
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), global_batches)


def test_pk_set_epoch_and_resume():
    pids = make_pids(2)
    a, b = IdentitySampler(pids, 16, 4, seed=3), IdentitySampler(pids, 16, 4, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b)
    a.set_epoch(2)
    assert list(a) != epoch1
    a.set_epoch(1)
    assert list(a) == epoch1

    rank1 = IdentitySampler(pids, 16, 4, seed=3, rank=1, world_size=2)
    rank1.set_epoch(1)
    local = list(rank1)
    state = rank1.state_dict(consumed=3 * 8)  # three per-rank batches of 8 trained on
    assert state == {"epoch": 1, "position": 3 * 16}
    resumed = IdentitySampler(pids, 16, 4, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert list(resumed) == local[24:]
    with pytest.raises(ValueError, match="not a multiple of the global batch size 16"):
        resumed.load_state_dict({"epoch": 1, "position": 8})


def test_pk_without_drop_last_uses_every_group():
    pids = np.repeat(np.arange(5), 8)  # 5 identities x 2 groups of 4; P = 3 leaves groups over
    sampler = IdentitySampler(pids, 12, 4, seed=0, drop_last=False)
    order = np.asarray(list(sampler))
    assert len(order) % 12 == 0
    assert set(order.tolist()) == set(range(40))
    assert len(list(IdentitySampler(pids, 12, 4, seed=0))) < len(order)


def test_pk_argument_errors():
    pids = np.arange(8) // 2
    with pytest.raises(ValueError, match="multiple of num_instances"):
        IdentitySampler(pids, 6, 4)
    with pytest.raises(ValueError, match="divisible by world_size"):
        IdentitySampler(pids, 8, 2, world_size=3)
    with pytest.raises(ValueError, match="needs 5 distinct identities .* only 4"):
        IdentitySampler(pids, 10, 2)
    assert len(IdentitySampler(torch.as_tensor(pids), 8, 2)) == 8


# --------------------------------------------------------------------------- transforms


def test_eval_transform_shape_and_normalisation():
    image = Image.new("RGB", (8, 4), (255, 128, 0))
    out = build_transforms((384, 128), is_train=False)(image)
    assert out.shape == (3, 384, 128) and out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), CLIP_MEAN, CLIP_STD, strict=True)]
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)


def test_train_transform_without_aug_equals_eval():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 10, 3), dtype=np.uint8))
    torch.testing.assert_close(build_transforms((32, 16), is_train=True)(image),
                               build_transforms((32, 16), is_train=False)(image))
    assert build_transforms(24, is_train=False)(image).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="image_size"):
        build_transforms((0, 16))


def test_augmented_transform():
    transform = build_transforms((32, 16), is_train=True, aug=True)
    kinds = [type(t) for t in transform.transforms]
    assert kinds == [T.Resize, T.RandomHorizontalFlip, T.Pad, T.RandomCrop, T.ToTensor, T.Normalize,
                     T.RandomErasing]
    assert transform.transforms[2].padding == 10 and transform.transforms[6].scale == (0.02, 0.4)
    assert transform.transforms[6].value == CLIP_MEAN
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8))
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    assert torch.equal(transform(image), first)
    assert first.shape == (3, 32, 16)
    plain = build_transforms((32, 16), is_train=False)(image)
    outputs = [transform(image) for _ in range(5)]
    assert any(not torch.equal(o, plain) for o in outputs)
