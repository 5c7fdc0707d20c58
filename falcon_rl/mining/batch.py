"""Data passed between the batch builder and the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Proposal:
    """Anchors of the next batch and their candidate negatives.

    Attributes, for A anchors and K candidates per anchor:

    - ``anchors``: int64 ``[A]`` pair indices.
    - ``candidates``: int64 ``[A, K]`` pair indices, -1 pads at the end of a row.
    - ``candidate_sims``: float32 ``[A, K]`` s(a, c), sorted in descending order, -inf pads.
    - ``i2t_sims``: float32 ``[A, K]`` <img_a, txt_c>, 0 at pads.
    - ``t2i_sims``: float32 ``[A, K]`` <txt_a, img_c>, 0 at pads.
    - ``positive_sims``: float32 ``[A]`` <img_a, txt_a>.
    - ``features``: float32 ``[A, F_sim]`` similarity features (see ``observation``).
    - ``fallbacks``: candidate slots filled from beyond the search space
      (``"beyond_search_space"``) and at random (``"random"``).
    - ``n_negatives``: number of negative slots of this batch (anchors after
      the first ``n_negatives`` get no negative).
    - ``epoch`` and ``batch_index``: the builder position this proposal is for.
    """

    anchors: np.ndarray
    candidates: np.ndarray
    candidate_sims: np.ndarray
    i2t_sims: np.ndarray
    t2i_sims: np.ndarray
    positive_sims: np.ndarray
    features: np.ndarray
    fallbacks: dict[str, int]
    n_negatives: int
    epoch: int
    batch_index: int
    # Search-space pairs per anchor (int64 [A, R], -1 pads) that include its
    # K + A nearest, or the whole pool when the search computed all scores.
    # The bfloat16 search keeps only the K nearest here, and the builder then
    # rescores an exhausted anchor's free pairs in float32 from the bank.
    # reserve_sims are their similarities (float32, -inf where not eligible).
    # An exhausted anchor's fallback is the most similar of them that is
    # neither its candidate nor taken.
    reserve: np.ndarray = field(repr=False)
    reserve_sims: np.ndarray = field(repr=False)

    @property
    def valid(self) -> np.ndarray:
        """Bool ``[A, K]``, False at -1 pads."""
        return self.candidates >= 0


@dataclass
class MinedBatch:
    """One training batch: anchors followed by their negatives.

    Attributes, for A anchors:

    - ``pair_indices``: int64 ``[B']``, the anchors, then the negatives in
      anchor order (-1 negatives left out, so B' <= B).
    - ``anchors``: int64 ``[A]``.
    - ``negatives``: int64 ``[A]``, -1 where an anchor got none.
    - ``hardness``: float32 ``[A]`` levels used; NaN for random batches.
    - ``negative_ranks``: int64 ``[A]`` rank of the negative among the free
      candidates; -1 for fallback, missing or random negatives.
    - ``negative_sims``: float32 ``[A]`` s(anchor, negative); NaN where unknown.
    - ``fallbacks``: counts by kind: ``"beyond_search_space"`` and
      ``"random"`` candidate slots, ``"exhausted"`` anchors whose candidates
      were all taken or excluded.
    - ``epoch_end``: this batch placed the last pair of the epoch.
    - ``epoch`` and ``batch_index``: the batch's position.
    """

    pair_indices: np.ndarray
    anchors: np.ndarray
    negatives: np.ndarray
    hardness: np.ndarray
    negative_ranks: np.ndarray
    negative_sims: np.ndarray
    fallbacks: dict[str, int]
    epoch_end: bool
    epoch: int
    batch_index: int
