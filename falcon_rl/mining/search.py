"""Exact top-K candidate search by cross-modal similarity.

The similarity of anchor a and candidate c is

    s(a, c) = (<img_a, txt_c> + <txt_a, img_c>) / 2,

the mean of the image-to-text and text-to-image inner products. With keys
``[img_c, txt_c]`` and queries ``[txt_a, img_a]`` (both ``2d`` wide), one
inner product gives exactly ``2 s(a, c)``, so a flat inner-product index
answers the search. Candidates that share the anchor's group (its
``image_id``) are positives and never returned.

Backends return the same candidates up to ties in similarity:

- ``"faiss"``: ``faiss.IndexFlatIP`` (a GPU flat index when CUDA is
  available and the installed faiss has GPU support).
- ``"torch"``: blocked matrix products and ``topk`` on the keys' device, so
  no ``[A, P]`` matrix larger than one block is ever built.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import torch

from falcon_rl.mining.errors import MiningError

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "torch")


def cross_modal_queries(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Return anchor queries ``[txt, img]`` of shape ``[n, 2d]``."""
    return torch.cat([text, image], dim=1)


def cross_modal_keys(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Return candidate keys ``[img, txt]`` of shape ``[n, 2d]``."""
    return torch.cat([image, text], dim=1)


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
    i2t = torch.einsum("ad,akd->ak", anchor_image, candidate_text)
    t2i = torch.einsum("ad,akd->ak", anchor_text, candidate_image)
    positive = (anchor_image * anchor_text).sum(dim=1)
    return i2t, t2i, positive


class CandidateSearch:
    """Exact top-K search of keys by inner product, skipping keys of the query's group.

    :param backend: ``"faiss"`` or ``"torch"``.
    :param block_size: keys per matrix product in the torch backend.
    """

    def __init__(self, backend: str = "faiss", block_size: int = 65536) -> None:
        if backend not in BACKENDS:
            raise MiningError(f"search backend must be one of {BACKENDS}, got {backend!r}")
        if int(block_size) < 1:
            raise MiningError(f"block_size must be >= 1, got {block_size}")
        self.backend = backend
        self.block_size = int(block_size)
        self._gpu_resources = None

    def search(
        self,
        queries: torch.Tensor,
        query_groups: np.ndarray,
        keys: torch.Tensor,
        key_groups: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return, per query, the ``k`` keys of other groups with the largest similarity.

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
        groups, group_sizes = np.unique(key_groups, return_counts=True)
        slot = np.clip(np.searchsorted(groups, query_groups), 0, len(groups) - 1)
        same_group = np.where(groups[slot] == query_groups, group_sizes[slot], 0)
        n_results = min(k + int(same_group.max()), int(keys.shape[0]))

        index = self._flat_index(int(keys.shape[1]))
        index.add(np.ascontiguousarray(keys.detach().float().cpu().numpy()))
        scores, found = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), n_results)

        valid = found >= 0
        valid &= key_groups[np.clip(found, 0, None)] != query_groups[:, None]
        # A stable sort on ~valid moves the valid results to the front in their
        # similarity order.
        keep = np.argsort(~valid, axis=1, kind="stable")[:, :k]
        found = np.take_along_axis(found, keep, axis=1)
        scores = np.take_along_axis(scores, keep, axis=1)
        found[~np.take_along_axis(valid, keep, axis=1)] = -1
        return found.astype(np.int64), scores.astype(np.float32)

    def _flat_index(self, dim: int) -> faiss.Index:
        if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources"):
            # NOTE: the GPU index path is not exercised by the CPU test suite.
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
                logger.info("candidate search uses a faiss GPU flat index")
            return faiss.GpuIndexFlatIP(self._gpu_resources, dim)
        return faiss.IndexFlatIP(dim)

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
            block_positions = torch.arange(start, start + block.shape[0], device=device)

            scores = torch.cat([best_scores, scores], dim=1)
            positions = torch.cat([best_positions, block_positions.expand(queries.shape[0], -1)], dim=1)
            best_scores, top = scores.topk(min(k, scores.shape[1]), dim=1)
            best_positions = positions.gather(1, top)

        found = best_positions.cpu().numpy()
        scores = best_scores.cpu().numpy()
        found[~np.isfinite(scores)] = -1
        return found, scores
