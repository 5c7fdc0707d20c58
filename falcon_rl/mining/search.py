"""Top-K candidate search by cross-modal similarity.

The similarity of anchor a and candidate c is

    s(a, c) = (<img_a, txt_c> + <txt_a, img_c>) / 2,

the mean of the image-to-text and text-to-image inner products. With keys
``[img_c, txt_c]`` and queries ``[txt_a, img_a]`` (both ``2d`` wide), one
inner product gives exactly ``2 s(a, c)``, so an inner-product search
computes it. Candidates that share the anchor's group (its
``image_id``) are positives and never returned.

Backends of the exact (``index="flat"``) search return the same candidates
up to ties in similarity:

- ``"faiss"``: ``faiss.knn`` brute force on the CPU, or ``faiss.knn_gpu``
  when ``faiss.get_num_gpus()`` finds a GPU.
- ``"torch"``: blocked matrix products and ``topk`` on the keys' device, so
  no ``[A, P]`` matrix larger than one block is ever built.

Both read the pool's keys from a cache kept across batches (see
:mod:`falcon_rl.mining.key_cache`). On a 2-core AMD EPYC with faiss-cpu 1.15
and torch 2.13 (MKL), the faiss backend built batches 1.5 to 2.4 times slower
than the torch backend in ``benchmarks/mining.py`` (see docs/benchmarks.md).

``precision`` sets the arithmetic of the torch backend's search of a pool
that fits in one block. ``"float32"`` scores every key in float32.
``"bfloat16"`` scores them in bfloat16 and re-scores in float32 the keys
that could be among the k best (see :mod:`falcon_rl.mining.certified`), with
the same result up to float32 rounding. ``"auto"`` (the default) picks
bfloat16 for CPU banks when torch reports AVX512-BF16 or AMX and a bfloat16
product measured faster at start-up, and float32 otherwise. The faiss
backend, larger pools and the search beyond the search space always run in
float32.

``index="ivf"`` or ``"hnsw"`` keeps an approximate FAISS index of the search
space across batches instead (see :mod:`falcon_rl.mining.approximate`). It
trades exactness for speed when the search space is large.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from falcon_rl.mining.approximate import APPROXIMATE_INDEXES, ApproximateIndex
from falcon_rl.mining.bank import EmbeddingBank
from falcon_rl.mining.certified import bfloat16_matmul_is_faster, certified_top_k
from falcon_rl.mining.errors import MiningError
from falcon_rl.mining.key_cache import KeyCache
from falcon_rl.mining.positives import GroupIndex, drop_same_group, same_group_counts, same_group_entries

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "torch")
INDEXES = ("flat", *APPROXIMATE_INDEXES)
PRECISIONS = ("auto", "float32", "bfloat16")


def cross_modal_queries(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Return anchor queries ``[txt, img]`` of shape ``[n, 2d]``."""
    return torch.cat([text, image], dim=1)


def cross_modal_keys(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Return candidate keys ``[img, txt]`` of shape ``[n, 2d]``."""
    return torch.cat([image, text], dim=1)


def queries_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """Return queries ``[txt, img]`` from keys ``[img, txt]`` by swapping the halves."""
    dim = keys.shape[1] // 2
    if keys.device.type == "cpu" and keys.dtype != torch.bfloat16:
        # NumPy copies these small arrays several times faster than torch.cat (torch 2.13).
        rows = keys.detach().numpy()
        return torch.from_numpy(np.concatenate([rows[:, dim:], rows[:, :dim]], axis=1))
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
    # Element-wise products: batched matrix products of these shapes are
    # slow on the CPU (torch 2.13), and the arrays are small.
    i2t = (candidate_text * anchor_image.unsqueeze(1)).sum(dim=2)
    t2i = (candidate_image * anchor_text.unsqueeze(1)).sum(dim=2)
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
    :param precision: ``"auto"``, ``"float32"`` or ``"bfloat16"``: the
        arithmetic of the torch backend's single-block pool search (see the
        module docstring). ``"bfloat16"`` needs backend ``"torch"``, index
        ``"flat"`` and a bank on the CPU.

    ``counts`` accumulates over all searches: ``bfloat16_anchors`` (queries
    searched in bfloat16), ``rescored_keys`` (keys re-scored in float32),
    ``second_pass_anchors`` and ``second_pass_keys`` (queries, and keys,
    re-scored beyond the keys that reached the block bound, to certify the
    top k) and ``full_row_anchors`` (queries re-scored against the whole
    pool in float32, the certificate fallbacks).
    """

    def __init__(
        self,
        backend: str = "faiss",
        block_size: int = 65536,
        index: str = "flat",
        index_options: dict | None = None,
        precision: str = "auto",
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
        if precision not in PRECISIONS:
            raise MiningError(f"search precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "bfloat16" and (backend, index) != ("torch", "flat"):
            raise MiningError(f"search precision 'bfloat16' needs backend 'torch' and index 'flat', "
                              f"got backend {backend!r} and index {index!r}")

        self.backend = backend
        self.block_size = int(block_size)
        self.index = index
        self.precision = precision
        self.approximate = ApproximateIndex(index, **(index_options or {})) if index != "flat" else None
        self._cache = KeyCache()
        self._groups: GroupIndex | None = None
        self._gpu_resources = None
        self.counts = _empty_counts()

    def reset(self) -> None:
        """Drop the cached keys and the approximate index (the next search rebuilds them)."""
        self._cache = KeyCache()
        if self.approximate is not None:
            self.approximate.reset()

    def keys_of(self, pairs: np.ndarray, bank: EmbeddingBank) -> torch.Tensor:
        """Return float32 keys ``[len(pairs), 2d]`` of the given pairs, from the key cache when it has them.

        The values equal those of :meth:`EmbeddingBank.keys`.
        """
        return self._cache.keys_of(pairs, bank)

    def uses_bfloat16(self, device: torch.device) -> bool:
        """Return whether a single-block pool search of keys on ``device`` runs in bfloat16.

        :raises MiningError: for precision ``"bfloat16"`` with keys off the CPU.
        """
        if self.precision == "bfloat16":
            if device.type != "cpu":
                raise MiningError(f"search precision 'bfloat16' needs a bank on the CPU, got one on {device}")
            return True
        return (self.precision == "auto" and self.backend == "torch" and self.index == "flat"
                and device.type == "cpu" and bfloat16_matmul_is_faster())

    def search_pool(
        self,
        queries: torch.Tensor,
        query_groups: np.ndarray,
        pool: np.ndarray,
        groups: np.ndarray,
        bank: EmbeddingBank,
        k: int,
        n_reserve: int = 0,
    ) -> PoolSearch:
        """Return, per query, its ``k`` nearest pool pairs of other groups and a reserve beyond them.

        The flat index keeps the pool's keys across calls (see
        :class:`~falcon_rl.mining.key_cache.KeyCache`), so consecutive calls
        with overlapping pools gather only the rows they lack.

        :param queries: float32 queries ``[A, 2d]`` from :func:`cross_modal_queries`.
        :param query_groups: int64 group (image_id) of each query ``[A]``.
        :param pool: int64 pair indices searched ``[P]``.
        :param groups: int64 group of every pair of the bank ``[N]``.
        :param bank: the embeddings of all pairs.
        :param k: number of results per query.
        :param n_reserve: the reserve contains at least the ``k + n_reserve`` nearest pairs.
        """
        if self.approximate is not None:
            pairs, similarities = self.approximate.search(
                queries, query_groups, pool, groups, bank, k + n_reserve
            )
            return PoolSearch(pairs[:, :k], similarities[:, :k], pairs, similarities)

        cache = self._cache
        single_block = self.backend == "torch" and 0 < pool.size <= self.block_size
        cache.bfloat16 = single_block and self.uses_bfloat16(bank.device)
        cache.sync(pool, bank)
        occupied = cache.occupied
        slot_pairs = cache.slot_pairs.copy()

        if single_block and slot_pairs.size <= self.block_size:
            # One block: the masked score matrix is at hand, so it serves as the
            # reserve, and only the k best need a top-k. The positives come from
            # the group index, which spares a search over the pool's groups.
            rows, positives = self._group_index(groups).members(query_groups)
            columns = cache.slots_of(positives)
            cached = columns >= 0
            same_group = (rows[cached], columns[cached])
            if cache.bfloat16:
                return self._search_pool_bfloat16(queries, same_group, k)
            scores = self._masked_scores(queries, cache.keys, same_group, occupied)
            slots, similarities = self._top_k(scores, k)
            reserve_sims = scores.mul_(0.5).cpu().numpy()
            reserve_pairs = np.broadcast_to(slot_pairs, reserve_sims.shape)
            return PoolSearch(_pairs_of(slots, slot_pairs), similarities, reserve_pairs, reserve_sims,
                              self._result_keys(slots))

        slot_groups = np.where(occupied, groups[np.maximum(slot_pairs, 0)], -1)
        slots, similarities = self.search(
            queries, query_groups, cache.keys, slot_groups, k + n_reserve, key_mask=occupied
        )
        reserve_pairs = _pairs_of(slots, slot_pairs)
        return PoolSearch(reserve_pairs[:, :k], similarities[:, :k], reserve_pairs, similarities,
                          self._result_keys(slots[:, :k]))

    def _search_pool_bfloat16(
        self, queries: torch.Tensor, same_group: tuple[np.ndarray, np.ndarray], k: int
    ) -> PoolSearch:
        """Search the cached pool with bfloat16 scores, certified and re-scored in float32."""
        cache = self._cache
        occupied = cache.occupied
        queries = queries.float().contiguous()
        rounded = _rounded_scores(queries, cache.keys_bfloat16, same_group, occupied)

        def exact_rows(rows: np.ndarray) -> torch.Tensor:
            keep = np.isin(same_group[0], rows)
            row_of = np.full(queries.shape[0], -1, dtype=np.int64)
            row_of[rows] = np.arange(rows.size)
            positives = (row_of[same_group[0][keep]], same_group[1][keep])
            return self._masked_scores(queries[rows], cache.keys, positives, occupied)

        found = certified_top_k(rounded, queries.numpy(), cache.keys.numpy(), cache.slot_pairs, k,
                                cache.norm_bounds(), exact_rows)
        self.counts["bfloat16_anchors"] += queries.shape[0]
        self.counts["rescored_keys"] += found.rescored_keys
        self.counts["second_pass_anchors"] += found.second_pass_anchors
        self.counts["second_pass_keys"] += found.second_pass_keys
        self.counts["full_row_anchors"] += found.full_row_anchors

        n_queries, width = found.slots.shape
        slots = np.full((n_queries, k), -1, dtype=np.int64)
        similarities = np.full((n_queries, k), -np.inf, dtype=np.float32)
        i2t, t2i = np.zeros((2, n_queries, k), dtype=np.float32)
        slots[:, :width] = found.slots
        similarities[:, :width] = found.scores / 2.0
        i2t[:, :width] = found.i2t
        t2i[:, :width] = found.t2i
        pairs = _pairs_of(slots, cache.slot_pairs)
        return PoolSearch(pairs, similarities, pairs, similarities, reserve_complete=False, directional=(i2t, t2i))

    def _result_keys(self, slots: np.ndarray) -> torch.Tensor | None:
        """Return the cached keys ``[A, k, 2d]`` of the found slots (any row at -1 pads)."""
        if self._cache.slot_pairs.size == 0:
            return None
        rows = self._cache.rows(np.maximum(slots, 0).reshape(-1))
        return rows.reshape(*slots.shape, rows.shape[1])

    def search(
        self,
        queries: torch.Tensor,
        query_groups: np.ndarray,
        keys: torch.Tensor,
        key_groups: np.ndarray,
        k: int,
        key_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return, per query, the ``k`` keys of other groups with the largest similarity (exact).

        :param queries: float32 queries ``[A, 2d]`` from :func:`cross_modal_queries`.
        :param query_groups: int64 group (image_id) of each query ``[A]``.
        :param keys: float32 keys ``[P, 2d]`` from :func:`cross_modal_keys`.
        :param key_groups: int64 group of each key ``[P]``.
        :param k: number of results per query.
        :param key_mask: optional bool ``[P]``; False keys are never returned.
        :return: ``positions`` int64 ``[A, k]`` (rows of ``keys``, -1 pads) and
            ``similarities`` float32 ``[A, k]`` (s = inner product / 2, -inf pads),
            sorted by similarity in descending order.
        """
        n_queries = int(queries.shape[0])
        positions = np.full((n_queries, k), -1, dtype=np.int64)
        similarities = np.full((n_queries, k), -np.inf, dtype=np.float32)
        if n_queries == 0 or k == 0 or keys.shape[0] == 0:
            return positions, similarities

        if key_mask is None:
            key_mask = np.ones(int(keys.shape[0]), dtype=bool)
        if self.backend == "faiss":
            found, scores = self._search_faiss(queries, query_groups, keys, key_groups, k, key_mask)
        else:
            found, scores = self._search_torch(queries, query_groups, keys, key_groups, k, key_mask)
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
        key_mask: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        # Ask for as many extra results as the most same-group keys any query
        # has, plus the masked keys, so that k remain after dropping them.
        n_masked = int((~key_mask).sum())
        n_same = int(same_group_counts(query_groups, key_groups[key_mask]).max())
        n_results = min(k + n_same + n_masked, int(keys.shape[0]))
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
        found = np.where(key_mask[np.clip(found, 0, None)], found, -1)
        return drop_same_group(found, scores, query_groups, key_groups[np.clip(found, 0, None)], k)

    def _search_torch(
        self,
        queries: torch.Tensor,
        query_groups: np.ndarray,
        keys: torch.Tensor,
        key_groups: np.ndarray,
        k: int,
        key_mask: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        best_scores = best_positions = None
        for start in range(0, int(keys.shape[0]), self.block_size):
            end = min(start + self.block_size, int(keys.shape[0]))
            scores = self._masked_scores(
                queries, keys[start:end], same_group_entries(query_groups, key_groups[start:end]),
                key_mask[start:end],
            )
            block_scores, top = scores.topk(min(k, scores.shape[1]), dim=1)
            if best_scores is None:
                best_scores, best_positions = block_scores, top
                continue

            scores = torch.cat([best_scores, block_scores], dim=1)
            positions = torch.cat([best_positions, top + start], dim=1)
            best_scores, top = scores.topk(min(k, scores.shape[1]), dim=1)
            best_positions = positions.gather(1, top)

        found = best_positions.cpu().numpy()
        scores = best_scores.cpu().numpy()
        found[~np.isfinite(scores)] = -1
        return found, scores

    def _group_index(self, groups: np.ndarray) -> GroupIndex:
        if self._groups is None or self._groups.groups is not groups:
            self._groups = GroupIndex(groups)
        return self._groups

    @staticmethod
    def _masked_scores(
        queries: torch.Tensor,
        keys: torch.Tensor,
        same_group: tuple[np.ndarray, np.ndarray],
        key_mask: np.ndarray,
    ) -> torch.Tensor:
        """Return inner products ``[A, P]``, -inf at the same-group (row, column) entries and masked keys."""
        device = keys.device
        scores = queries.to(device=device, dtype=torch.float32) @ keys.to(torch.float32).T
        # Same-group entries are few (the other captions of the anchor's image),
        # so they are set by index rather than through an [A, P] comparison.
        rows, columns = same_group
        masked = np.flatnonzero(~key_mask)
        if device.type == "cpu":
            # NumPy's fancy assignment is much faster than torch's index_put on the CPU.
            view = scores.numpy()
            view[rows, columns] = -np.inf
            view[:, masked] = -np.inf
            return scores
        if rows.size:
            scores[torch.as_tensor(rows, device=device), torch.as_tensor(columns, device=device)] = -torch.inf
        if masked.size:
            scores.index_fill_(1, torch.as_tensor(masked, device=device), -torch.inf)
        return scores

    @staticmethod
    def _top_k(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the ``k`` best columns per row (-1 pads) and their similarities (score / 2, -inf pads)."""
        n_rows, n_columns = scores.shape
        positions = np.full((n_rows, k), -1, dtype=np.int64)
        similarities = np.full((n_rows, k), -np.inf, dtype=np.float32)
        best, top = scores.topk(min(k, n_columns), dim=1)
        best, top = best.cpu().numpy(), top.cpu().numpy()
        finite = np.isfinite(best)
        width = top.shape[1]
        positions[:, :width] = np.where(finite, top, -1)
        similarities[:, :width] = np.where(finite, best / 2.0, -np.inf)
        return positions, similarities


def _rounded_scores(
    queries: torch.Tensor, keys: torch.Tensor, same_group: tuple[np.ndarray, np.ndarray], key_mask: np.ndarray
) -> torch.Tensor:
    """Return the bfloat16 products of CPU tensors as float32 ``[P, A]`` (key-major), -inf where masked.

    The key-major product ``keys @ queries.T`` ran about 20% faster than
    ``queries @ keys.T`` for 64 queries and 4,032 keys (torch 2.13, oneDNN).
    """
    scores = (keys @ queries.to(torch.bfloat16).T).float()
    view = scores.numpy()
    rows, columns = same_group
    view[columns, rows] = -np.inf
    view[np.flatnonzero(~key_mask)] = -np.inf
    return scores


def _pairs_of(slots: np.ndarray, slot_pairs: np.ndarray) -> np.ndarray:
    """Map search positions to pair indices, keeping -1 pads."""
    if slot_pairs.size == 0:
        return np.full(slots.shape, -1, dtype=np.int64)
    return np.where(slots >= 0, slot_pairs[np.maximum(slots, 0)], -1)


@dataclass
class PoolSearch:
    """Result of :meth:`CandidateSearch.search_pool` for A queries.

    - ``pairs``: int64 ``[A, k]`` nearest pool pairs of other groups, most similar first, -1 pads.
    - ``similarities``: float32 ``[A, k]`` s(a, c), -inf pads.
    - ``reserve_pairs``: int64 ``[A, R]``, pool pairs that include the
      ``k + n_reserve`` nearest: either the whole pool in any order (R = P,
      possibly a broadcast read-only view) or the nearest, sorted; -1 pads.
    - ``reserve_sims``: float32 ``[A, R]`` s(a, c), -inf where the pair is not eligible.
    - ``keys``: float32 ``[A, k, 2d]`` keys of ``pairs`` (any row at pads),
      taken from the flat index's key cache; None for the approximate indexes.
    - ``reserve_complete``: False when the reserve may miss some of the
      ``k + n_reserve`` nearest. The bfloat16 search's reserve holds only
      its k nearest, ``pairs`` and ``similarities`` again.
    - ``directional``: float32 ``[A, k]`` <img_a, txt_c> and <txt_a, img_c>
      of ``pairs`` (0 at pads), from the bfloat16 search's float32
      re-scoring; None when the search did not compute them.
    """

    pairs: np.ndarray
    similarities: np.ndarray
    reserve_pairs: np.ndarray
    reserve_sims: np.ndarray
    keys: torch.Tensor | None = None
    reserve_complete: bool = True
    directional: tuple[np.ndarray, np.ndarray] | None = None


def _empty_counts() -> dict[str, int]:
    """Counters of the bfloat16 search (see :attr:`CandidateSearch.counts`)."""
    names = ("bfloat16_anchors", "rescored_keys", "second_pass_anchors", "second_pass_keys", "full_row_anchors")
    return dict.fromkeys(names, 0)
