"""Choice of one negative per anchor from its candidate list by hardness level.

Anchors choose in order. Anchor i picks, among its candidates that are
eligible (not padded, not excluded) and not yet taken by an earlier anchor of
the batch, the one at rank ``hardness_to_rank(q_i, m)`` of the m free ones,
which are sorted by similarity in descending order. An anchor with no free
candidate is "exhausted" and gets its negative from a fallback callable.

:func:`choose_negatives_reference` is the plain loop that defines the rule.
:func:`choose_negatives` gives identical results with array operations: in
each round it computes every remaining anchor's choice against the picks
made so far and commits the longest prefix of anchors whose choice cannot
change: their free candidates contain no choice of an earlier anchor in the
same round, or, at q = 1, none at or before their own choice. Each round
commits at least one anchor, and rounds are few unless candidate lists
overlap heavily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from falcon_rl.mining.hardness import check_hardness, hardness_to_rank

# (anchor slot, pair indices taken so far in this batch) -> pair index, or -1 if none.
FallbackNegative = Callable[[int, np.ndarray], int]


@dataclass
class Selection:
    """Negatives chosen for a batch's anchors.

    - ``negatives``: int64 ``[A]`` pair indices, -1 where none.
    - ``ranks``: int64 ``[A]`` rank among the free candidates, -1 for fallbacks and slots without a negative.
    - ``columns``: int64 ``[A]`` column of the negative in the candidate list, -1 as for ``ranks``.
    - ``exhausted``: number of anchors that needed the fallback.
    """

    negatives: np.ndarray
    ranks: np.ndarray
    columns: np.ndarray
    exhausted: int


def choose_negatives_reference(
    candidates: np.ndarray,
    eligible: np.ndarray,
    hardness: np.ndarray,
    n_negatives: int,
    fallback: FallbackNegative,
) -> Selection:
    """Choose negatives one anchor at a time (the definition of the rule).

    :param candidates: int64 ``[A, K]`` pair indices sorted by similarity, descending.
    :param eligible: bool ``[A, K]``, False for pads and excluded candidates.
    :param hardness: float ``[A]`` levels in [0, 1].
    :param n_negatives: anchors ``0 .. n_negatives - 1`` get a negative, the rest -1.
    :param fallback: called for an exhausted anchor.
    """
    n_anchors, k = candidates.shape
    selection = _empty_selection(n_anchors)
    taken: list[int] = []

    for anchor in range(min(n_negatives, n_anchors)):
        free = [j for j in range(k) if eligible[anchor, j] and candidates[anchor, j] not in taken]
        if free:
            rank = int(hardness_to_rank(float(hardness[anchor]), len(free)))
            selection.negatives[anchor] = candidates[anchor, free[rank]]
            selection.ranks[anchor] = rank
            selection.columns[anchor] = free[rank]
        else:
            selection.exhausted += 1
            selection.negatives[anchor] = fallback(anchor, np.array(taken, dtype=np.int64))
        if selection.negatives[anchor] >= 0:
            taken.append(int(selection.negatives[anchor]))

    return selection


def choose_negatives(
    candidates: np.ndarray,
    eligible: np.ndarray,
    hardness: np.ndarray,
    n_negatives: int,
    fallback: FallbackNegative,
) -> Selection:
    """Choose negatives with the same result as :func:`choose_negatives_reference`, in rounds.

    Parameters are those of :func:`choose_negatives_reference`.
    """
    n_anchors = candidates.shape[0]
    selection = _empty_selection(n_anchors)
    hardness = check_hardness(hardness)
    end_all = min(n_negatives, n_anchors)

    # Candidates renumbered 0 .. U - 1, so that "taken" and "chosen first by"
    # are lookups in arrays of U entries instead of set operations per round.
    values, ids = _renumber(candidates)
    taken = np.zeros(values.size, dtype=bool)
    taken_pairs: list[int] = []
    start = 0

    while start < end_all:
        rows = ids[start:end_all]
        free = eligible[start:end_all] & ~taken[rows]
        n_free = free.sum(axis=1)

        if n_free[0] == 0:
            selection.exhausted += 1
            negative = fallback(start, np.asarray(taken_pairs, dtype=np.int64))
            selection.negatives[start] = negative
            if negative >= 0:
                taken_pairs.append(negative)
                slot = np.searchsorted(values, negative)
                if slot < values.size and values[slot] == negative:
                    taken[slot] = True
            start += 1
            continue

        ranks, columns, choices = _choose_in_rows(rows, free, n_free, hardness[start:end_all])
        n_commit = _committable_prefix(rows, free, n_free, choices, columns, hardness[start:end_all], values.size)
        committed = choices[:n_commit]
        selection.negatives[start : start + n_commit] = values[committed]
        selection.ranks[start : start + n_commit] = ranks[:n_commit]
        selection.columns[start : start + n_commit] = columns[:n_commit]
        taken[committed] = True
        taken_pairs.extend(values[committed].tolist())
        start += n_commit

    return selection


def _renumber(candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the sorted distinct values and each entry's index among them (``np.unique`` with ``return_inverse``)."""
    flat = candidates.reshape(-1)
    order = np.argsort(flat)
    ordered = flat[order]
    starts = np.empty(flat.size, dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    ids = np.empty(flat.size, dtype=np.int64)
    ids[order] = np.cumsum(starts) - 1
    return ordered[starts], ids.reshape(candidates.shape)


def _choose_in_rows(
    rows: np.ndarray, free: np.ndarray, n_free: np.ndarray, hardness: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # choose_negatives validated the levels once, so the rounds skip the check.
    ranks = hardness_to_rank(hardness, n_free, validate=False)
    # The column of the (rank + 1)-th free candidate of each row.
    hit = free & (np.cumsum(free, axis=1) == (ranks + 1)[:, None])
    columns = np.where(n_free > 0, hit.argmax(axis=1), -1)
    choices = np.where(n_free > 0, rows[np.arange(len(rows)), np.maximum(columns, 0)], -1)
    return ranks, columns, choices


def _committable_prefix(
    rows: np.ndarray,
    free: np.ndarray,
    n_free: np.ndarray,
    choices: np.ndarray,
    columns: np.ndarray,
    hardness: np.ndarray,
    n_values: int,
) -> int:
    # An exhausted anchor needs the fallback, which depends on all earlier
    # picks, so the prefix stops before it.
    exhausted = np.flatnonzero(n_free == 0)
    limit = int(exhausted[0]) if exhausted.size else len(rows)

    # Earliest anchor (within the limit) that chose each candidate.
    first_row = np.full(n_values, limit, dtype=np.int64)
    chosen, first_index = np.unique(choices[:limit], return_index=True)
    first_row[chosen] = first_index
    entry_rows, entry_columns = np.nonzero(free[:limit])
    # An anchor at q = 1 takes its first free candidate whatever the number
    # of free ones, so an earlier pick behind its choice leaves it unchanged.
    # At q < 1 every earlier pick changes that number and may move the rank.
    matters = (entry_columns <= columns[entry_rows]) | (hardness[entry_rows] < 1.0)
    conflict = matters & (first_row[rows[entry_rows, entry_columns]] < entry_rows)
    if conflict.any():
        limit = min(limit, int(entry_rows[conflict].min()))
    return limit


def _empty_selection(n_anchors: int) -> Selection:
    return Selection(
        negatives=np.full(n_anchors, -1, dtype=np.int64),
        ranks=np.full(n_anchors, -1, dtype=np.int64),
        columns=np.full(n_anchors, -1, dtype=np.int64),
        exhausted=0,
    )
