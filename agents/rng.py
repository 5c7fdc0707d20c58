"""Private states of torch's and NumPy's global random generators.

Stable-Baselines3 draws from the global generators: torch's for action
sampling and weight initialisation, NumPy's (``np.random``) for mini-batch
shuffling and replay sampling. An adapter swaps its own states in around
every call into SB3, so the agent neither disturbs the VLP training run's
random streams nor depends on them, and its states are saved with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class IsolatedRandomState:
    """Torch (CPU and, when used, one CUDA device) and NumPy global generator states kept apart.

    :param seed: seed of the private states
    :param device: the torch device the agent's networks run on
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.torch_cpu = torch.Generator().manual_seed(seed).get_state()
        self.torch_cuda = self._initial_cuda_state(seed)
        self.numpy = np.random.RandomState(seed).get_state()

    # NOTE: the CUDA branches are untested; the test suite runs on CPU only.
    def _initial_cuda_state(self, seed: int) -> torch.Tensor | None:
        if self.device.type != "cuda":
            return None
        return torch.Generator(device=self.device).manual_seed(seed).get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the block with the private states as the global ones, then restore the caller's."""
        outer_cpu = torch.get_rng_state()
        outer_numpy = np.random.get_state()
        outer_cuda = torch.cuda.get_rng_state(self.device) if self.torch_cuda is not None else None
        torch.set_rng_state(self.torch_cpu)
        np.random.set_state(self.numpy)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state(self.torch_cuda, self.device)
        try:
            yield
        finally:
            self.torch_cpu = torch.get_rng_state()
            self.numpy = np.random.get_state()
            torch.set_rng_state(outer_cpu)
            np.random.set_state(outer_numpy)
            if outer_cuda is not None:
                self.torch_cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return the generator states as tensors (the NumPy key as int64)."""
        tensors = {
            "rng.torch_cpu": self.torch_cpu,
            "rng.numpy_key": torch.from_numpy(self.numpy[1].astype(np.int64)),
        }
        if self.torch_cuda is not None:
            tensors["rng.torch_cuda"] = self.torch_cuda
        return tensors

    def state_json(self) -> dict[str, Any]:
        """Return the scalar part of NumPy's Mersenne Twister state."""
        _, _, position, has_gauss, cached_gaussian = self.numpy
        return {"numpy_position": int(position), "numpy_has_gauss": int(has_gauss),
                "numpy_cached_gaussian": float(cached_gaussian)}

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        """Restore what ``state_tensors`` and ``state_json`` returned."""
        self.torch_cpu = tensors["rng.torch_cpu"].to(torch.uint8)
        if self.torch_cuda is not None and "rng.torch_cuda" in tensors:
            self.torch_cuda = tensors["rng.torch_cuda"].to(torch.uint8)
        key = tensors["rng.numpy_key"].numpy().astype(np.uint32)
        self.numpy = ("MT19937", key, scalars["numpy_position"], scalars["numpy_has_gauss"],
                      scalars["numpy_cached_gaussian"])
