"""Search-space keys kept across batches, so that each batch gathers only the rows it lacks.

Consecutive search spaces overlap almost entirely: a batch places about B
pairs of the window of unplaced pairs, and the window moves on by as many.
Gathering the whole ``[P, 2d]`` key matrix from the bank for every batch
would cost a full pass over it, about as much memory traffic as the search's
matrix product reads. The cache keeps the keys in fixed slots: pairs that
left the search space free their slot, new pairs fill free slots, and a
pair whose bank row was written since it was cached (its
:attr:`EmbeddingBank.row_version` moved on) is gathered again. Slots that
hold no pool pair are masked out of the search.

Memory: ``[P, 2d]`` float32 keys plus an int32 slot map of ``[N]``.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from falcon_rl.mining.bank import EmbeddingBank


class KeyCache:
    """Float32 keys ``[img, txt]`` of the pairs of the current search pool, one pair per slot."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.slot_pairs = np.empty(0, dtype=np.int64)   # pair index per slot, -1 when free
        self._slot_versions = np.empty(0, dtype=np.int64)
        self._slot_of_pair = np.empty(0, dtype=np.int32)  # [N], -1 when not cached
        self._bank: weakref.ReferenceType[EmbeddingBank] | None = None

    @property
    def occupied(self) -> np.ndarray:
        """Bool ``[C]``: the slot contains a pair of the current pool."""
        return self.slot_pairs >= 0

    def sync(self, pool: np.ndarray, bank: EmbeddingBank) -> None:
        """Make the cached pairs exactly ``pool``, with keys as they are in ``bank`` now."""
        if self._must_rebuild(pool, bank):
            self._rebuild(pool, bank)
            return

        versions = bank.row_version[pool]
        slots = self._slot_of_pair[pool].astype(np.int64)
        current = slots >= 0
        current[current] = self._slot_versions[slots[current]] == versions[current]

        keep = np.zeros(self.slot_pairs.size, dtype=bool)
        keep[slots[current]] = True
        leaving = self.slot_pairs[~keep & (self.slot_pairs >= 0)]
        self._slot_of_pair[leaving] = -1
        self.slot_pairs[~keep] = -1

        arriving = pool[~current]
        free = np.flatnonzero(~keep)[: arriving.size]
        if arriving.size:
            self._write(free, bank.keys(arriving))
        self.slot_pairs[free] = arriving
        self._slot_versions[free] = versions[~current]
        self._slot_of_pair[arriving] = free

    def slots_of(self, pairs: np.ndarray) -> np.ndarray:
        """Return the slot of each pair, -1 for pairs not in the cache."""
        return self._slot_of_pair[pairs].astype(np.int64)

    def rows(self, slots: np.ndarray) -> torch.Tensor:
        """Return the cached keys of the given slots, ``[len(slots), 2d]``."""
        if self.keys.device.type == "cpu":
            return torch.from_numpy(np.take(self.keys.numpy(), slots, axis=0))
        return self.keys.index_select(0, torch.as_tensor(slots, device=self.keys.device))

    def _write(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        if self.keys.device.type == "cpu":
            # NumPy's fancy assignment is much faster than torch's index_put on the CPU.
            self.keys.numpy()[slots] = rows.numpy()
        else:
            self.keys[torch.as_tensor(slots, device=self.keys.device)] = rows.to(self.keys.device)

    def _must_rebuild(self, pool: np.ndarray, bank: EmbeddingBank) -> bool:
        return (
            self.keys is None
            or self._bank is None
            or self._bank() is not bank
            or self.keys.shape[1] != 2 * bank.dim
            or self.keys.device != bank.device
            or self.slot_pairs.size < pool.size
        )

    def _rebuild(self, pool: np.ndarray, bank: EmbeddingBank) -> None:
        self.keys = bank.keys(pool).contiguous()
        self.slot_pairs = pool.astype(np.int64).copy()
        self._slot_versions = bank.row_version[pool].copy()
        self._slot_of_pair = np.full(bank.n_pairs, -1, dtype=np.int32)
        self._slot_of_pair[pool] = np.arange(pool.size, dtype=np.int32)
        self._bank = weakref.ref(bank)
