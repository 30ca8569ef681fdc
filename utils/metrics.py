"""Retrieval ranking metrics (R@k, mAP, mINP) with bounded memory.

Definitions (per query; all results in percent, averaged over queries):

* The gallery is ordered by descending score. **Tie rule:** gallery items with
  equal score are ordered by gallery index ascending, i.e. exactly the order
  of a *stable* sort of ``-score``. Scores are compared as float32 (fp16/bf16
  are widened exactly, float64 is rounded to float32 first) and ``-0.0`` equals
  ``0.0``.
* ``rank(p)`` (1-based) of a positive gallery item ``p`` = 1 + number of items
  with a greater score + number of items with an equal score and a smaller
  index.
* R@k: 1 if the best-ranked positive has rank <= k.
* AP: mean over the positives, taken in rank order, of
  ``(number of positives ranked at or before it) / rank``.
* INP: ``number of positives / rank of the last positive``.
* A query without any positive in the gallery is excluded from every average;
  ``num_queries`` and ``num_valid`` in the result say how many were excluded.
  If no query has a positive, ``ValueError`` is raised.

Implementation: no query x gallery argsort. For each chunk of queries only the
gallery items scoring at least as high as the query's lowest-scoring positive
can precede a positive ("candidates"). Every score gets an int64 key that sorts
exactly like the tie rule above (descending score bits, then index); the
positives' keys are sorted (a handful per query), every candidate is located
among them with ``searchsorted``, and a histogram of those positions, summed,
gives every positive's exact rank. When candidates are few (a trained model)
they are extracted and processed flat; when they fill much of the chunk (a weak
model) the whole chunk is processed row-wise instead. Work is O(B x G)
elementwise plus O(candidates x log positives); memory is O(chunk_size x G) and
never depends on the number of queries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from prettytable import PrettyTable

logger = logging.getLogger(__name__)

__all__ = [
    "format_table",
    "rank_metrics",
    "rank_metrics_from_features",
    "rank_metrics_i2t",
]

TABLE_COLUMNS = ("R1", "R5", "R10", "mAP", "mINP")
_REPORTED_RANKS = (1, 5, 10)
_SCORE_BITS = 32  # float32 scores map to 32-bit order keys
# Above about a third of the chunk being candidates the dense path is faster
# (measured on CPU, 1024 x 19,848 chunk, 20 positives per query).
_SPARSE_MAX_FRACTION = 1 / 3
# Elements per dense step (~24 bytes of temporaries each: int64 keys and slots, int32 bits).
_DENSE_BLOCK_ELEMENTS = 2**22


def _check_pids(pids: Any, name: str, length: int, device: torch.device) -> torch.Tensor:
    """Convert ``pids`` to a 1-D int64 tensor on ``device`` of the expected length."""
    pids = torch.as_tensor(pids)
    if pids.dtype == torch.bool or pids.is_floating_point() or pids.is_complex():
        raise ValueError(f"{name} must hold integer identity labels, got dtype {pids.dtype}")
    if pids.dim() != 1 or pids.numel() != length:
        raise ValueError(f"{name} must be a 1-D tensor of length {length}, got shape {tuple(pids.shape)}")
    return pids.to(device=device, dtype=torch.int64)


def _order_keys(scores: torch.Tensor, cols: torch.Tensor, col_bits: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """int64 keys whose ascending order is (row asc,) score desc, gallery index asc.

    Args:
        scores: float32 scores (no NaN), any shape.
        cols: gallery index of each score (broadcastable to ``scores``), ``< 2**col_bits``.
        col_bits: bits reserved for the gallery index.
        rows: optional row of each score, stored above the score bits so that
            keys of different rows never interleave.
    """
    # Adding 0.0 turns -0.0 into +0.0, so both get the same key (they compare equal).
    bits = (scores.to(torch.float32) + 0.0).contiguous().view(torch.int32)
    # IEEE float -> monotone signed int: negative floats have their magnitude bits flipped.
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # Each key holds (2**31 - 1 - monotone) in its high bits (a field in [0, 2**32)) and the
    # column index in its low col_bits bits.
    keys = monotone.to(torch.int64).mul_(-(2**col_bits))
    keys.add_(cols + (2**31 - 1) * 2**col_bits)
    if rows is not None:
        keys.add_(rows << (_SCORE_BITS + col_bits))
    return keys


def _sparse_ranks(
    candidates: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor, pos_rows: torch.Tensor,
    pos_cols: torch.Tensor, col_bits: int,
) -> torch.Tensor:
    """Positive ranks from the (few) candidates, all rows of the chunk at once."""
    num_rows = scores.shape[0]
    num_pos = pos_cols.numel()
    cand_rows, cand_cols = candidates.nonzero(as_tuple=True)
    cand_keys = _order_keys(scores[cand_rows, cand_cols], cand_cols, col_bits, cand_rows)
    # The row is the most significant field, so sorting keeps the per-query grouping.
    pos_keys = torch.sort(_order_keys(scores[pos_rows, pos_cols], pos_cols, col_bits, pos_rows)).values
    # slot(x) = #positive keys < key(x) lies in [start_r, start_r + count_r] for a
    # candidate of row r; adding r gives each row its own count_r + 1 bins.
    slots = torch.searchsorted(pos_keys, cand_keys) + cand_rows
    hist = torch.bincount(slots, minlength=num_pos + num_rows)
    cum = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    starts = counts.cumsum(0) - counts
    # Rank of the g-th sorted positive = candidates of its row in bins start_r..g (+ r),
    # itself included.
    g = torch.arange(num_pos, device=scores.device)
    return cum[g + pos_rows + 1] - cum[starts[pos_rows] + pos_rows]


def _dense_ranks(
    scores: torch.Tensor, counts: torch.Tensor, pos_rows: torch.Tensor, pos_cols: torch.Tensor,
    within: torch.Tensor, col_bits: int,
) -> torch.Tensor:
    """Positive ranks when most of the gallery are candidates: per-row searchsorted."""
    num_rows, num_gallery = scores.shape
    device = scores.device
    max_pos = int(counts.max())
    # Padding with the largest int64 keeps padded rows sorted; no real key reaches it.
    pos_keys = torch.full((num_rows, max_pos), torch.iinfo(torch.int64).max, device=device)
    pos_keys[pos_rows, within] = _order_keys(scores[pos_rows, pos_cols], pos_cols, col_bits)
    pos_keys = torch.sort(pos_keys, dim=1).values
    gallery_index = torch.arange(num_gallery, device=device)
    ranks = torch.empty(num_rows, max_pos, dtype=torch.int64, device=device)
    rows_per_block = max(1, _DENSE_BLOCK_ELEMENTS // max(1, num_gallery))
    for begin in range(0, num_rows, rows_per_block):
        block = slice(begin, begin + rows_per_block)
        # An item's slot is the number of positive keys below its key (0..count_r); the number
        # of items whose slot is at most m is the rank of the m-th positive (itself included).
        slots = torch.searchsorted(pos_keys[block], _order_keys(scores[block], gallery_index, col_bits))
        hist = torch.zeros(slots.shape[0], max_pos + 1, dtype=torch.int64, device=device)
        hist.scatter_add_(1, slots, torch.ones((), dtype=torch.int64, device=device).expand_as(slots))
        ranks[block] = hist.cumsum(1)[:, :max_pos]
    return ranks[pos_rows, within]


def _positive_ranks(scores: torch.Tensor, counts: torch.Tensor, pos_cols: torch.Tensor) -> torch.Tensor:
    """Exact 1-based ranks of every positive of a chunk of queries.

    Args:
        scores: [B, G] float32 scores of B queries (no NaN).
        counts: [B] number of positives of each query (all > 0).
        pos_cols: [N] gallery indices of the positives, grouped by query
            (``counts[0]`` entries for query 0, then query 1, ...).

    Returns:
        [N] int64 ranks, grouped by query like ``pos_cols`` but, within a
        query, in ascending rank order.
    """
    num_rows, num_gallery = scores.shape
    device = scores.device
    col_bits = max(1, (num_gallery - 1).bit_length())
    starts = counts.cumsum(0) - counts
    pos_rows = torch.repeat_interleave(torch.arange(num_rows, device=device), counts)
    within = torch.arange(pos_cols.numel(), device=device) - starts[pos_rows]

    # Only items scoring >= the lowest positive can precede any positive.
    lowest = torch.full((num_rows,), math.inf, device=device)
    lowest.scatter_reduce_(0, pos_rows, scores[pos_rows, pos_cols], reduce="amin")
    candidates = scores >= lowest[:, None]
    # Trained models rank positives high: few candidates, handled sparsely. Weak
    # models leave most of the gallery above some positive: rank densely instead.
    if int(candidates.count_nonzero()) <= _SPARSE_MAX_FRACTION * candidates.numel():
        return _sparse_ranks(candidates, scores, counts, pos_rows, pos_cols, col_bits)
    del candidates
    return _dense_ranks(scores, counts, pos_rows, pos_cols, within, col_bits)


def _rank_metrics_impl(
    score_rows: Callable[[torch.Tensor | slice], torch.Tensor],
    num_queries: int,
    num_gallery: int,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    device: torch.device,
    max_rank: int,
    chunk_size: int,
) -> dict[str, Any]:
    """Shared driver: ``score_rows(query_indices or slice) -> [B, G] float32 scores``."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    col_bits = max(1, (num_gallery - 1).bit_length())
    if col_bits > 31:
        raise ValueError(f"gallery of {num_gallery} items is too large (at most 2**31 supported)")
    # The row field of the order key needs 31 - col_bits bits at most.
    rows_per_chunk = min(chunk_size, 2 ** (31 - col_bits))

    sorted_gallery_pids, gallery_order = torch.sort(gallery_pids, stable=True)
    first_pos = torch.searchsorted(sorted_gallery_pids, query_pids)
    num_pos_all = torch.searchsorted(sorted_gallery_pids, query_pids, right=True) - first_pos
    valid_queries = torch.nonzero(num_pos_all > 0).flatten()
    num_valid = int(valid_queries.numel())
    if num_valid == 0:
        raise ValueError(
            f"none of the {num_queries} queries has a positive in the gallery of {num_gallery} items "
            "(query and gallery identity labels never match)"
        )
    if num_valid < num_queries:
        logger.warning(
            "%d of %d queries have no positive in the gallery and are excluded from the metrics",
            num_queries - num_valid,
            num_queries,
        )

    max_k = max(max_rank, max(_REPORTED_RANKS))
    first_rank_hist = torch.zeros(max_k + 2, dtype=torch.int64, device=device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    all_valid = num_valid == num_queries
    for begin in range(0, num_valid, rows_per_chunk):
        rows = valid_queries[begin : begin + rows_per_chunk]
        # A slice (a view of sim) avoids copying the chunk when no query is excluded.
        scores = score_rows(slice(begin, begin + rows.numel()) if all_valid else rows)
        # The sum is a cheap NaN screen; only a NaN (or +inf plus -inf) makes it NaN.
        if torch.isnan(scores.sum()) and torch.isnan(scores).any():
            raise ValueError(f"similarity scores contain NaN (among query rows {int(rows[0])}..{int(rows[-1])})")
        counts = num_pos_all[rows]
        chunk_starts = counts.cumsum(0) - counts
        num_pos = int(chunk_starts[-1] + counts[-1])
        within = torch.arange(num_pos, device=device) - torch.repeat_interleave(chunk_starts, counts)
        pos_cols = gallery_order[torch.repeat_interleave(first_pos[rows], counts) + within]
        ranks = _positive_ranks(scores, counts, pos_cols)

        precision = (within + 1).to(torch.float64) / ranks.to(torch.float64)
        ap = torch.zeros(rows.numel(), dtype=torch.float64, device=device)
        ap.index_add_(0, torch.repeat_interleave(torch.arange(rows.numel(), device=device), counts), precision)
        ap_sum += (ap / counts).sum()
        inp_sum += (counts.to(torch.float64) / ranks[chunk_starts + counts - 1]).sum()
        first_rank_hist += torch.bincount(ranks[chunk_starts].clamp(max=max_k + 1), minlength=max_k + 2)

    cmc = (first_rank_hist[1:].cumsum(0)[:max_k].to(torch.float64) * (100.0 / num_valid)).tolist()
    result: dict[str, Any] = {f"R{k}": cmc[k - 1] for k in _REPORTED_RANKS}
    result["mAP"] = float(ap_sum) * 100.0 / num_valid
    result["mINP"] = float(inp_sum) * 100.0 / num_valid
    result["cmc"] = cmc[:max_rank]
    result["num_queries"] = num_queries
    result["num_valid"] = num_valid
    return result


def rank_metrics(
    sim: torch.Tensor,
    query_pids: torch.Tensor | Sequence[int],
    gallery_pids: torch.Tensor | Sequence[int],
    *,
    max_rank: int = 10,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Ranking metrics of a query x gallery similarity matrix.

    Text-to-image when ``sim`` is (captions x images); for image-to-text use
    :func:`rank_metrics_i2t`. Runs on the device of ``sim``; the pids are
    moved there.

    Args:
        sim: [Q, G] similarity scores (higher = more similar), any float dtype.
        query_pids: [Q] integer identity of each query.
        gallery_pids: [G] integer identity of each gallery item.
        max_rank: length of the returned ``cmc`` curve.
        chunk_size: queries ranked at a time. Extra memory is O(chunk_size x G):
            a boolean mask, the chunk's scores as float32 (a view, not a copy,
            when ``sim`` is float32 and every query has a positive), then either
            ~40 bytes per candidate (items scoring at least as high as a query's
            lowest positive; at most a third of the chunk) or ~100 MiB of dense
            work buffers.

    Returns:
        ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP`` (percent floats), ``cmc``
        (list of ``max_rank`` percentages, R@1..R@max_rank), ``num_queries``
        and ``num_valid`` (queries with at least one positive; the others are
        excluded).

    Raises:
        ValueError: on shape/dtype mismatch, NaN scores, or when no query has a
            positive.
    """
    if not isinstance(sim, torch.Tensor) or sim.dim() != 2 or not sim.is_floating_point():
        raise ValueError(
            "sim must be a 2-D floating-point tensor [queries, gallery], got "
            f"{type(sim).__name__} {tuple(sim.shape) if isinstance(sim, torch.Tensor) else ''}".rstrip()
        )
    num_queries, num_gallery = sim.shape
    query_pids = _check_pids(query_pids, "query_pids", num_queries, sim.device)
    gallery_pids = _check_pids(gallery_pids, "gallery_pids", num_gallery, sim.device)

    def score_rows(rows: torch.Tensor | slice) -> torch.Tensor:
        selected = sim[rows] if isinstance(rows, slice) else sim.index_select(0, rows)
        return selected.to(torch.float32)

    return _rank_metrics_impl(
        score_rows, num_queries, num_gallery, query_pids, gallery_pids, sim.device, max_rank, chunk_size
    )


def rank_metrics_i2t(
    sim: torch.Tensor,
    text_pids: torch.Tensor | Sequence[int],
    image_pids: torch.Tensor | Sequence[int],
    *,
    max_rank: int = 10,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Image-to-text metrics from the same (captions x images) matrix.

    Equivalent to ``rank_metrics(sim.T, image_pids, text_pids)``: images are
    the queries, captions the gallery.

    Args:
        sim: [T, I] caption x image similarities (as for text-to-image).
        text_pids: [T] identity of each caption.
        image_pids: [I] identity of each image.
        max_rank: length of the returned ``cmc`` curve.
        chunk_size: images ranked at a time.
    """
    if not isinstance(sim, torch.Tensor) or sim.dim() != 2:
        raise ValueError(f"sim must be a 2-D tensor [captions, images], got {type(sim).__name__}")
    return rank_metrics(sim.T, image_pids, text_pids, max_rank=max_rank, chunk_size=chunk_size)


def rank_metrics_from_features(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor | Sequence[int],
    gallery_pids: torch.Tensor | Sequence[int],
    *,
    max_rank: int = 10,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Like :func:`rank_metrics` with ``sim = query_feats @ gallery_feats.T``, never materialised.

    The similarity of each chunk of queries is computed on the fly (in the
    features' dtype, then widened to float32), so memory stays
    O(chunk_size x G) even for galleries whose full matrix would not fit.
    Features are used as given: L2-normalise them first for cosine similarity.
    For image-to-text, pass the image features/pids as the query side.

    Args:
        query_feats: [Q, D] query features.
        gallery_feats: [G, D] gallery features (same device and dtype).
        query_pids: [Q] integer identity of each query.
        gallery_pids: [G] integer identity of each gallery item.
        max_rank: length of the returned ``cmc`` curve.
        chunk_size: queries scored and ranked at a time.
    """
    for name, feats in (("query_feats", query_feats), ("gallery_feats", gallery_feats)):
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or not feats.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating-point tensor [N, D], got {type(feats).__name__}")
    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(
            f"feature sizes differ: query_feats has {query_feats.shape[1]} dims, "
            f"gallery_feats has {gallery_feats.shape[1]}"
        )
    if query_feats.device != gallery_feats.device or query_feats.dtype != gallery_feats.dtype:
        raise ValueError(
            f"query_feats ({query_feats.dtype}, {query_feats.device}) and gallery_feats "
            f"({gallery_feats.dtype}, {gallery_feats.device}) must share dtype and device"
        )
    num_queries, num_gallery = query_feats.shape[0], gallery_feats.shape[0]
    device = query_feats.device
    query_pids = _check_pids(query_pids, "query_pids", num_queries, device)
    gallery_pids = _check_pids(gallery_pids, "gallery_pids", num_gallery, device)
    gallery_t = gallery_feats.T

    def score_rows(rows: torch.Tensor | slice) -> torch.Tensor:
        selected = query_feats[rows] if isinstance(rows, slice) else query_feats.index_select(0, rows)
        return (selected @ gallery_t).to(torch.float32)

    return _rank_metrics_impl(
        score_rows, num_queries, num_gallery, query_pids, gallery_pids, device, max_rank, chunk_size
    )


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Render ``{task: metrics}`` as a ``task | R1 | R5 | R10 | mAP | mINP`` table.

    Args:
        rows: task name (e.g. ``"t2i"``) -> a dict holding at least the five
            metric keys (extra keys are ignored); values printed with 2 decimals.
    """
    table = PrettyTable(["task", *TABLE_COLUMNS])
    for task, metrics in rows.items():
        missing = [key for key in TABLE_COLUMNS if key not in metrics]
        if missing:
            raise ValueError(f"metrics of task {task!r} lack {missing}; expected keys {list(TABLE_COLUMNS)}")
        table.add_row([task, *(f"{float(metrics[key]):.2f}" for key in TABLE_COLUMNS)])
    return table.get_string()
