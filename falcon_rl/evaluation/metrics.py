"""Retrieval metrics of an image-caption score matrix: recall@K, RSUM, FN-aware recall, mAP@R.

Ties are broken pessimistically: items are ranked by a stable sort on score, descending,
in which every incorrect item comes before a correct item of equal score. When every
score is equal, a query's first correct item therefore ranks after all its incorrect items.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from math import comb

import numpy as np
import torch

from falcon_rl.evaluation.errors import EvaluationError

RECALL_KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")

# Queries are processed in blocks of this many rows, which bounds each int64 index
# temporary of a 5,000-image x 25,000-caption split at about 200 MB.
_QUERY_BLOCK = 1024


def retrieval_metrics(
    sim: np.ndarray | torch.Tensor,
    caption_image: np.ndarray,
    human_matches: np.ndarray | None,
    *,
    t2i_sim: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float | None]:
    """Compute image-to-text and text-to-image retrieval metrics, in percent.

    Standard recall counts a caption as correct for an image when it is one of the image's
    own captions. FN-aware recall and mAP@R (Chun et al., 2022, "ECCV Caption", arXiv 2204.03359) also count
    the captions of other images that people judged to match it, in both directions.

    :param sim: scores ``[n_images, n_captions]``, higher is more similar. It ranks the
        captions of each image and, unless ``t2i_sim`` is given, the images of each caption.
    :param caption_image: int array ``[n_captions]``, the index of each caption's own image.
        Every image must have at least one caption.
    :param human_matches: int array ``[m, 2]`` of (image index, caption index) pairs judged
        to match, or ``None`` when there are no judgments. With ``None`` the ``fn_*`` and
        ``*_map_r`` values are ``None``.
    :param t2i_sim: scores ``[n_images, n_captions]`` that rank the images of each caption,
        used when text-to-image ranking differs from image-to-text ranking (ITM re-ranking).
    :return: ``i2t_r1``, ``i2t_r5``, ``i2t_r10``, ``t2i_r1``, ``t2i_r5``, ``t2i_r10``,
        ``rsum`` (sum of the six), ``chance_rsum`` (expected RSUM of a uniformly random
        ranking), ``fn_i2t_r1`` ... ``fn_t2i_r10``, ``fn_rsum``, ``i2t_map_r`` and ``t2i_map_r``.
    """
    i2t_scores = _as_scores(sim, "sim")
    t2i_scores = i2t_scores if t2i_sim is None else _as_scores(t2i_sim, "t2i_sim")
    if t2i_scores.shape != i2t_scores.shape:
        raise EvaluationError(
            f"t2i_sim must have the shape of sim {tuple(i2t_scores.shape)}, "
            f"got {tuple(t2i_scores.shape)}"
        )
    n_images, n_captions = i2t_scores.shape
    caption_image = _validate_caption_image(caption_image, n_images, n_captions)
    captions_per_image = np.bincount(caption_image, minlength=n_images)
    if (captions_per_image == 0).any():
        missing = int(np.flatnonzero(captions_per_image == 0)[0])
        raise EvaluationError(f"every image needs at least one caption, image {missing} has none")

    own = torch.zeros(n_images, n_captions, dtype=torch.bool, device=i2t_scores.device)
    caption_index = torch.arange(n_captions, device=own.device)
    own[torch.as_tensor(caption_image, device=own.device), caption_index] = True

    metrics: dict[str, float | None] = _recall_metrics(i2t_scores, t2i_scores, own, prefix="")
    metrics["chance_rsum"] = chance_rsum(captions_per_image, n_images)

    if human_matches is None:
        for key in _recall_keys(prefix="fn_"):
            metrics[key] = None
        metrics["i2t_map_r"] = None
        metrics["t2i_map_r"] = None
        return metrics

    # A caption judged to match an image is correct for it in both directions.
    matches = _validate_human_matches(human_matches, n_images, n_captions)
    correct = own.clone()
    match_tensor = torch.as_tensor(matches, device=own.device)
    correct[match_tensor[:, 0], match_tensor[:, 1]] = True
    metrics.update(_recall_metrics(i2t_scores, t2i_scores, correct, prefix="fn_"))
    metrics["i2t_map_r"] = map_at_r(i2t_scores, correct)
    metrics["t2i_map_r"] = map_at_r(t2i_scores.T, correct.T)
    return metrics


def recall_at_k(
    scores: torch.Tensor, correct: torch.Tensor, ks: tuple[int, ...] = RECALL_KS
) -> dict[int, float]:
    """Compute the percentage of queries with a correct item among their top K, for each K.

    :param scores: ``[n_queries, n_items]``, one row per query, higher ranks first.
    :param correct: bool ``[n_queries, n_items]``; every row needs at least one ``True``.
    :param ks: the cut-offs K.
    :return: recall@K in percent by K.
    """
    first_rank = torch.cat([
        _first_correct_rank(scores[start:start + _QUERY_BLOCK], correct[start:start + _QUERY_BLOCK])
        for start in range(0, scores.shape[0], _QUERY_BLOCK)
    ])
    n_queries = len(first_rank)
    return {k: 100.0 * int((first_rank < k).sum()) / n_queries for k in ks}


def map_at_r(scores: torch.Tensor, correct: torch.Tensor) -> float:
    """Compute mAP@R in percent, as defined for ECCV Caption (Chun et al., 2022).

    For a query with R correct items, AP@R is the sum of precision@i over the ranks
    i <= R that hold a correct item, divided by R. mAP@R is its mean over queries.

    :param scores: ``[n_queries, n_items]``, one row per query, higher ranks first.
    :param correct: bool ``[n_queries, n_items]``; every row needs at least one ``True``.
    """
    average_precision = torch.cat([
        _average_precision_at_r(scores[start:start + _QUERY_BLOCK], correct[start:start + _QUERY_BLOCK])
        for start in range(0, scores.shape[0], _QUERY_BLOCK)
    ])
    return 100.0 * average_precision.mean().item()


def chance_rsum(captions_per_image: np.ndarray, n_images: int) -> float:
    """Compute the expected RSUM, in percent, of a ranking drawn uniformly at random.

    An image with g own captions among n_c is found in the top K with probability
    1 - C(n_c - g, K) / C(n_c, K); a caption finds its image with probability
    min(K / n_images, 1). The sum is exact (rational arithmetic) before the final rounding.

    :param captions_per_image: int array ``[n_images]``, the number of own captions of each image.
    :param n_images: the number of images ranked for each caption.
    """
    n_captions = int(np.sum(captions_per_image))
    caption_counts = Counter(int(g) for g in captions_per_image)
    total = Fraction(0)
    for k in RECALL_KS:
        k_captions = min(k, n_captions)
        misses = sum(
            (count * Fraction(comb(n_captions - g, k_captions), comb(n_captions, k_captions))
             for g, count in caption_counts.items()),
            Fraction(0),
        )
        total += 1 - misses / len(captions_per_image)
        total += min(Fraction(k, n_images), Fraction(1))
    return float(100 * total)


def _recall_keys(prefix: str) -> list[str]:
    keys = [f"{prefix}{direction}_r{k}" for direction in DIRECTIONS for k in RECALL_KS]
    return keys + [f"{prefix}rsum"]


def _recall_metrics(
    i2t_scores: torch.Tensor, t2i_scores: torch.Tensor, correct: torch.Tensor, prefix: str
) -> dict[str, float | None]:
    recalls = {
        "i2t": recall_at_k(i2t_scores, correct),
        "t2i": recall_at_k(t2i_scores.T, correct.T),
    }
    metrics: dict[str, float | None] = {}
    for direction in DIRECTIONS:
        for k in RECALL_KS:
            metrics[f"{prefix}{direction}_r{k}"] = recalls[direction][k]
    metrics[f"{prefix}rsum"] = sum(recalls[direction][k] for direction in DIRECTIONS for k in RECALL_KS)
    return metrics


def _first_correct_rank(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    # The best-scored correct item comes after every item that scores higher and, under
    # pessimistic ties, after every incorrect item with the same score.
    best_correct = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best_correct) & ~correct).sum(dim=1)


def _pessimistic_order(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    # Two stable sorts give a lexicographic order: score descending, then incorrect first.
    incorrect_first = torch.sort(correct.to(torch.uint8), dim=1, stable=True).indices
    by_score = torch.sort(scores.gather(1, incorrect_first), dim=1, descending=True, stable=True).indices
    return incorrect_first.gather(1, by_score)


def _average_precision_at_r(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    n_correct = correct.sum(dim=1)
    r_max = int(n_correct.max())
    order = _pessimistic_order(scores, correct)[:, :r_max]
    positions = torch.arange(1, r_max + 1, device=scores.device)
    hits = correct.gather(1, order) & (positions <= n_correct[:, None])
    precision = hits.cumsum(dim=1).double() / positions
    return (precision * hits).sum(dim=1) / n_correct


def _as_scores(sim: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    scores = torch.as_tensor(sim)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise EvaluationError(
            f"{name} must be a non-empty matrix [n_images, n_captions], got shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        scores = scores.double()
    elif scores.dtype in (torch.float16, torch.bfloat16):
        # Widening is exact, so ties in the input remain ties.
        scores = scores.float()
    if not torch.isfinite(scores).all():
        raise EvaluationError(f"{name} contains NaN or infinite scores")
    return scores


def _validate_caption_image(caption_image: np.ndarray, n_images: int, n_captions: int) -> np.ndarray:
    caption_image = np.asarray(caption_image)
    if caption_image.shape != (n_captions,) or not np.issubdtype(caption_image.dtype, np.integer):
        raise EvaluationError(
            f"caption_image must be an int array [{n_captions}], "
            f"got {caption_image.dtype} {caption_image.shape}"
        )
    if caption_image.min() < 0 or caption_image.max() >= n_images:
        raise EvaluationError(
            f"caption_image must lie in [0, {n_images}), got [{caption_image.min()}, {caption_image.max()}]"
        )
    return caption_image.astype(np.int64)


def _validate_human_matches(human_matches: np.ndarray, n_images: int, n_captions: int) -> np.ndarray:
    matches = np.asarray(human_matches)
    if matches.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if matches.ndim != 2 or matches.shape[1] != 2 or not np.issubdtype(matches.dtype, np.integer):
        raise EvaluationError(
            f"human_matches must be an int array [m, 2], got {matches.dtype} {matches.shape}"
        )
    images, captions = matches[:, 0], matches[:, 1]
    if images.min() < 0 or images.max() >= n_images or captions.min() < 0 or captions.max() >= n_captions:
        raise EvaluationError(
            f"human_matches must index images in [0, {n_images}) and captions in [0, {n_captions})"
        )
    return matches.astype(np.int64)
