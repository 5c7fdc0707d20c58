"""Embedding bank: the ITC embeddings of every training pair.

The bank is refreshed from the image and text embeddings that each training
step already computes (GRIT-VLP's trick, so mining costs no extra forward
pass). Rows of pairs that were never written are zero.

Both modalities live in one ``[N, 2d]`` tensor, image in the first d columns
and text in the last d, so that the candidate keys ``[img, txt]`` of a set of
pairs are a single row gather (see :meth:`EmbeddingBank.keys`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from falcon_rl.mining.errors import MiningError

IndexLike = np.ndarray | torch.Tensor | Sequence[int]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class EmbeddingBank:
    """Image and text ITC embeddings of all ``n_pairs`` training pairs.

    Writes through :meth:`update`, :meth:`fill` and :meth:`load_state_dict`
    replace non-finite values by 0, so searches can read rows as stored, and
    advance ``row_version``. Code that writes ``image``, ``text`` or
    ``embeddings`` directly must keep them finite and call :meth:`touch`.

    :param n_pairs: number of training pairs N.
    :param dim: embedding dimension d.
    :param dtype: storage dtype; ``torch.float16`` halves the memory.
        Searches convert the rows they read to float32 (as rows enter the
        search's key cache), so they always compute in float32.
    :param device: device of the bank's tensors.
    """

    def __init__(
        self,
        n_pairs: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if int(n_pairs) < 1:
            raise MiningError(f"n_pairs must be >= 1, got {n_pairs}")
        if int(dim) < 1:
            raise MiningError(f"dim must be >= 1, got {dim}")
        if dtype not in DTYPES:
            raise MiningError(f"dtype must be one of {DTYPES}, got {dtype}")

        self.n_pairs = int(n_pairs)
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.embeddings = torch.zeros(self.n_pairs, 2 * self.dim, dtype=dtype, device=self.device)
        self.filled = torch.zeros(self.n_pairs, dtype=torch.bool, device=self.device)
        # Write counter, and the counter value of each row's latest write, so a
        # cache of rows (an approximate index) can tell which rows changed.
        self.version = 0
        self.row_version = np.zeros(self.n_pairs, dtype=np.int64)

    @property
    def image(self) -> torch.Tensor:
        """Image embeddings ``[N, d]``, a view of the bank's storage."""
        return self.embeddings[:, : self.dim]

    @property
    def text(self) -> torch.Tensor:
        """Text embeddings ``[N, d]``, a view of the bank's storage."""
        return self.embeddings[:, self.dim :]

    def update(self, pair_indices: IndexLike, image_embed: torch.Tensor, text_embed: torch.Tensor) -> None:
        """Write the embeddings of the given pairs (for example one training batch).

        :param pair_indices: int pair indices ``[B]``, each in ``[0, N)``.
        :param image_embed: image embeddings ``[B, d]``; detached before storing.
        :param text_embed: text embeddings ``[B, d]``; detached before storing.
        """
        index = self._as_index(pair_indices)
        for name, embed in (("image_embed", image_embed), ("text_embed", text_embed)):
            if tuple(embed.shape) != (index.numel(), self.dim):
                raise MiningError(
                    f"{name} must have shape ({index.numel()}, {self.dim}), got {tuple(embed.shape)}"
                )

        rows = torch.cat([image_embed.detach().to(self.device), text_embed.detach().to(self.device)], dim=1)
        self.embeddings[index] = _finite(rows.to(self.dtype))
        self.filled[index] = True
        self.version += 1
        self.row_version[index.cpu().numpy()] = self.version

    def fill(self, image_embed: torch.Tensor, text_embed: torch.Tensor, start: int = 0) -> None:
        """Write a contiguous block of rows, e.g. during an initial embedding pass.

        :param image_embed: image embeddings ``[n, d]`` of pairs ``start .. start + n - 1``.
        :param text_embed: text embeddings ``[n, d]`` of the same pairs.
        :param start: index of the first pair written.
        """
        n = int(image_embed.shape[0])
        if start < 0 or start + n > self.n_pairs:
            raise MiningError(
                f"fill writes rows [{start}, {start + n}), which must lie in [0, {self.n_pairs})"
            )
        self.update(torch.arange(start, start + n), image_embed, text_embed)

    def touch(self, pair_indices: IndexLike | None = None) -> None:
        """Mark rows (all when None) as written, after writing ``embeddings`` directly."""
        self.version += 1
        if pair_indices is None:
            self.row_version[:] = self.version
        else:
            self.row_version[self._as_index(pair_indices).cpu().numpy()] = self.version

    def keys(self, pair_indices: IndexLike) -> torch.Tensor:
        """Return float32 candidate keys ``[img, txt]`` of the given pairs, ``[n, 2d]``, as stored."""
        index = self._as_index(pair_indices)
        if self.device.type == "cpu" and self.dtype != torch.bfloat16:
            # NumPy's take gathers rows several times faster than torch indexing
            # on the CPU (measured with torch 2.13), and NumPy has no bfloat16.
            rows = torch.from_numpy(np.take(self.embeddings.numpy(), index.numpy(), axis=0))
        else:
            rows = self.embeddings.index_select(0, index)
        return rows.float()

    def vectors(self, pair_indices: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float32 image and text rows of the given pairs, non-finite values set to 0."""
        rows = _finite(self.embeddings[self._as_index(pair_indices)].float())
        return rows[:, : self.dim], rows[:, self.dim :]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return copies of the bank's tensors (on CPU) for checkpointing."""
        return {
            "image": self.image.cpu().contiguous().clone(),
            "text": self.text.cpu().contiguous().clone(),
            "filled": self.filled.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore tensors saved by :meth:`state_dict`; the shapes must match this bank."""
        for name in ("image", "text"):
            if tuple(state[name].shape) != (self.n_pairs, self.dim):
                raise MiningError(
                    f"bank state '{name}' has shape {tuple(state[name].shape)}, "
                    f"expected ({self.n_pairs}, {self.dim})"
                )
        rows = torch.cat([state["image"].to(self.device), state["text"].to(self.device)], dim=1)
        self.embeddings = _finite(rows.to(self.dtype)).contiguous()
        self.filled = state["filled"].to(device=self.device, dtype=torch.bool).clone()
        self.version += 1
        self.row_version[:] = self.version

    def _as_index(self, pair_indices: IndexLike) -> torch.Tensor:
        index = torch.as_tensor(np.asarray(pair_indices) if not torch.is_tensor(pair_indices) else pair_indices)
        index = index.to(device=self.device, dtype=torch.int64).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_pairs):
            raise MiningError(f"pair indices must lie in [0, {self.n_pairs}), got min "
                              f"{int(index.min())} and max {int(index.max())}")
        return index


def _finite(values: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
