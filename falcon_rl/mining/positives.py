"""Removing an anchor's positives (pairs of its own image_id) from search results."""

from __future__ import annotations

import numpy as np


def same_group_counts(query_groups: np.ndarray, key_groups: np.ndarray) -> np.ndarray:
    """Return, per query, how many keys share its group."""
    groups, group_sizes = np.unique(key_groups, return_counts=True)
    if groups.size == 0:
        return np.zeros(len(query_groups), dtype=np.int64)
    slot = np.clip(np.searchsorted(groups, query_groups), 0, len(groups) - 1)
    return np.where(groups[slot] == query_groups, group_sizes[slot], 0)


class GroupIndex:
    """The pairs of every group (image_id), for finding an anchor's positives without a search.

    :param groups: int64 ``[N]`` group of every pair.
    """

    def __init__(self, groups: np.ndarray) -> None:
        self.groups = groups
        self._order = np.argsort(groups, kind="stable")
        self._sorted = groups[self._order]

    def members(self, query_groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (query row, pair index) for every pair of each query's group, as two int64 arrays."""
        first = np.searchsorted(self._sorted, query_groups, side="left")
        counts = np.searchsorted(self._sorted, query_groups, side="right") - first
        return _expand_runs(first, counts, self._order)


def same_group_entries(query_groups: np.ndarray, key_groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the (query, key) index pairs whose groups are equal, as two int64 arrays."""
    order = np.argsort(key_groups, kind="stable")
    sorted_groups = key_groups[order]
    first = np.searchsorted(sorted_groups, query_groups, side="left")
    counts = np.searchsorted(sorted_groups, query_groups, side="right") - first
    return _expand_runs(first, counts, order)


def _expand_runs(first: np.ndarray, counts: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (row, order[first[row] + j]) for j < counts[row], for every row, as two int64 arrays."""
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)

    rows = np.repeat(np.arange(len(counts)), counts)
    # Position of each entry within its row's run.
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, order[np.repeat(first, counts) + offsets]


def drop_same_group(
    found: np.ndarray, scores: np.ndarray, query_groups: np.ndarray, found_groups: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove results of the query's own group and -1 results, keeping the first ``k`` others in order.

    :param found: int ``[A, R]`` results per query, best first, -1 pads.
    :param scores: float ``[A, R]`` their scores.
    :param query_groups: int64 ``[A]`` group of each query.
    :param found_groups: int64 ``[A, R]`` group of each result (any value at -1 pads).
    :param k: results kept per query.
    :return: ``found`` int64 ``[A, min(k, R)]`` with -1 pads, and the matching float32 ``scores``.
    """
    valid = (found >= 0) & (found_groups != query_groups[:, None])
    # A stable sort on ~valid moves the valid results to the front in their
    # similarity order.
    keep = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    found = np.take_along_axis(found, keep, axis=1).astype(np.int64)
    scores = np.take_along_axis(scores, keep, axis=1).astype(np.float32)
    found[~np.take_along_axis(valid, keep, axis=1)] = -1
    return found, scores
