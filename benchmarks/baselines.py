"""Baseline batch builders that the mining benchmark compares falcon-rl's BatchBuilder with.

- :class:`TorchTopkBuilder`: the plainest exact miner. Per batch, one
  ``torch.mm`` of the anchors against the search space, a positive mask,
  ``topk``, and each anchor takes its first candidate that no earlier anchor
  took (a Python loop over anchors).
- :class:`GreedyGrouping`: GRIT-VLP's grouping (Byun et al., 2022, "GRIT-VLP:
  Grouped Mini-batch Sampling for Efficient Vision and Language
  Pre-training", ECCV), written from the paper's description. Within each
  search space of S samples, it computes the S x S image-to-text and
  text-to-image ITC similarity matrices (softmax over s / temperature).
  It then walks greedily from a random sample: from an image to its most
  similar text, from that text to its most similar image, and so on. Each visited
  sample's row and column are set to 0 in both matrices, so it is never
  chosen again. The visiting order is cut into mini-batches. The walk is a
  Python loop of tensor operations, O(S) work per sample, O(S^2) per search
  space.

Both share the benchmark's :class:`~falcon_rl.mining.EmbeddingBank` and
gather rows with :meth:`~falcon_rl.mining.EmbeddingBank.keys`, as the
BatchBuilder does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from falcon_rl.mining import EmbeddingBank
from falcon_rl.mining.search import queries_from_keys

# ITC temperature of ALBEF and GRIT-VLP.
TEMPERATURE = 0.07


class TorchTopkBuilder:
    """Matrix product and top-k per batch, first free candidate per anchor.

    :param bank: embeddings of all pairs.
    :param image_ids: int64 ``[N]`` image_id per pair; same-image pairs are never negatives.
    :param batch_size: pairs per batch B; the first ``ceil(B / 2)`` are anchors.
    :param search_space: unplaced pairs, in epoch order, searched per batch.
    :param top_k: candidates per anchor.
    :param seed: seed of the epoch order.
    """

    def __init__(self, bank: EmbeddingBank, image_ids: np.ndarray, batch_size: int, search_space: int,
                 top_k: int, seed: int) -> None:
        self.bank = bank
        self.image_ids = image_ids
        self.batch_size = batch_size
        self.search_space = search_space
        self.top_k = top_k
        self.order = np.random.default_rng([seed, 0]).permutation(bank.n_pairs)
        self.placed = np.zeros(bank.n_pairs, dtype=bool)
        self.head = 0
        self.n_placed = 0

    @property
    def epoch_finished(self) -> bool:
        return self.n_placed >= self.bank.n_pairs

    def next_batch(self) -> np.ndarray:
        """Build and place the next batch; return its pair indices (anchors, then negatives)."""
        window = self._unplaced(self.search_space)
        size = min(self.batch_size, window.size)
        n_anchors = math.ceil(size / 2)
        anchors, pool = window[:n_anchors], window[n_anchors:]

        queries = queries_from_keys(self.bank.keys(anchors))
        sims = torch.mm(queries, self.bank.keys(pool).T)
        same_image = torch.from_numpy(self.image_ids[anchors][:, None] == self.image_ids[pool][None, :])
        sims.masked_fill_(same_image, -torch.inf)
        top = sims.topk(min(self.top_k, pool.size), dim=1).indices.numpy() if pool.size else None

        taken: set[int] = set()
        for row in range(size - n_anchors):
            free = [int(pool[column]) for column in top[row] if int(pool[column]) not in taken]
            # NOTE: an anchor whose top-k are all taken gets the next window pair
            # that is free; the benchmark's random banks rarely reach this branch.
            choice = free[0] if free else next(int(p) for p in pool if int(p) not in taken)
            taken.add(choice)

        batch = np.concatenate([anchors, np.fromiter(taken, dtype=np.int64, count=len(taken))])
        self.placed[batch] = True
        self.n_placed += batch.size
        return batch

    def _unplaced(self, count: int) -> np.ndarray:
        while self.head < self.order.size and self.placed[self.order[self.head]]:
            self.head += 1
        width = 2 * count
        while True:
            chunk = self.order[self.head : self.head + width]
            unplaced = chunk[~self.placed[chunk]]
            if unplaced.size >= count or self.head + width >= self.order.size:
                return unplaced[:count]
            width *= 2


class GreedyGrouping:
    """GRIT-VLP's greedy grouping of each search space (see the module docstring).

    :param bank: embeddings of all pairs.
    :param batch_size: pairs per batch B.
    :param search_space: samples grouped together S.
    :param seed: seed of the epoch order and of the walks' start samples.
    :param temperature: ITC softmax temperature.
    """

    def __init__(self, bank: EmbeddingBank, batch_size: int, search_space: int, seed: int,
                 temperature: float = TEMPERATURE) -> None:
        self.bank = bank
        self.batch_size = batch_size
        self.search_space = search_space
        self.temperature = temperature
        self.order = np.random.default_rng([seed, 0]).permutation(bank.n_pairs)
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0

    @property
    def epoch_finished(self) -> bool:
        return self.position >= self.order.size

    def next_search_space(self) -> list[np.ndarray]:
        """Group the next search space; return its batches of pair indices."""
        space = self.order[self.position : self.position + self.search_space]
        self.position += space.size
        keys = self.bank.keys(space)
        dim = self.bank.dim
        visiting_order = space[greedy_walk(keys[:, :dim], keys[:, dim:], self.temperature, self.generator)]
        return [visiting_order[start : start + self.batch_size]
                for start in range(0, visiting_order.size, self.batch_size)]


def greedy_walk(image: torch.Tensor, text: torch.Tensor, temperature: float,
                generator: torch.Generator) -> np.ndarray:
    """Return GRIT-VLP's visiting order of the S samples given by their ``[S, d]`` embeddings."""
    n = image.shape[0]
    i2t = torch.softmax(image @ text.T / temperature, dim=1)
    t2i = torch.softmax(text @ image.T / temperature, dim=1)
    i2t.fill_diagonal_(0.0)
    t2i.fill_diagonal_(0.0)

    current = int(torch.randint(n, (1,), generator=generator))
    order = [current]
    visited = np.zeros(n, dtype=bool)
    visited[current] = True
    from_image = True
    for _ in range(n - 1):
        following = int(torch.argmax((i2t if from_image else t2i)[current]))
        for matrix in (i2t, t2i):
            matrix[current, :] = 0.0
            matrix[:, current] = 0.0
        if visited[following]:
            # Every remaining similarity underflowed to 0; take any unvisited sample.
            following = int(np.argmin(visited))
        visited[following] = True
        order.append(following)
        current = following
        from_image = not from_image
    return np.asarray(order, dtype=np.int64)
