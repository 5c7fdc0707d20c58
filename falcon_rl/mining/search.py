"""Top-K candidate search by cross-modal similarity.

The similarity of anchor a and candidate c is

    s(a, c) = (<img_a, txt_c> + <txt_a, img_c>) / 2,

the mean of the image-to-text and text-to-image inner products. With keys
``[img_c, txt_c]`` and queries ``[txt_a, img_a]`` (both ``2d`` wide), one
inner product gives exactly ``2 s(a, c)``, so an inner-product index
answers the search. Candidates that share the anchor's group (its
``image_id``) are positives and never returned.

Backends of the exact (``index="flat"``) search return the same candidates
up to ties in similarity:

- ``"faiss"``: ``faiss.knn`` brute force on the CPU, or ``faiss.knn_gpu``
  when the installed faiss sees a GPU.
- ``"torch"``: blocked matrix products and ``topk`` on the keys' device, so
  no ``[A, P]`` matrix larger than one block is ever built.

``index="ivf"`` or ``"hnsw"`` keeps an approximate FAISS index of the search
space across batches instead (see :mod:`falcon_rl.mining.approximate`); it
trades exactness for speed when the search space is large.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import torch

from falcon_rl.mining.approximate import APPROXIMATE_INDEXES, ApproximateIndex
from falcon_rl.mining.bank import EmbeddingBank
from falcon_rl.mining.errors import MiningError
from falcon_rl.mining.positives import drop_same_group, same_group_counts

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "torch")
INDEXES = ("flat", *APPROXIMATE_INDEXES)


def cross_modal_queries(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Return anchor queries ``[txt, img]`` of shape ``[n, 2d]``."""
    return torch.cat([text, image], dim=1)


def cross_modal_keys(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Return candidate keys ``[img, txt]`` of shape ``[n, 2d]``."""
    return torch.cat([image, text], dim=1)


def queries_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """Return queries ``[txt, img]`` from keys ``[img, txt]`` by swapping the halves."""
    dim = keys.shape[1] // 2
    return torch.cat([keys[:, dim:], keys[:, :dim]], dim=1)


def directional_similarities(
    anchor_image: torch.Tensor,
    anchor_text: torch.Tensor,
    candidate_image: torch.Tensor,
    candidate_text: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return image-to-text, text-to-image and positive similarities.

    :param anchor_image: anchor image embeddings ``[A, d]``.
    :param anchor_text: anchor text embeddings ``[A, d]``.
    :param candidate_image: candidate image embeddings ``[A, K, d]``.
    :param candidate_text: candidate text embeddings ``[A, K, d]``.
    :return: ``i2t`` = <img_a, txt_c> ``[A, K]``, ``t2i`` = <txt_a, img_c>
        ``[A, K]`` and ``positive`` = <img_a, txt_a> ``[A]``.
    """
    i2t = torch.bmm(candidate_text, anchor_image.unsqueeze(2)).squeeze(2)
    t2i = torch.bmm(candidate_image, anchor_text.unsqueeze(2)).squeeze(2)
    positive = (anchor_image * anchor_text).sum(dim=1)
    return i2t, t2i, positive


class CandidateSearch:
    """Top-K search of keys by inner product, skipping keys of the query's group.

    :param backend: ``"faiss"`` or ``"torch"``; the approximate indexes need ``"faiss"``.
    :param block_size: keys per matrix product in the torch backend.
    :param index: ``"flat"`` (exact, the default), ``"ivf"`` or ``"hnsw"``
        (approximate, CPU only; see :class:`~falcon_rl.mining.approximate.ApproximateIndex`).
    :param index_options: keyword arguments of
        :class:`~falcon_rl.mining.approximate.ApproximateIndex` (``nlist``,
        ``nprobe``, ``hnsw_m``, ``ef_search``, ``ef_construction``).
    """

    def __init__(
        self,
        backend: str = "faiss",
        block_size: int = 65536,
        index: str = "flat",
        index_options: dict | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise MiningError(f"search backend must be one of {BACKENDS}, got {backend!r}")
        if int(block_size) < 1:
            raise MiningError(f"block_size must be >= 1, got {block_size}")
        if index not in INDEXES:
            raise MiningError(f"search index must be one of {INDEXES}, got {index!r}")
        if index != "flat" and backend != "faiss":
            raise MiningError(f"search index {index!r} needs backend 'faiss', got backend {backend!r}")
        if index == "flat" and index_options:
            raise MiningError(f"index_options apply to the indexes {APPROXIMATE_INDEXES}, not to 'flat'")

        self.backend = backend
        self.block_size = int(block_size)
        self.index = index
        self.approximate = ApproximateIndex(index, **(index_options or {})) if index != "flat" else None
        self._gpu_resources = None

    def reset(self) -> None:
        """Drop the persistent approximate index (it is rebuilt by the next search)."""
        if self.approximate is not None:
            self.approximate.reset()

    def search_pool(
        self,
        queries: torch.Tensor,
        query_groups: np.ndarray,
        pool: np.ndarray,
        groups: np.ndarray,
        bank: EmbeddingBank,
        k: int,
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """Return, per query, the pair indices of its ``k`` nearest pool pairs of other groups.

        :param queries: float32 queries ``[A, 2d]`` from :func:`cross_modal_queries`.
        :param query_groups: int64 group (image_id) of each query ``[A]``.
        :param pool: int64 pair indices searched ``[P]``.
        :param groups: int64 group of every pair of the bank ``[N]``.
        :param bank: the embeddings of all pairs.
        :param k: number of results per query.
        :return: ``candidates`` int64 ``[A, k]`` pair indices sorted by
            similarity (-1 pads), and the pool's keys ``[P, 2d]`` that the
            flat index gathered (None for the approximate indexes, which do
            not gather the whole pool).
        """
        if self.approximate is not None:
            return self.approximate.search(queries, query_groups, pool, groups, bank, k), None

        keys = bank.keys(pool)
        positions, _ = self.search(queries, query_groups, keys, groups[pool], k)
        if pool.size == 0:
            return positions, keys
        return np.where(positions >= 0, pool[np.clip(positions, 0, None)], -1), keys

    def search(
        self,
        queries: torch.Tensor,
        query_groups: np.ndarray,
        keys: torch.Tensor,
        key_groups: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return, per query, the ``k`` keys of other groups with the largest similarity (exact).

        :param queries: float32 queries ``[A, 2d]`` from :func:`cross_modal_queries`.
        :param query_groups: int64 group (image_id) of each query ``[A]``.
        :param keys: float32 keys ``[P, 2d]`` from :func:`cross_modal_keys`.
        :param key_groups: int64 group of each key ``[P]``.
        :param k: number of results per query.
        :return: ``positions`` int64 ``[A, k]`` (rows of ``keys``, -1 pads) and
            ``similarities`` float32 ``[A, k]`` (s = inner product / 2, -inf pads),
            sorted by similarity in descending order.
        """
        n_queries = int(queries.shape[0])
        positions = np.full((n_queries, k), -1, dtype=np.int64)
        similarities = np.full((n_queries, k), -np.inf, dtype=np.float32)
        if n_queries == 0 or k == 0 or keys.shape[0] == 0:
            return positions, similarities

        if self.backend == "faiss":
            found, scores = self._search_faiss(queries, query_groups, keys, key_groups, k)
        else:
            found, scores = self._search_torch(queries, query_groups, keys, key_groups, k)
        width = found.shape[1]
        positions[:, :width] = found
        similarities[:, :width] = np.where(found >= 0, scores / 2.0, -np.inf)
        return positions, similarities

    def _search_faiss(
        self,
        queries: torch.Tensor,
        query_groups: np.ndarray,
        keys: torch.Tensor,
        key_groups: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        # Ask for as many extra results as the most same-group keys any query
        # has, so that k remain after dropping them.
        n_results = min(k + int(same_group_counts(query_groups, key_groups).max()), int(keys.shape[0]))
        query_array = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        key_array = np.ascontiguousarray(keys.detach().float().cpu().numpy())

        if faiss.get_num_gpus() > 0:
            # NOTE: the GPU path is not exercised by the CPU test suite.
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
                logger.info("candidate search uses faiss.knn_gpu")
            scores, found = faiss.knn_gpu(self._gpu_resources, query_array, key_array, n_results,
                                          metric=faiss.METRIC_INNER_PRODUCT)
        else:
            scores, found = faiss.knn(query_array, key_array, n_results, metric=faiss.METRIC_INNER_PRODUCT)
        return drop_same_group(found, scores, query_groups, key_groups[np.clip(found, 0, None)], k)

    def _search_torch(
        self,
        queries: torch.Tensor,
        query_groups: np.ndarray,
        keys: torch.Tensor,
        key_groups: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        device = keys.device
        queries = queries.to(device=device, dtype=torch.float32)
        query_groups_t = torch.as_tensor(query_groups, device=device)
        key_groups_t = torch.as_tensor(key_groups, device=device)
        best_scores = torch.empty(queries.shape[0], 0, device=device)
        best_positions = torch.empty(queries.shape[0], 0, dtype=torch.int64, device=device)

        for start in range(0, int(keys.shape[0]), self.block_size):
            block = keys[start : start + self.block_size].to(torch.float32)
            block_groups = key_groups_t[start : start + block.shape[0]]
            scores = queries @ block.T
            scores.masked_fill_(query_groups_t[:, None] == block_groups[None, :], -torch.inf)
            block_scores, top = scores.topk(min(k, scores.shape[1]), dim=1)
            block_positions = top + start

            scores = torch.cat([best_scores, block_scores], dim=1)
            positions = torch.cat([best_positions, block_positions], dim=1)
            best_scores, top = scores.topk(min(k, scores.shape[1]), dim=1)
            best_positions = positions.gather(1, top)

        found = best_positions.cpu().numpy()
        scores = best_scores.cpu().numpy()
        found[~np.isfinite(scores)] = -1
        return found, scores
