"""Batch builder: places every training pair once per epoch, as an anchor or a mined negative.

Each epoch visits the pairs in the order ``np.random.default_rng([seed,
epoch]).permutation(N)``, so every scheduler run with the same seed sees the
same anchors as long as it picks the same negatives. A batch of size B has
``ceil(B / 2)`` anchors, the next unplaced pairs in that order, and up to
``floor(B / 2)`` negatives chosen from the anchors' candidates. The search
space is the first ``search_space`` unplaced pairs (anchors included).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from falcon_rl.mining.bank import EmbeddingBank
from falcon_rl.mining.batch import MinedBatch, Proposal
from falcon_rl.mining.errors import MiningError
from falcon_rl.mining.observation import similarity_features
from falcon_rl.mining.search import CandidateSearch, directional_similarities, queries_from_keys
from falcon_rl.mining.selection import Selection, choose_negatives, choose_negatives_reference

logger = logging.getLogger(__name__)

# Stream tags that keep the random draws of candidate filling and of the
# exhausted-anchor fallback independent of each other.
_RANDOM_CANDIDATE_STREAM = 0
_RANDOM_NEGATIVE_STREAM = 1


class BatchBuilder:
    """Builds mini-batches of anchors and hardness-selected negatives (GRIT-VLP-style grouping).

    Use ``propose(bank)`` then ``select(proposal, hardness)`` for a mined
    batch, or ``random_batch()`` with mining off. An epoch ends when every
    pair is placed; the next call starts the next epoch.

    :param image_ids: int ``[N]`` image_id of each pair; pairs of one image are
        positives of each other and never negatives.
    :param batch_size: pairs per batch B (the last batch of an epoch may be smaller).
    :param search_space: number of unplaced pairs, in epoch order, searched
        for candidates (GRIT-VLP: 15 batches).
    :param top_k: candidates per anchor K.
    :param seed: seed of the epoch orders and of the random fallbacks.
    :param backend: candidate search backend, ``"faiss"`` or ``"torch"``.
    :param block_size: keys per matrix product of the torch backend.
    :param index: ``"flat"`` (exact search, the default), ``"ivf"`` or
        ``"hnsw"`` (approximate FAISS indexes kept across batches, for large
        search spaces; CPU only, backend ``"faiss"``). The search beyond the
        search space always uses the exact search.
    :param index_options: options of the approximate index (see
        :class:`~falcon_rl.mining.approximate.ApproximateIndex`).
    :param precision: ``"auto"`` (the default), ``"float32"`` or
        ``"bfloat16"``: the arithmetic of the torch backend's search (see
        :mod:`falcon_rl.mining.search`). Bfloat16 scores are certified and
        re-scored in float32, so every precision builds the same batches, up
        to similarities that are equal within float32 rounding. ``"auto"``
        uses bfloat16 on CPUs where it was measured faster.
    """

    def __init__(
        self,
        image_ids: np.ndarray,
        batch_size: int,
        search_space: int,
        top_k: int,
        seed: int,
        backend: str = "faiss",
        block_size: int = 65536,
        index: str = "flat",
        index_options: dict | None = None,
        precision: str = "auto",
    ) -> None:
        image_ids = np.asarray(image_ids)
        if image_ids.ndim != 1 or image_ids.size == 0 or not np.issubdtype(image_ids.dtype, np.integer):
            raise MiningError(f"image_ids must be a non-empty 1-D integer array, got shape {image_ids.shape} "
                              f"and dtype {image_ids.dtype}")
        for name, value in (("batch_size", batch_size), ("search_space", search_space), ("top_k", top_k)):
            if int(value) < 1:
                raise MiningError(f"{name} must be >= 1, got {value}")

        self.image_ids = image_ids.astype(np.int64)
        self.n_pairs = int(image_ids.size)
        self.batch_size = int(batch_size)
        self.search_space = int(search_space)
        self.top_k = int(top_k)
        self.seed = int(seed)
        self._search = CandidateSearch(backend, block_size, index, index_options, precision)
        # The search beyond the search space is rare and moves on every call,
        # so it runs exactly, without the caches of the main search.
        self._exact_search = CandidateSearch(backend, block_size, precision="float32")
        self._fallback_sims: dict[int, float] = {}
        # (epoch, batch_index, bank) of the latest proposal whose reserve may
        # miss the nearest pairs, which select() then recomputes in float32.
        self._partial_reserve: tuple[int, int, weakref.ReferenceType[EmbeddingBank]] | None = None
        self._exact_reserves = 0
        self._start_epoch(0)

    # ---- epoch bookkeeping -------------------------------------------------

    @property
    def epoch_finished(self) -> bool:
        """Whether every pair of the current epoch is placed."""
        return self._n_placed >= self.n_pairs

    @property
    def n_remaining(self) -> int:
        """Pairs not yet placed in the current epoch."""
        return self.n_pairs - self._n_placed

    @property
    def steps_per_epoch(self) -> int:
        """Estimate of batches per epoch, ``ceil(N / B)``; anchors left without a negative add batches."""
        return math.ceil(self.n_pairs / self.batch_size)

    @property
    def search_counts(self) -> dict[str, int]:
        """Counters of the bfloat16 search since the builder was made.

        The counters of :attr:`CandidateSearch.counts` (anchors searched in
        bfloat16, keys re-scored in float32, certificate second passes and
        fallbacks), and ``exact_reserve_anchors``: exhausted anchors whose
        nearest free pair :meth:`select` recomputed in float32.
        """
        return dict(self._search.counts, exact_reserve_anchors=self._exact_reserves)

    @property
    def max_anchors(self) -> int:
        """Anchors of a full batch, ``ceil(B / 2)``."""
        return math.ceil(self.batch_size / 2)

    def start_next_epoch(self) -> None:
        """Start the next epoch now, even if pairs of the current one are unplaced."""
        self._start_epoch(self.epoch + 1)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batch_index = 0
        self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_pairs)
        self._placed = np.zeros(self.n_pairs, dtype=bool)
        self._n_placed = 0
        self._head = 0
        logger.debug("epoch %d started with %d pairs", epoch, self.n_pairs)

    def _begin_batch(self) -> tuple[int, int]:
        if self.epoch_finished:
            self.start_next_epoch()
        size = min(self.batch_size, self.n_remaining)
        n_anchors = math.ceil(size / 2)
        return n_anchors, size - n_anchors

    def _unplaced(self, count: int, skip: int = 0) -> np.ndarray:
        """Return unplaced pairs ``skip .. skip + count - 1`` in epoch order (fewer near the end)."""
        end = skip + count
        pieces = []
        found = 0
        position = self._head
        width = max(2 * end, 1024)
        while found < end and position < self.n_pairs:
            chunk = self._order[position : position + width]
            chunk = chunk[~self._placed[chunk]]
            pieces.append(chunk)
            found += chunk.size
            position += width
            width *= 2
        unplaced = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
        return unplaced[skip:end]

    def _advance_head(self) -> None:
        width = 1024
        while self._head < self.n_pairs:
            placed = self._placed[self._order[self._head : self._head + width]]
            if not placed.all():
                self._head += int(np.argmin(placed))
                return
            self._head += placed.size
            width *= 2

    # ---- proposal ----------------------------------------------------------

    def propose(self, bank: EmbeddingBank) -> Proposal:
        """Return the next batch's anchors with their top-K candidates and similarity features.

        Candidates come from the search space's unplaced pairs, excluding the
        batch's anchors and each anchor's positives. An anchor with fewer than
        K of them gets the nearest eligible pairs among the next
        ``search_space`` unplaced pairs after the search space (so the cost
        stays that of two search spaces), then random eligible unplaced
        pairs; ``Proposal.fallbacks`` counts the slots filled each way.

        The proposal reads only rows of unplaced pairs, and its result depends
        only on the bank and the builder's position, so it may run in another
        thread (see :mod:`falcon_rl.mining.prefetch`).

        :param bank: embeddings of all N pairs, as they stand now.
        """
        if bank.n_pairs != self.n_pairs:
            raise MiningError(f"bank has {bank.n_pairs} pairs but the builder has {self.n_pairs}")
        n_anchors, n_negatives = self._begin_batch()

        window = self._unplaced(max(self.search_space, n_anchors))
        anchors = window[:n_anchors]
        pool = window[n_anchors : self.search_space]
        # The anchors were in the previous batch's pool, so the search's key
        # cache usually has their keys.
        anchor_keys = self._search.keys_of(anchors, bank)
        queries = queries_from_keys(anchor_keys)

        # The nearest K pool pairs are the candidates. The reserve contains at
        # least the K + A nearest. Those always include the nearest pair that is
        # neither a candidate nor taken by one of the other A - 1 anchors, which
        # is the exhausted-anchor fallback of select().
        found = self._search.search_pool(
            queries, self.image_ids[anchors], pool, self.image_ids, bank, self.top_k, n_reserve=n_anchors
        )
        candidates = found.pairs
        self._partial_reserve = None if found.reserve_complete else (self.epoch, self.batch_index, weakref.ref(bank))

        # The search's own keys and similarities of the candidates are valid
        # while no fallback replaced any of them.
        candidate_keys, directional = found.keys, found.directional
        fallbacks = {"beyond_search_space": 0, "random": 0}
        if (candidates < 0).any():
            candidate_keys = directional = None
            beyond = self._unplaced(self.search_space, skip=self.search_space)
            beyond = beyond[~np.isin(beyond, anchors)]
            candidates, fallbacks["beyond_search_space"] = self._fill_from_beyond(
                candidates, queries, anchors, beyond, bank
            )
        if (candidates < 0).any():
            candidates, fallbacks["random"] = self._fill_at_random(candidates, anchors)

        return self._make_proposal(
            bank, anchors, anchor_keys, candidates, (candidate_keys, directional),
            (found.reserve_pairs, found.reserve_sims), fallbacks, n_negatives,
        )

    def _fill_from_beyond(
        self,
        candidates: np.ndarray,
        queries: torch.Tensor,
        anchors: np.ndarray,
        beyond: np.ndarray,
        bank: EmbeddingBank,
    ) -> tuple[np.ndarray, int]:
        rows = np.flatnonzero((candidates < 0).any(axis=1))
        if beyond.size == 0 or rows.size == 0:
            return candidates, 0

        positions, _ = self._exact_search.search(
            queries[rows], self.image_ids[anchors[rows]], bank.keys(beyond), self.image_ids[beyond], self.top_k
        )
        extra = np.where(positions >= 0, beyond[np.clip(positions, 0, None)], -1)
        needed = (candidates[rows] < 0).sum(axis=1)
        keep = (np.arange(self.top_k)[None, :] < needed[:, None]) & (extra >= 0)
        merged = np.concatenate([candidates[rows], np.where(keep, extra, -1)], axis=1)
        candidates = candidates.copy()
        candidates[rows] = _compact_rows(merged)[:, : self.top_k]
        return candidates, int(keep.sum())

    def _fill_at_random(self, candidates: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, int]:
        # NOTE: this scans all unplaced pairs, O(N) per call; it runs only when
        # the search space and the window beyond it hold too few eligible pairs.
        unplaced = self._unplaced(self.n_remaining)
        candidates = candidates.copy()
        filled = 0
        for row in np.flatnonzero((candidates < 0).any(axis=1)):
            valid = candidates[row] >= 0
            blocked = np.concatenate([anchors, candidates[row, valid]])
            eligible = unplaced[
                ~np.isin(unplaced, blocked) & (self.image_ids[unplaced] != self.image_ids[anchors[row]])
            ]
            n_draw = min(int((~valid).sum()), eligible.size)
            if n_draw == 0:
                continue
            rng = np.random.default_rng([self.seed, self.epoch, self.batch_index, _RANDOM_CANDIDATE_STREAM, row])
            drawn = rng.choice(eligible, size=n_draw, replace=False)
            candidates[row] = _compact_rows(np.concatenate([candidates[row, valid], drawn])[None, :], self.top_k)[0]
            filled += n_draw
        return candidates, filled

    def _make_proposal(
        self,
        bank: EmbeddingBank,
        anchors: np.ndarray,
        anchor_keys: torch.Tensor,
        candidates: np.ndarray,
        found: tuple[torch.Tensor | None, tuple[np.ndarray, np.ndarray] | None],
        reserve: tuple[np.ndarray, np.ndarray],
        fallbacks: dict[str, int],
        n_negatives: int,
    ) -> Proposal:
        """Build the proposal from the search's candidate keys or its (i2t, t2i) in ``found`` (either may be None)."""
        valid = candidates >= 0
        dim = bank.dim
        candidate_keys, directional = found
        if directional is not None:
            i2t, t2i = directional
            keys = anchor_keys.cpu().numpy()
            positive = torch.from_numpy(np.einsum("ij,ij->i", keys[:, :dim], keys[:, dim:]))
        else:
            if candidate_keys is None:
                rows = bank.keys(np.clip(candidates, 0, None).reshape(-1))
                candidate_keys = rows.reshape(*candidates.shape, 2 * dim)
            i2t, t2i, positive = directional_similarities(
                anchor_keys[:, :dim], anchor_keys[:, dim:], candidate_keys[..., :dim], candidate_keys[..., dim:]
            )
            i2t, t2i = i2t.cpu().numpy(), t2i.cpu().numpy()
        i2t, t2i, positive = _finite(i2t), _finite(t2i), _finite(positive.cpu().numpy())
        i2t[~valid] = 0.0
        t2i[~valid] = 0.0
        sims = np.where(valid, (i2t + t2i) / 2.0, -np.inf).astype(np.float32)

        # Descending similarity, ties by pair index; pads (-inf) go last.
        order = np.lexsort((candidates, -sims), axis=1)
        candidates, sims, i2t, t2i = (np.take_along_axis(x, order, axis=1) for x in (candidates, sims, i2t, t2i))
        valid = candidates >= 0

        return Proposal(
            anchors=anchors,
            candidates=candidates,
            candidate_sims=sims,
            i2t_sims=i2t,
            t2i_sims=t2i,
            positive_sims=positive,
            features=similarity_features(positive, i2t, t2i, sims, valid),
            fallbacks=fallbacks,
            n_negatives=n_negatives,
            epoch=self.epoch,
            batch_index=self.batch_index,
            reserve=reserve[0],
            reserve_sims=reserve[1],
        )

    # ---- selection ---------------------------------------------------------

    def select(
        self, proposal: Proposal, hardness: np.ndarray | float, excluded: np.ndarray | None = None
    ) -> MinedBatch:
        """Choose each anchor's negative by hardness and place the batch.

        Anchors choose in order, each among its candidates that are not
        excluded and not chosen by an earlier anchor: the one at rank
        ``round((1 - q) * (m - 1))`` of the m free ones (q = 1: the most
        similar). An anchor without a free candidate takes the nearest free
        pair of the search space outside its candidate list, else a random
        unplaced one, and counts as ``"exhausted"``.

        :param proposal: the result of the latest :meth:`propose`.
        :param hardness: float ``[A]`` levels in [0, 1], or one level for all anchors.
        :param excluded: optional bool ``[A, K]``; True forbids that candidate
            (for example a likely false negative).
        """
        return self._select(proposal, hardness, excluded, choose_negatives)

    def select_reference(
        self, proposal: Proposal, hardness: np.ndarray | float, excluded: np.ndarray | None = None
    ) -> MinedBatch:
        """Do what :meth:`select` does with a plain loop over anchors; for tests."""
        return self._select(proposal, hardness, excluded, choose_negatives_reference)

    def _select(
        self,
        proposal: Proposal,
        hardness: np.ndarray | float,
        excluded: np.ndarray | None,
        chooser: Callable[..., Selection],
    ) -> MinedBatch:
        self._check_proposal(proposal)
        n_anchors = proposal.anchors.size
        levels = _check_hardness(hardness, n_anchors)
        eligible = proposal.valid.copy()
        if excluded is not None:
            excluded = np.asarray(excluded)
            if excluded.shape != proposal.candidates.shape or excluded.dtype != bool:
                raise MiningError(f"excluded must be a bool array of shape {proposal.candidates.shape}, "
                                  f"got {excluded.dtype} {excluded.shape}")
            eligible &= ~excluded

        self._fallback_sims = {}
        selection: Selection = chooser(
            proposal.candidates, eligible, levels, proposal.n_negatives, partial(self._fallback_negative, proposal)
        )

        rows = np.flatnonzero(selection.columns >= 0)
        negative_sims = np.full(n_anchors, np.nan, dtype=np.float32)
        negative_sims[rows] = proposal.candidate_sims[rows, selection.columns[rows]]
        for slot, sim in self._fallback_sims.items():
            negative_sims[slot] = sim

        fallbacks = dict(proposal.fallbacks, exhausted=selection.exhausted)
        return self._commit(proposal.anchors, selection.negatives, levels.astype(np.float32),
                            selection.ranks, negative_sims, fallbacks)

    def _fallback_negative(self, proposal: Proposal, slot: int, taken: np.ndarray) -> int:
        """Return the nearest free search-space pair outside the anchor's candidates, else a random one."""
        reserve, sims = self._reserve_of(proposal, slot)
        free = np.isfinite(sims) & (reserve >= 0)
        free &= ~np.isin(reserve, taken) & ~np.isin(reserve, proposal.candidates[slot])
        if free.any():
            best = int(np.argmax(np.where(free, sims, -np.inf)))
            self._fallback_sims[slot] = float(sims[best])
            return int(reserve[best])

        anchor_group = self.image_ids[proposal.anchors[slot]]
        blocked = np.concatenate([taken, proposal.candidates[slot], proposal.anchors])
        unplaced = self._unplaced(self.n_remaining)
        eligible = unplaced[~np.isin(unplaced, blocked) & (self.image_ids[unplaced] != anchor_group)]
        if eligible.size == 0:
            return -1
        rng = np.random.default_rng([self.seed, self.epoch, self.batch_index, _RANDOM_NEGATIVE_STREAM, slot])
        return int(eligible[rng.integers(eligible.size)])

    def _reserve_of(self, proposal: Proposal, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Return pool pairs that include the anchor's K + A nearest, and their similarities."""
        if self._partial_reserve is None or self._partial_reserve[:2] != (proposal.epoch, proposal.batch_index):
            return proposal.reserve[slot], proposal.reserve_sims[slot]

        bank = self._partial_reserve[2]()
        if bank is None:
            raise MiningError("the bank of this proposal was deleted; call propose() again")
        # The builder has not moved since propose(), so the window is the same.
        n_anchors = proposal.anchors.size
        pool = self._unplaced(max(self.search_space, n_anchors))[n_anchors : self.search_space]
        anchor = proposal.anchors[slot : slot + 1]
        self._exact_reserves += 1
        if pool.size == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        positions, sims = self._exact_search.search(
            queries_from_keys(bank.keys(anchor)), self.image_ids[anchor], bank.keys(pool), self.image_ids[pool],
            self.top_k + n_anchors,
        )
        return np.where(positions[0] >= 0, pool[np.maximum(positions[0], 0)], -1), sims[0]

    def random_batch(self) -> MinedBatch:
        """Place the next B unplaced pairs in epoch order, without mining.

        The first ``ceil(B / 2)`` are reported as anchors and the rest as
        their negatives in order, so false-negative rates of random batches
        compare with mined ones.
        """
        n_anchors, n_negatives = self._begin_batch()
        pairs = self._unplaced(n_anchors + n_negatives)
        negatives = np.full(n_anchors, -1, dtype=np.int64)
        negatives[:n_negatives] = pairs[n_anchors:]
        return self._commit(
            pairs[:n_anchors],
            negatives,
            np.full(n_anchors, np.nan, dtype=np.float32),
            np.full(n_anchors, -1, dtype=np.int64),
            np.full(n_anchors, np.nan, dtype=np.float32),
            {"beyond_search_space": 0, "random": 0, "exhausted": 0},
        )

    def _commit(
        self,
        anchors: np.ndarray,
        negatives: np.ndarray,
        hardness: np.ndarray,
        ranks: np.ndarray,
        negative_sims: np.ndarray,
        fallbacks: dict[str, int],
    ) -> MinedBatch:
        pair_indices = np.concatenate([anchors, negatives[negatives >= 0]]).astype(np.int64)
        if self._placed[pair_indices].any() or len(set(pair_indices.tolist())) != pair_indices.size:
            raise RuntimeError("batch builder tried to place a pair twice in one epoch")
        self._placed[pair_indices] = True
        self._n_placed += pair_indices.size
        self._advance_head()

        batch = MinedBatch(
            pair_indices=pair_indices,
            anchors=anchors.astype(np.int64),
            negatives=negatives.astype(np.int64),
            hardness=hardness,
            negative_ranks=ranks,
            negative_sims=negative_sims,
            fallbacks=fallbacks,
            epoch_end=self.epoch_finished,
            epoch=self.epoch,
            batch_index=self.batch_index,
        )
        self.batch_index += 1
        return batch

    def _check_proposal(self, proposal: Proposal) -> None:
        if (proposal.epoch, proposal.batch_index) != (self.epoch, self.batch_index) or self.epoch_finished:
            raise MiningError(
                f"proposal for epoch {proposal.epoch} batch {proposal.batch_index} is stale: the builder is at "
                f"epoch {self.epoch} batch {self.batch_index}; call propose() again"
            )

    # ---- checkpointing -----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return the builder's position (ints and one bool array) for an exact resume."""
        return {
            "n_pairs": self.n_pairs,
            "batch_size": self.batch_size,
            "search_space": self.search_space,
            "top_k": self.top_k,
            "seed": self.seed,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "placed": self._placed.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the settings must match this builder."""
        for name in ("n_pairs", "batch_size", "search_space", "top_k"):
            if int(state[name]) != getattr(self, name):
                raise MiningError(f"builder state has {name}={int(state[name])}, but this builder has "
                                  f"{name}={getattr(self, name)}")
        placed = np.asarray(state["placed"], dtype=bool)
        if placed.shape != (self.n_pairs,):
            raise MiningError(f"builder state 'placed' has shape {placed.shape}, expected ({self.n_pairs},)")

        self.seed = int(state["seed"])
        self._start_epoch(int(state["epoch"]))
        self.batch_index = int(state["batch_index"])
        self._placed = placed.copy()
        self._n_placed = int(placed.sum())
        self._advance_head()


def _compact_rows(rows: np.ndarray, width: int | None = None) -> np.ndarray:
    """Move each row's non-negative entries to the front (order kept), padding with -1 to ``width``."""
    order = np.argsort(rows < 0, axis=1, kind="stable")
    compact = np.take_along_axis(rows, order, axis=1)
    if width is not None and compact.shape[1] < width:
        compact = np.concatenate([compact, np.full((compact.shape[0], width - compact.shape[1]), -1)], axis=1)
    return compact


def _finite(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _check_hardness(hardness: np.ndarray | float, n_anchors: int) -> np.ndarray:
    levels = np.asarray(hardness, dtype=np.float64).reshape(-1)
    if levels.size == 1:
        levels = np.full(n_anchors, levels[0])
    if levels.shape != (n_anchors,):
        raise MiningError(f"hardness must have one level per anchor ({n_anchors}) or one for all, "
                          f"got shape {np.shape(hardness)}")
    if not np.all(np.isfinite(levels)) or np.any((levels < 0.0) | (levels > 1.0)):
        raise MiningError(f"hardness levels must be finite and in [0, 1], got {levels}")
    return levels
