"""utils.metrics: the chunked, sort-free ranking against a brute-force full sort."""

from __future__ import annotations

import pytest
import torch

from utils import metrics
from utils.metrics import format_table, rank_metrics, rank_metrics_from_features, rank_metrics_i2t


def reference_metrics(sim: torch.Tensor, query_pids, gallery_pids, max_rank: int = 10) -> dict:
    """Naive reference: stable sort of -score per query, then loops (percent)."""
    query_pids, gallery_pids = list(map(int, query_pids)), list(map(int, gallery_pids))
    num_gallery = sim.shape[1]
    cmc_hits = [0] * max_rank
    aps, inps = [], []
    for q, row in enumerate(sim.to(torch.float32).tolist()):
        order = sorted(range(num_gallery), key=lambda j: (-row[j], j))  # equal scores: index ascending
        matches = [gallery_pids[j] == query_pids[q] for j in order]
        if not any(matches):
            continue
        hits, precision_sum, first, last = 0, 0.0, None, None
        for position, is_match in enumerate(matches, start=1):
            if is_match:
                hits += 1
                precision_sum += hits / position
                first = first or position
                last = position
        aps.append(precision_sum / hits)
        inps.append(hits / last)
        for k in range(max_rank):
            cmc_hits[k] += first <= k + 1
    n = len(aps)
    cmc = [100.0 * c / n for c in cmc_hits] if n else []
    return {"cmc": cmc, "mAP": 100.0 * sum(aps) / n if n else None, "mINP": 100.0 * sum(inps) / n if n else None,
            "num_valid": n}


def assert_matches_reference(result: dict, ref: dict, max_rank: int = 10) -> None:
    assert result["num_valid"] == ref["num_valid"]
    assert result["mAP"] == pytest.approx(ref["mAP"], abs=1e-9)
    assert result["mINP"] == pytest.approx(ref["mINP"], abs=1e-9)
    assert result["cmc"] == pytest.approx(ref["cmc"], abs=1e-9)
    for k in (1, 5, 10):
        if k <= max_rank:
            assert result[f"R{k}"] == pytest.approx(ref["cmc"][k - 1], abs=1e-9)


def random_case(seed: int, num_queries: int, num_gallery: int, num_ids: int, quantise: float | None = None):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(num_queries, num_gallery, generator=g)
    if quantise:  # coarse grid -> many exact ties (including ties with positives)
        sim = torch.round(sim * quantise) / quantise
    query_pids = torch.randint(0, num_ids, (num_queries,), generator=g)
    gallery_pids = torch.randint(0, num_ids, (num_gallery,), generator=g)
    return sim, query_pids, gallery_pids


@pytest.fixture(params=["auto", "sparse", "dense"])
def ranking_path(request, monkeypatch):
    """Run a test with the automatic path choice, or force one of the two paths."""
    if request.param == "sparse":
        monkeypatch.setattr(metrics, "_SPARSE_MAX_FRACTION", 2.0)
    elif request.param == "dense":
        monkeypatch.setattr(metrics, "_SPARSE_MAX_FRACTION", -1.0)
        monkeypatch.setattr(metrics, "_DENSE_BLOCK_ELEMENTS", 64)  # several dense blocks per chunk
    return request.param


# (seed, queries, gallery, identities, quantisation): few/many positives per query,
# queries without positive, heavy ties.
CASES = [
    (0, 30, 50, 8, None),
    (1, 40, 60, 15, 2.0),
    (2, 25, 90, 3, 1.0),
    (3, 50, 20, 40, None),
    (4, 1, 1, 1, None),
    (5, 17, 33, 5, 0.5),
]


@pytest.mark.parametrize("case", CASES)
def test_equals_brute_force_reference(case, ranking_path):
    sim, query_pids, gallery_pids = random_case(*case)
    ref = reference_metrics(sim, query_pids, gallery_pids, max_rank=12)
    if ref["num_valid"] == 0:
        pytest.skip("no valid query in this draw")
    chunk_sizes = (1, 7, 1024) if ranking_path == "auto" else (5, 1024)
    for chunk_size in chunk_sizes:
        result = rank_metrics(sim, query_pids, gallery_pids, max_rank=12, chunk_size=chunk_size)
        assert_matches_reference(result, ref, max_rank=12)
        assert result["num_queries"] == sim.shape[0]


def test_hand_computed_case():
    # Gallery pids [1, 2, 1, 1]; query pids [1, 2, 2, 1, 7].
    sim = torch.tensor(
        [
            [0.9, 0.5, 0.7, 0.1],  # pid 1: order 0,2,1,3 -> positive ranks 1,2,4: AP (1+1+3/4)/3=11/12, INP 3/4
            [0.2, 0.8, 0.3, 0.8],  # pid 2: tie 1 vs 3 -> index 1 first: rank 1, AP 1, INP 1
            [0.8, 0.3, 0.8, 0.1],  # pid 2: order 0,2,1,3 -> rank 3: AP 1/3, INP 1/3, misses R1
            [0.5, 0.5, 0.5, 0.5],  # pid 1: all tied -> order 0,1,2,3 -> ranks 1,3,4: AP 29/36, INP 3/4
            [0.0, 0.0, 0.0, 0.0],  # pid 7: no positive -> excluded
        ]
    )
    query_pids, gallery_pids = [1, 2, 2, 1, 7], [1, 2, 1, 1]
    result = rank_metrics(sim, query_pids, gallery_pids, max_rank=3)
    assert result["num_queries"] == 5 and result["num_valid"] == 4
    assert result["R1"] == pytest.approx(75.0)
    assert result["R5"] == pytest.approx(100.0) and result["R10"] == pytest.approx(100.0)
    assert result["cmc"] == pytest.approx([75.0, 75.0, 100.0])
    # mAP = (33/36 + 36/36 + 12/36 + 29/36) / 4 = 110/144; mINP = (3/4 + 1 + 1/3 + 3/4) / 4 = 34/48
    assert result["mAP"] == pytest.approx(100 * 110 / 144)
    assert result["mINP"] == pytest.approx(100 * 34 / 48)


def test_hand_computed_i2t():
    # Same matrix read column-wise: images (pids 1,2,1,1) query captions (pids 1,2,2,1,7).
    sim = torch.tensor(
        [
            [0.9, 0.5, 0.7, 0.1],
            [0.2, 0.8, 0.3, 0.8],
            [0.8, 0.3, 0.8, 0.1],
            [0.5, 0.5, 0.5, 0.5],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    text_pids, image_pids = [1, 2, 2, 1, 7], [1, 2, 1, 1]
    result = rank_metrics_i2t(sim, text_pids, image_pids)
    # image 0: order t0,t2,t3,t1,t4 -> positives t0,t3 at 1,3: AP 5/6, INP 2/3
    # image 1: order t1,t0,t3,t2,t4 -> positives t1,t2 at 1,4: AP 3/4, INP 1/2
    # image 2: order t2,t0,t3,t1,t4 -> positives t0,t3 at 2,3: AP 7/12, INP 2/3
    # image 3: order t1,t3,t0,t2,t4 (t0 before t2 on the tie) -> t3,t0 at 2,3: AP 7/12, INP 2/3
    assert result["num_queries"] == 4 and result["num_valid"] == 4
    assert result["R1"] == pytest.approx(50.0)
    assert result["R5"] == pytest.approx(100.0)
    assert result["mAP"] == pytest.approx(100 * 33 / 48)
    assert result["mINP"] == pytest.approx(100 * 15 / 24)


@pytest.mark.parametrize("case", CASES[:3])
def test_i2t_is_transposed_t2i(case):
    sim, text_pids, image_pids = random_case(*case)
    ref = reference_metrics(sim.T, image_pids, text_pids)
    if ref["num_valid"] == 0:
        pytest.skip("no valid query in this draw")
    result = rank_metrics_i2t(sim, text_pids, image_pids, chunk_size=4)
    assert_matches_reference(result, ref)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_from_features_equals_precomputed_sim(chunk_size):
    g = torch.Generator().manual_seed(7)
    pids = torch.arange(12).repeat_interleave(3)
    gallery = torch.nn.functional.normalize(torch.randn(36, 16, generator=g), dim=1)
    queries = torch.nn.functional.normalize(gallery[torch.randperm(36, generator=g)] + torch.randn(36, 16, generator=g), dim=1)
    query_pids = pids[torch.randperm(36, generator=g)]
    expected = rank_metrics(queries @ gallery.T, query_pids, pids)
    result = rank_metrics_from_features(queries, gallery, query_pids, pids, chunk_size=chunk_size)
    # Per-chunk matmuls may round differently from the full one; no near-ties here.
    assert {k: result[k] for k in ("R1", "R5", "R10", "mAP", "mINP")} == pytest.approx(
        {k: expected[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}
    )
    assert_matches_reference(result, reference_metrics(queries @ gallery.T, query_pids, pids))


def test_low_precision_and_signed_zero_ties():
    sim, query_pids, gallery_pids = random_case(11, 20, 40, 4, quantise=4.0)
    sim[sim == 0] = -0.0  # -0.0 must tie with +0.0 (ordered by index)
    sim[::3, ::2] = 0.0
    ref = reference_metrics(sim, query_pids, gallery_pids)
    assert_matches_reference(rank_metrics(sim, query_pids, gallery_pids, chunk_size=6), ref)
    for dtype in (torch.float16, torch.bfloat16):  # the grid is exact in both
        assert_matches_reference(rank_metrics(sim.to(dtype), query_pids, gallery_pids), ref)


def test_large_gallery_indices_and_chunk_cap():
    # 70,000 items need 17 index bits: keys of far-apart items and the row cap are exercised.
    g = torch.Generator().manual_seed(3)
    sim = torch.round(torch.randn(3, 70_000, generator=g) * 8) / 8
    gallery_pids = torch.randint(0, 500, (70_000,), generator=g)
    query_pids = gallery_pids[torch.tensor([5, 69_999, 40_000])]
    order = torch.sort(-sim, dim=1, stable=True).indices
    matches = gallery_pids[order] == query_pids[:, None]
    positions = torch.arange(1, 70_001, dtype=torch.float64)
    hits = matches.cumsum(1).to(torch.float64)
    ap = ((hits / positions) * matches).sum(1) / matches.sum(1)
    last = (matches * torch.arange(1, 70_001)).amax(1)
    result = rank_metrics(sim, query_pids, gallery_pids)
    assert result["mAP"] == pytest.approx(100 * ap.mean().item(), abs=1e-9)
    inp = matches.sum(1).to(torch.float64) / last
    assert result["mINP"] == pytest.approx(100 * inp.mean().item(), abs=1e-9)
    assert result["R1"] == pytest.approx(100 * matches[:, 0].double().mean().item())


def test_excluded_queries_are_counted_and_all_excluded_raises():
    sim = torch.randn(4, 5)
    result = rank_metrics(sim, [0, 9, 1, 9], [0, 1, 2, 3, 4])
    assert (result["num_queries"], result["num_valid"]) == (4, 2)
    with pytest.raises(ValueError, match="none of the 2 queries has a positive"):
        rank_metrics(torch.randn(2, 3), [7, 8], [0, 1, 2])


def test_input_errors():
    sim = torch.randn(3, 4)
    with pytest.raises(ValueError, match="query_pids must be a 1-D tensor of length 3"):
        rank_metrics(sim, [0, 1], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="gallery_pids must be a 1-D tensor of length 4"):
        rank_metrics(sim, [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="integer identity labels"):
        rank_metrics(sim, torch.tensor([0.0, 1.0, 2.0]), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="2-D floating-point"):
        rank_metrics(torch.randn(3), [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="2-D floating-point"):
        rank_metrics(torch.ones(3, 4, dtype=torch.int64), [0, 1, 2], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="max_rank"):
        rank_metrics(sim, [0, 1, 2], [0, 1, 2, 3], max_rank=0)
    with pytest.raises(ValueError, match="chunk_size"):
        rank_metrics(sim, [0, 1, 2], [0, 1, 2, 3], chunk_size=0)
    nan_sim = sim.clone()
    nan_sim[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(nan_sim, [0, 1, 2], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="feature sizes differ"):
        rank_metrics_from_features(torch.randn(3, 8), torch.randn(4, 6), [0, 1, 2], [0, 1, 2, 3])


def test_infinite_scores_are_ranked_not_rejected():
    sim = torch.tensor([[float("inf"), 0.0, float("-inf"), 1.0], [float("-inf"), float("inf"), 0.5, 2.0]])
    query_pids, gallery_pids = [2, 1], [0, 1, 2, 3]
    assert_matches_reference(rank_metrics(sim, query_pids, gallery_pids), reference_metrics(sim, query_pids, gallery_pids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    sim, query_pids, gallery_pids = random_case(1, 40, 60, 15, 2.0)
    cpu = rank_metrics(sim, query_pids, gallery_pids, chunk_size=7)
    gpu = rank_metrics(sim.to("cuda"), query_pids, gallery_pids, chunk_size=7)
    assert gpu == pytest.approx(cpu)


def test_format_table():
    rows = {"t2i": {"R1": 73.384, "R5": 89.935, "R10": 93.71, "mAP": 66.1, "mINP": 50.0, "cmc": []}}
    assert format_table(rows).splitlines() == [
        "+------+-------+-------+-------+-------+-------+",
        "| task |   R1  |   R5  |  R10  |  mAP  |  mINP |",
        "+------+-------+-------+-------+-------+-------+",
        "| t2i  | 73.38 | 89.94 | 93.71 | 66.10 | 50.00 |",
        "+------+-------+-------+-------+-------+-------+",
    ]
    with pytest.raises(ValueError, match="metrics of task 'i2t' lack \\['mINP'\\]"):
        format_table({"i2t": {"R1": 1.0, "R5": 1.0, "R10": 1.0, "mAP": 1.0}})
