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

With ``bfloat16=True`` the cache also keeps a bfloat16 copy of the keys, and
per slot the norm of the float32 key and the norm of its bfloat16 rounding
error, which bound the error of the bfloat16 search (see
:mod:`falcon_rl.mining.certified`).

Memory: ``[P, 2d]`` float32 keys plus an int32 slot map of ``[N]``; with
bfloat16, another ``[P, 2d]`` bfloat16 keys and two float64 ``[P]`` norms.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from falcon_rl.mining.bank import EmbeddingBank


class KeyCache:
    """Float32 keys ``[img, txt]`` of the pairs of the current search pool, one pair per slot.

    :param bfloat16: also keep bfloat16 keys and the norms that bound their rounding error.
        It may be switched between calls of :meth:`sync`; switching it on rebuilds the cache.
    """

    def __init__(self, bfloat16: bool = False) -> None:
        self.bfloat16 = bfloat16
        self.keys: torch.Tensor | None = None
        self.keys_bfloat16: torch.Tensor | None = None
        self.slot_pairs = np.empty(0, dtype=np.int64)   # pair index per slot, -1 when free
        self._key_norms = np.empty(0, dtype=np.float64)
        self._rounding_norms = np.empty(0, dtype=np.float64)
        self._slot_versions = np.empty(0, dtype=np.int64)
        self._slot_of_pair = np.empty(0, dtype=np.int32)  # [N], -1 when not cached
        self._bank: weakref.ReferenceType[EmbeddingBank] | None = None

    @property
    def occupied(self) -> np.ndarray:
        """Bool ``[C]``: the slot contains a pair of the current pool."""
        return self.slot_pairs >= 0

    def sync(self, pool: np.ndarray, bank: EmbeddingBank) -> None:
        """Make the cached pairs exactly ``pool``, with keys as they are in ``bank`` now."""
        if not self.bfloat16:
            self.keys_bfloat16 = None
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

    def keys_of(self, pairs: np.ndarray, bank: EmbeddingBank) -> torch.Tensor:
        """Return the keys ``[len(pairs), 2d]`` of the given pairs as :meth:`EmbeddingBank.keys` does.

        When every pair is cached with its current bank row, the rows come
        from the cache, which is smaller and more recently read than the bank.
        """
        if self.keys is None or self._bank is None or self._bank() is not bank or self.keys.device.type != "cpu":
            return bank.keys(pairs)
        slots = self._slot_of_pair[pairs]
        if (slots < 0).any() or (self._slot_versions[slots] != bank.row_version[pairs]).any():
            return bank.keys(pairs)
        return self.rows(slots)

    def norm_bounds(self) -> tuple[float, float]:
        """Return the largest key norm and the largest bfloat16 rounding-error norm of the occupied slots.

        Only a cache built with ``bfloat16=True`` tracks them; both are 0 for an empty pool.
        """
        occupied = self.occupied
        if not occupied.any():
            return 0.0, 0.0
        return float(self._key_norms[occupied].max()), float(self._rounding_norms[occupied].max())

    def _write(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        if self.keys.device.type == "cpu":
            # NumPy's fancy assignment is much faster than torch's index_put on the CPU.
            self.keys.numpy()[slots] = rows.numpy()
        else:
            self.keys[torch.as_tensor(slots, device=self.keys.device)] = rows.to(self.keys.device)
        if self.bfloat16:
            self._write_bfloat16(slots, rows)

    def _write_bfloat16(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        rounded = rows.to(self.keys.device).bfloat16()
        if self.keys.device.type == "cpu":
            # NumPy has no bfloat16, so the rows move as their 16-bit patterns.
            self.keys_bfloat16.view(torch.int16).numpy()[slots] = rounded.view(torch.int16).numpy()
        else:
            self.keys_bfloat16[torch.as_tensor(slots, device=self.keys.device)] = rounded
        key_norms, rounding_norms = _norms(rows, rounded)
        self._key_norms[slots] = key_norms
        self._rounding_norms[slots] = rounding_norms

    def _must_rebuild(self, pool: np.ndarray, bank: EmbeddingBank) -> bool:
        return (
            self.keys is None
            or self._bank is None
            or self._bank() is not bank
            or self.keys.shape[1] != 2 * bank.dim
            or self.keys.device != bank.device
            or self.slot_pairs.size < pool.size
            or (self.bfloat16 and self.keys_bfloat16 is None)
        )

    def _rebuild(self, pool: np.ndarray, bank: EmbeddingBank) -> None:
        self.keys = bank.keys(pool).contiguous()
        self.slot_pairs = pool.astype(np.int64).copy()
        self._slot_versions = bank.row_version[pool].copy()
        self._slot_of_pair = np.full(bank.n_pairs, -1, dtype=np.int32)
        self._slot_of_pair[pool] = np.arange(pool.size, dtype=np.int32)
        self._bank = weakref.ref(bank)
        if self.bfloat16:
            self.keys_bfloat16 = self.keys.bfloat16()
            self._key_norms, self._rounding_norms = _norms(self.keys, self.keys_bfloat16)


def _norms(rows: torch.Tensor, rounded: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Return the norms of float32 rows and of their bfloat16 rounding errors (computed in float32).

    The difference of a float32 number and its bfloat16 rounding is exact in
    float32; the bound's safety factor covers the rounding of the norms.
    """
    exact = rows.to(rounded.device, torch.float32)
    if exact.device.type == "cpu":
        exact = exact.numpy()
        error = rounded.float().numpy() - exact
        squares = np.einsum("ij,ij->i", exact, exact), np.einsum("ij,ij->i", error, error)
        return tuple(np.sqrt(values.astype(np.float64)) for values in squares)
    norms = torch.linalg.vector_norm(exact, dim=1)
    rounding_norms = torch.linalg.vector_norm(rounded.float() - exact, dim=1)
    return norms.double().cpu().numpy(), rounding_norms.double().cpu().numpy()
