"""Certified bfloat16 candidate search: the float32 top-k from a bfloat16 matrix product.

On CPUs with AVX512-BF16 or AMX, a bfloat16 matrix product runs several
times faster than a float32 one. A ``[4032, 512] x [512, 64]`` product took
1.2 to 1.6 ms against 2.9 to 4.6 ms on one core of a shared 2-core AMD EPYC
(torch 2.13 with oneDNN). Its scores have 8 significant bits, so the search
uses them only to find the keys that could be among the k best, and
re-scores those in float32. Per anchor, in units of the inner product
``q . k`` (twice the similarity s):

1. Score every pool key in bfloat16: ``t_j = bf16(bf16(q) . bf16(k_j))``,
   the products summed in float32 and the sum rounded to bfloat16.
2. Re-score in float32 every key with ``t_j >= L``, where L is the k-th
   largest of the maxima of blocks of 32 keys. At least k keys reach L, and
   L costs one pass over the scores instead of a top-k. ``thr`` is the k-th
   best of these float32 scores.
3. Re-score in float32 every other key with ``t_j >= tau``, where ``tau``
   is chosen so that a key with ``t_j < tau`` has a float32 score below
   ``thr`` (the certificate, below). Such a key cannot be among the k best.
4. Return the k best re-scored keys by float32 score, ties broken by the
   smaller pair index.

One pass over the scores collects the keys of steps 2 and 3 at once: those
at or above ``f^-1(L - v |L| - 2E)`` (notation below), a lower bound of
``tau``. An anchor with more than ``max_rescored`` keys there (many scores
within the rounding error of each other) is re-scored against the whole
pool with one float32 product instead and counted as a certificate fallback.

The float32 score of a key is ``i2t + t2i``, the two half inner products
<img_a, txt_c> and <txt_a, img_c> summed in float32. A float32 search ranks
keys by its own float32 product, which sums in another order, so the two
can rank keys differently only where their scores lie within float32
rounding error of each other (about 1e-7 for unit vectors).

Error bound. With ``qr = bf16(q)``, ``kr = bf16(k)``, u = 2^-8 and
e = 2^-24 (the unit roundoffs of bfloat16 and float32), n = 2d and
``g = n e / (1 - n e)``:

- input rounding, by Cauchy-Schwarz:
  ``|qr . kr - q . k| <= |qr| |kr - k| + |qr - q| |k|``. The key cache
  stores the norms ``|k|`` and ``|kr - k|`` of every key, so the bound uses
  the measured rounding errors (about 0.4 u |k|) instead of the worst case
  u |k|.
- summation in float32 of the bfloat16 products, which are exact in float32:
  ``<= g |qr| |kr|``.
- the float32 re-scoring that the result is ranked by: ``<= g |q| |k|``.
- flushing of subnormal numbers by the bfloat16 instructions:
  ``<= 2^-126 (sqrt(n) (|qr| + |kr|) + n)``.
- rounding of the sum to bfloat16: ``|t - sum| <= 2u |sum|``, which also
  covers a conversion that truncates instead of rounding to nearest. So
  ``t - v |t| <= sum <= t + v |t|`` with ``v = 2u / (1 - 2u)``.

Let ``E`` be the sum of the first four terms, with the pool's largest
``|k|`` and ``|kr - k|``, times a safety factor of 1.25 (which also covers
computing the norms in float32). Then a key's float32 score lies within
``[t - v |t| - E, f(t) + E]`` with ``f(t) = t + v |t|``. ``f`` is increasing,
so ``tau = f^-1(thr - E)``, rounded down to float32, certifies step 3.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

BFLOAT16_UNIT_ROUNDOFF = 2.0 ** -8
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
SMALLEST_NORMAL_FLOAT32 = 2.0 ** -126
SAFETY_FACTOR = 1.25

# Rounding of a float32 sum to bfloat16, allowing truncation: |t - sum| <= 2u |sum|.
_OUTPUT_ROUNDING = 2.0 * BFLOAT16_UNIT_ROUNDOFF
_OUTPUT_SLOPE = _OUTPUT_ROUNDING / (1.0 - _OUTPUT_ROUNDING)

# Keys per block of the lower bound L of the k-th best score.
_BLOCK_SIZE = 32

# bfloat16 must beat float32 by this factor in the start-up timing to be used by default.
_REQUIRED_SPEEDUP = 1.25


@dataclass
class CertifiedTopK:
    """Result of :func:`certified_top_k` for A anchors.

    - ``slots``: int64 ``[A, k]`` key rows (cache slots), best first, -1 pads.
    - ``scores``: float32 ``[A, k]`` float32 scores ``q . k``, -inf pads.
    - ``i2t`` and ``t2i``: float32 ``[A, k]`` the two halves of each score,
      <img_a, txt_c> and <txt_a, img_c> (0 at pads); ``scores = i2t + t2i``.
    - ``rescored_keys``: keys re-scored in float32 at steps 2 and 3.
    - ``second_pass_anchors``: anchors with keys re-scored at step 3.
    - ``second_pass_keys``: keys re-scored at step 3.
    - ``full_row_anchors``: anchors re-scored against the whole pool (certificate fallbacks).
    """

    slots: np.ndarray
    scores: np.ndarray
    i2t: np.ndarray
    t2i: np.ndarray
    rescored_keys: int
    second_pass_anchors: int
    second_pass_keys: int
    full_row_anchors: int


def certified_top_k(
    rounded_scores: torch.Tensor,
    queries: np.ndarray,
    keys: np.ndarray,
    slot_pairs: np.ndarray,
    k: int,
    key_norms: tuple[float, float],
    exact_rows: Callable[[np.ndarray], torch.Tensor],
    max_rescored: int | None = None,
) -> CertifiedTopK:
    """Return the k best keys per anchor by float32 score, from bfloat16 scores (steps 2-4 above).

    :param rounded_scores: float32 ``[C, A]`` (key-major) bfloat16 scores
        ``t`` converted to float32, -inf at keys that must not be returned
        (positives, free slots).
    :param queries: float32 queries ``[A, 2d]``.
    :param keys: float32 keys ``[C, 2d]`` (the cache rows).
    :param slot_pairs: int64 ``[C]`` pair index of each key row, for breaking ties.
    :param k: keys returned per anchor.
    :param key_norms: the largest ``|k|`` and ``|bf16(k) - k|`` over the eligible keys.
    :param exact_rows: given anchor rows, returns their float32 scores
        ``[len(rows), C]`` against all keys, -inf where ``rounded_scores`` is.
    :param max_rescored: keys an anchor may re-score before it falls back to
        a whole-row float32 product; None: ``max(4 k, C // 16)``.
    """
    n_keys, n_anchors = rounded_scores.shape
    k = min(k, n_keys)
    max_rescored = max(4 * k, n_keys // 16) if max_rescored is None else max_rescored
    margins = rounding_margins(queries, *key_norms)

    # Every key that steps 2 and 3 can need, grouped by anchor.
    block_floor = _kth_block_maximum(rounded_scores, k)
    full = ~np.isfinite(block_floor)
    lowest = rescoring_thresholds(_lower_score(block_floor) - margins, margins)
    lowest[full] = np.inf
    rounded = rounded_scores.numpy()
    entries = np.flatnonzero(rounded >= lowest)
    entry_anchors = entries % n_anchors
    full |= np.bincount(entry_anchors, minlength=n_anchors) > max_rescored
    if full.any():
        entries = entries[~full[entry_anchors]]
        entry_anchors = entries % n_anchors
    entry_slots = entries // n_anchors
    # Anchor-major order; each anchor's keys stay in slot order.
    entry_anchors, entry_slots = np.divmod(np.sort(entry_anchors * n_keys + entry_slots), n_keys)
    entry_rounded = rounded[entry_slots, entry_anchors]

    # Step 2: re-score the keys at or above L; thr is the k-th best of them.
    first = entry_rounded >= block_floor[entry_anchors]
    slots, halves = _rescore(queries, keys, entry_slots[first], entry_anchors[first], n_anchors, k)
    scores = _scores(slots, halves)
    thresholds = -np.partition(-scores, k - 1, axis=1)[:, k - 1]

    # Step 3: re-score the others that could beat thr.
    second = ~first & (entry_rounded >= rescoring_thresholds(thresholds, margins)[entry_anchors])
    second_anchors = entry_anchors[second]
    if second_anchors.size:
        more_slots, more_halves = _rescore(queries, keys, entry_slots[second], second_anchors, n_anchors, 0)
        slots = np.concatenate([slots, more_slots], axis=1)
        halves = np.concatenate([halves, more_halves], axis=1)
        scores = np.concatenate([scores, _scores(more_slots, more_halves)], axis=1)

    # Step 4: the fallback rows, then the k best of every row.
    full_rows = np.flatnonzero(full)
    if full_rows.size:
        _rescore_full_rows(full_rows, exact_rows(full_rows), k, queries, keys, slots, halves, scores)
    pairs = np.where(slots >= 0, slot_pairs[np.maximum(slots, 0)], np.iinfo(np.int64).max)
    order = np.lexsort((pairs, -scores), axis=1)[:, :k]
    return CertifiedTopK(
        slots=np.take_along_axis(slots, order, axis=1),
        scores=np.take_along_axis(scores, order, axis=1),
        i2t=np.take_along_axis(halves[..., 1], order, axis=1),
        t2i=np.take_along_axis(halves[..., 0], order, axis=1),
        rescored_keys=int(entry_slots.size - (~first & ~second).sum()),
        second_pass_anchors=int(np.count_nonzero(np.bincount(second_anchors, minlength=n_anchors))),
        second_pass_keys=int(second_anchors.size),
        full_row_anchors=int(full_rows.size),
    )


def _kth_block_maximum(rounded_scores: torch.Tensor, k: int) -> np.ndarray:
    """Return per anchor the k-th largest block maximum (-inf when fewer than k blocks have eligible keys).

    Blocks are 32 consecutive keys, fewer in small pools so that there are
    at least 4 k blocks.
    """
    n_keys, n_anchors = rounded_scores.shape
    block = max(1, min(_BLOCK_SIZE, n_keys // (4 * k)))
    n_full = n_keys // block
    maxima = rounded_scores[: n_full * block].view(n_full, block, n_anchors).amax(dim=1)
    if n_full * block < n_keys:
        maxima = torch.cat([maxima, rounded_scores[n_full * block :].amax(dim=0, keepdim=True)])
    n_blocks = maxima.shape[0]
    if n_blocks < k:
        return np.full(n_anchors, -np.inf, dtype=np.float32)
    return np.partition(maxima.numpy(), n_blocks - k, axis=0)[n_blocks - k]


def _lower_score(rounded: np.ndarray) -> np.ndarray:
    """Return ``t - v |t|``, a lower bound of the float32 sum that was rounded to the bfloat16 score ``t``."""
    rounded = rounded.astype(np.float64)
    return rounded - _OUTPUT_SLOPE * np.abs(rounded)


def _rescore(
    queries: np.ndarray, keys: np.ndarray, slots: np.ndarray, anchors: np.ndarray, n_anchors: int, min_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score (anchor, key) entries sorted by anchor, laid out as rows.

    :return: ``slots`` int64 ``[A, W]`` (W >= min_width, -1 pads) and
        ``halves`` float32 ``[A, W, 2]``, the inner products of the queries'
        and keys' first and second halves (0 at pads).
    """
    counts = np.bincount(anchors, minlength=n_anchors)
    width = max(min_width, int(counts.max(initial=0)))
    within = np.arange(anchors.size) - np.repeat(np.cumsum(counts) - counts, counts)
    padded = np.full((n_anchors, width), -1, dtype=np.int64)
    padded[anchors, within] = slots

    half = queries.shape[1] // 2
    rows = np.take(keys, np.maximum(padded, 0).reshape(-1), axis=0).reshape(n_anchors, width, 2, half)
    # [A, 2, W, d] x [A, 2, d, 1]: one matrix-vector product per anchor and half.
    halves = np.matmul(rows.transpose(0, 2, 1, 3), queries.reshape(n_anchors, 2, half, 1))[..., 0]
    halves = np.ascontiguousarray(halves.transpose(0, 2, 1))
    halves[padded < 0] = 0.0
    return padded, halves


def _scores(slots: np.ndarray, halves: np.ndarray) -> np.ndarray:
    return np.where(slots >= 0, halves[..., 0] + halves[..., 1], -np.inf).astype(np.float32)


def _rescore_full_rows(
    full_rows: np.ndarray,
    exact: torch.Tensor,
    k: int,
    queries: np.ndarray,
    keys: np.ndarray,
    slots: np.ndarray,
    halves: np.ndarray,
    scores: np.ndarray,
) -> None:
    """Replace the rows of the given anchors by their float32 top k over the whole pool (in place)."""
    best, top = exact.topk(k, dim=1)
    top = np.where(np.isfinite(best.numpy()), top.numpy(), -1)
    found = top >= 0
    row_slots, row_halves = _rescore(queries[full_rows], keys, top[found],
                                     np.nonzero(found)[0], full_rows.size, k)
    slots[full_rows] = -1
    halves[full_rows] = 0.0
    scores[full_rows] = -np.inf
    slots[full_rows, :k] = row_slots[:, :k]
    halves[full_rows, :k] = row_halves[:, :k]
    scores[full_rows, :k] = _scores(row_slots, row_halves)[:, :k]


def rounding_margins(queries: np.ndarray, key_norm: float, key_rounding_norm: float) -> np.ndarray:
    """Return, per query, the bound ``E`` on a float32 score minus its bfloat16 estimate (see the module docstring).

    The norms are computed in float32, whose relative error (below 1e-4
    for n up to 4,096) the safety factor covers.

    :param queries: float32 queries ``[A, n]``.
    :param key_norm: the largest key norm ``|k|`` of the pool.
    :param key_rounding_norm: the largest ``|bf16(k) - k|`` of the pool.
    :return: float64 ``[A]``, with the safety factor applied.
    """
    n = queries.shape[1]
    exact = np.ascontiguousarray(queries, dtype=np.float32)
    rounded = torch.from_numpy(exact).bfloat16().float().numpy()
    # The difference of a float32 number and its bfloat16 rounding is exact in float32.
    error = rounded - exact
    query_norm, rounded_norm, query_rounding_norm = (
        np.sqrt(np.einsum("ij,ij->i", rows, rows).astype(np.float64)) for rows in (exact, rounded, error)
    )
    rounded_key_norm = key_norm + key_rounding_norm
    gamma = n * FLOAT32_UNIT_ROUNDOFF / (1.0 - n * FLOAT32_UNIT_ROUNDOFF)

    input_rounding = rounded_norm * key_rounding_norm + query_rounding_norm * key_norm
    summation = gamma * rounded_norm * rounded_key_norm
    rescoring = gamma * query_norm * key_norm
    flushing = SMALLEST_NORMAL_FLOAT32 * (math.sqrt(n) * (rounded_norm + rounded_key_norm) + n)
    return SAFETY_FACTOR * (input_rounding + summation + rescoring + flushing)


def rescoring_thresholds(thresholds: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """Return ``tau = f^-1(thr - E)`` per anchor as float32, rounded down (see the module docstring).

    :param thresholds: float ``[A]`` per anchor, ``thr`` or a lower bound of it.
    :param margins: float64 ``[A]`` from :func:`rounding_margins`.
    """
    target = np.asarray(thresholds, dtype=np.float64) - margins
    with np.errstate(invalid="ignore"):
        tau = np.where(target >= 0.0, target / (1.0 + _OUTPUT_SLOPE), target / (1.0 - _OUTPUT_SLOPE))
    rounded = tau.astype(np.float32)
    # A float32 tau above the float64 one would skip keys on the boundary.
    return np.where(rounded > tau, np.nextafter(rounded, np.float32(-np.inf)), rounded)


def cpu_has_fast_bfloat16() -> bool:
    """Return whether torch reports AVX512-BF16 or AMX on this CPU.

    The checks are private helpers of ``torch.cpu`` (present in torch 2.13);
    a missing helper counts as no.
    """
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


@functools.cache
def bfloat16_matmul_is_faster() -> bool:
    """Return whether bfloat16 products of the search's shape run faster than float32 ones here.

    Checked once per process: the CPU must report bfloat16 instructions, and a
    ``[4096, 512] x [512, 64]`` product, best of five, must run at least 1.25
    times faster in bfloat16 than in float32 at torch's current thread count.
    """
    if not cpu_has_fast_bfloat16():
        logger.info("bfloat16 search off: torch reports neither AVX512-BF16 nor AMX on this CPU")
        return False
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(64, 512, generator=generator)
    keys = torch.randn(4096, 512, generator=generator)
    float32_seconds = _best_seconds(lambda: keys @ queries.T)
    queries, keys = queries.bfloat16(), keys.bfloat16()
    bfloat16_seconds = _best_seconds(lambda: keys @ queries.T)
    faster = bfloat16_seconds * _REQUIRED_SPEEDUP < float32_seconds
    logger.info("bfloat16 search %s: one product took %.2f ms in bfloat16 and %.2f ms in float32",
                "on" if faster else "off", 1e3 * bfloat16_seconds, 1e3 * float32_seconds)
    return faster


def _best_seconds(product: Callable[[], torch.Tensor], repeats: int = 5) -> float:
    product()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best
