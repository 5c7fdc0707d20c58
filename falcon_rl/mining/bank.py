"""Embedding bank: the ITC embeddings of every training pair.

The bank is refreshed from the image and text embeddings that each training
step already computes (GRIT-VLP's trick, so mining costs no extra forward
pass). Rows of pairs that were never written are zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from falcon_rl.mining.errors import MiningError

IndexLike = np.ndarray | torch.Tensor | Sequence[int]


class EmbeddingBank:
    """Image and text ITC embeddings of all ``n_pairs`` training pairs.

    :param n_pairs: number of training pairs N.
    :param dim: embedding dimension d.
    :param dtype: storage dtype; ``torch.float16`` halves the memory, and
        searches always compute in float32.
    :param device: device of the two ``[N, d]`` tensors.
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
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise MiningError(f"dtype must be a floating torch dtype, got {dtype}")

        self.n_pairs = int(n_pairs)
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.image = torch.zeros(self.n_pairs, self.dim, dtype=dtype, device=self.device)
        self.text = torch.zeros(self.n_pairs, self.dim, dtype=dtype, device=self.device)
        self.filled = torch.zeros(self.n_pairs, dtype=torch.bool, device=self.device)

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

        self.image[index] = image_embed.detach().to(device=self.device, dtype=self.dtype)
        self.text[index] = text_embed.detach().to(device=self.device, dtype=self.dtype)
        self.filled[index] = True

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

    def vectors(self, pair_indices: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float32 image and text rows of the given pairs, non-finite values set to 0."""
        index = self._as_index(pair_indices)
        image = torch.nan_to_num(self.image[index].float(), nan=0.0, posinf=0.0, neginf=0.0)
        text = torch.nan_to_num(self.text[index].float(), nan=0.0, posinf=0.0, neginf=0.0)
        return image, text

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the bank's tensors (on CPU) for checkpointing."""
        return {"image": self.image.cpu(), "text": self.text.cpu(), "filled": self.filled.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore tensors saved by :meth:`state_dict`; the shapes must match this bank."""
        for name in ("image", "text"):
            if tuple(state[name].shape) != (self.n_pairs, self.dim):
                raise MiningError(
                    f"bank state '{name}' has shape {tuple(state[name].shape)}, "
                    f"expected ({self.n_pairs}, {self.dim})"
                )
        self.image = state["image"].to(device=self.device, dtype=self.dtype).clone()
        self.text = state["text"].to(device=self.device, dtype=self.dtype).clone()
        self.filled = state["filled"].to(device=self.device, dtype=torch.bool).clone()

    def _as_index(self, pair_indices: IndexLike) -> torch.Tensor:
        index = torch.as_tensor(np.asarray(pair_indices) if not torch.is_tensor(pair_indices) else pair_indices)
        index = index.to(device=self.device, dtype=torch.int64).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_pairs):
            raise MiningError(f"pair indices must lie in [0, {self.n_pairs}), got min "
                              f"{int(index.min())} and max {int(index.max())}")
        return index
