"""Approximate candidate search: a FAISS IVF or HNSW index kept across batches.

Building an approximate index costs more than one exact search of the same
keys, so the index pays off only when it is kept. Consecutive search spaces
overlap almost entirely: each batch removes the pairs it placed and the
window of unplaced pairs moves on by about one batch. The index therefore
follows the search space incrementally. Each search adds the pool pairs it
lacks, removes (IVF) or filters out (HNSW) the pairs that left the pool, and
re-adds pairs whose bank rows were written since they were added (tracked
with :attr:`EmbeddingBank.row_version`).

- ``"ivf"``: ``faiss.IndexIVFFlat`` with inner-product metric, trained on the
  first pool it indexes and retrained after the pool has been replaced
  ``retrain_after`` times over, so the coarse centroids follow the drift of
  the embeddings during training. ``nprobe`` of ``nlist`` lists are scanned.
- ``"hnsw"``: ``faiss.IndexHNSWFlat`` with inner-product metric. HNSW cannot
  delete, so pairs that left the pool are masked with an ``IDSelectorBitmap``
  and the graph is rebuilt once masked entries outnumber live ones.

Both return approximate top-K lists: a candidate may be missed, and results
depend on the order in which pairs were added. The exact ``"flat"`` search
is the default, and the only one the equality tests use.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import torch

from falcon_rl.mining.bank import EmbeddingBank
from falcon_rl.mining.errors import MiningError
from falcon_rl.mining.positives import drop_same_group, same_group_counts

logger = logging.getLogger(__name__)

APPROXIMATE_INDEXES = ("ivf", "hnsw")

# FAISS warns when k-means has fewer than 39 training points per centroid.
_MIN_POINTS_PER_CENTROID = 39


class ApproximateIndex:
    """A FAISS IVF or HNSW index over the current search space, updated incrementally.

    :param kind: ``"ivf"`` or ``"hnsw"``.
    :param nlist: IVF lists; 0 picks ``round(4 * sqrt(P))`` for a pool of P
        pairs, capped so that each list has at least 39 training points.
    :param nprobe: IVF lists scanned per query.
    :param hnsw_m: HNSW neighbours per node (``M``).
    :param ef_search: HNSW candidate list size during search.
    :param ef_construction: HNSW candidate list size while adding.
    :param retrain_after: IVF: retrain after this many pool sizes of additions.
    """

    def __init__(
        self,
        kind: str,
        nlist: int = 0,
        nprobe: int = 8,
        hnsw_m: int = 32,
        ef_search: int = 64,
        ef_construction: int = 40,
        retrain_after: float = 4.0,
    ) -> None:
        if kind not in APPROXIMATE_INDEXES:
            raise MiningError(f"approximate index must be one of {APPROXIMATE_INDEXES}, got {kind!r}")
        for name, value in (("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_search", ef_search),
                            ("ef_construction", ef_construction)):
            if int(value) < 1:
                raise MiningError(f"{name} must be >= 1, got {value}")
        if int(nlist) < 0:
            raise MiningError(f"nlist must be >= 0 (0 picks it from the pool size), got {nlist}")
        if not retrain_after > 0:
            raise MiningError(f"retrain_after must be > 0, got {retrain_after}")

        self.kind = kind
        self.nlist = int(nlist)
        self.nprobe = int(nprobe)
        self.hnsw_m = int(hnsw_m)
        self.ef_search = int(ef_search)
        self.ef_construction = int(ef_construction)
        self.retrain_after = float(retrain_after)
        self.reset()

    def reset(self) -> None:
        """Forget the index; the next search builds it from scratch."""
        self._index: faiss.Index | None = None
        self._members = np.empty(0, dtype=np.int64)      # pair indices in the index, sorted
        self._member_versions = np.empty(0, dtype=np.int64)
        self._added_since_build = 0
        self._build_size = 0
        # HNSW only: pair index of each internal id, and whether it is live.
        self._slot_pairs = np.empty(0, dtype=np.int64)
        self._slot_live = np.empty(0, dtype=bool)

    def search(
        self,
        queries: torch.Tensor,
        query_groups: np.ndarray,
        pool: np.ndarray,
        groups: np.ndarray,
        bank: EmbeddingBank,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return about the ``k`` nearest pool pairs of other groups per query, with similarities.

        Parameters are those of :meth:`CandidateSearch.search_pool`.
        """
        n_queries = int(queries.shape[0])
        pairs = np.full((n_queries, k), -1, dtype=np.int64)
        similarities = np.full((n_queries, k), -np.inf, dtype=np.float32)
        if n_queries == 0 or k == 0 or pool.size == 0:
            return pairs, similarities
        if bank.device.type != "cpu":
            raise MiningError(f"approximate index {self.kind!r} runs on the CPU; the bank is on {bank.device}")
        self._sync(np.sort(pool), bank)

        n_results = min(k + int(same_group_counts(query_groups, groups[pool]).max()), int(pool.size))
        query_array = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        scores, found = self._index.search(query_array, n_results, params=self._search_parameters())
        if self.kind == "hnsw":
            found = np.where(found >= 0, self._slot_pairs[np.clip(found, 0, None)], -1)
        found, scores = drop_same_group(found, scores, query_groups, groups[np.clip(found, 0, None)], k)
        width = found.shape[1]
        pairs[:, :width] = found
        similarities[:, :width] = np.where(found >= 0, scores / 2.0, -np.inf)
        return pairs, similarities

    # ---- keeping the index in step with the pool -------------------------

    def _sync(self, pool: np.ndarray, bank: EmbeddingBank) -> None:
        versions = bank.row_version[pool]
        if self._needs_rebuild(pool):
            self._build(pool, versions, bank)
            return

        # Pairs already in the index whose rows did not change stay.
        position = np.clip(np.searchsorted(self._members, pool), 0, max(self._members.size - 1, 0))
        present = (self._members.size > 0) & (self._members[position] == pool)
        current = present & (self._member_versions[position] == versions)
        kept = np.zeros(self._members.size, dtype=bool)
        kept[position[current]] = True

        self._remove(self._members[~kept])
        self._add(pool[~current], bank)
        self._members = pool
        self._member_versions = versions

    def _needs_rebuild(self, pool: np.ndarray) -> bool:
        if self._index is None:
            return True
        if self.kind == "ivf":
            return self._added_since_build > self.retrain_after * max(self._build_size, 1)
        return int((~self._slot_live).sum()) > max(int(self._slot_live.sum()), pool.size)

    def _build(self, pool: np.ndarray, versions: np.ndarray, bank: EmbeddingBank) -> None:
        keys = np.ascontiguousarray(bank.keys(pool).numpy())
        dim = keys.shape[1]
        if self.kind == "ivf":
            nlist = self.nlist or round(4 * math.sqrt(pool.size))
            nlist = max(1, min(nlist, pool.size // _MIN_POINTS_PER_CENTROID))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(keys)
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
            index.nprobe = min(self.nprobe, nlist)
            self._index = index
            self._index.add_with_ids(keys, pool)
        else:
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.add(keys)
            self._index = index
            self._slot_pairs = pool.copy()
            self._slot_live = np.ones(pool.size, dtype=bool)
        self._members = pool
        self._member_versions = versions
        self._build_size = pool.size
        self._added_since_build = 0
        logger.debug("built %s index over %d pairs", self.kind, pool.size)

    def _remove(self, pairs: np.ndarray) -> None:
        if pairs.size == 0:
            return
        if self.kind == "ivf":
            self._index.remove_ids(np.ascontiguousarray(pairs, dtype=np.int64))
            return
        live = np.flatnonzero(self._slot_live)
        self._slot_live[live[np.isin(self._slot_pairs[live], pairs)]] = False

    def _add(self, pairs: np.ndarray, bank: EmbeddingBank) -> None:
        if pairs.size == 0:
            return
        keys = np.ascontiguousarray(bank.keys(pairs).numpy())
        if self.kind == "ivf":
            self._index.add_with_ids(keys, np.ascontiguousarray(pairs, dtype=np.int64))
        else:
            self._index.add(keys)
            self._slot_pairs = np.concatenate([self._slot_pairs, pairs])
            self._slot_live = np.concatenate([self._slot_live, np.ones(pairs.size, dtype=bool)])
        self._added_since_build += pairs.size

    def _search_parameters(self) -> faiss.SearchParameters | None:
        if self.kind == "ivf":
            return None
        # The packed bitmap must outlive the search, so it is kept on self.
        self._live_bitmap = np.packbits(self._slot_live, bitorder="little")
        selector = faiss.IDSelectorBitmap(self._slot_live.size, faiss.swig_ptr(self._live_bitmap))
        self._selector = selector
        return faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)
