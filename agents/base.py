"""The scheduler interface that every negative-mining scheduler implements.

falcon-rl owns the training loop: each step it calls ``act`` with the current
observation, builds the mined batch from the returned hardness actions, trains
on it and hands the reward back through ``observe``. A scheduler saves its
state as JSON and safetensors files in a directory, never as a pickle.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

# Mixed into the run seed, so the scheduler's generator differs from the
# data-order and model generators that the trainer seeds with the same value.
SCHEDULER_SEED_SALT = 0x5C4ED

METADATA_FILE = "scheduler.json"


class SchedulerError(ValueError):
    """A scheduler name, option or saved state that cannot be used."""


def class_path(cls: type) -> str:
    """Return ``module:QualName``, the import path of a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


class Scheduler:
    """Base class of the schedulers that choose how hard each mined negative is.

    A built-in declares its options and their defaults in ``option_defaults``,
    and an unknown option raises ``SchedulerError``. A custom scheduler that
    leaves ``option_defaults`` as None receives every option unchecked.

    :param observation_space: the single-anchor (or per-batch) ``Box`` of features
    :param action_space: ``Discrete(n_levels)``, where level a means q = a / (n_levels - 1),
        or ``Box(0, 1, (1,))`` holding q itself
    :param options: scheduler-specific options, for example ``q=0.5``
    """

    name: ClassVar[str] = ""
    per_anchor: ClassVar[bool] = False
    uses_mining: ClassVar[bool] = True
    learns: ClassVar[bool] = False
    # True when the action depends on the observation, so a policy map of it is informative.
    contextual: ClassVar[bool] = False
    option_defaults: ClassVar[dict[str, Any] | None] = None

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        self.options = self._resolve_options(options)
        # The string that make_scheduler resolves back to this class.
        self.spec = self.name or class_path(type(self))
        self.total_steps: int | None = None
        self.seed = 0
        self.rng = self._make_rng(0)

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if self.option_defaults is None:
            return dict(options)
        allowed = sorted(self.option_defaults)
        for key in options:
            if key not in self.option_defaults:
                label = self.name or type(self).__name__
                allowed_text = ", ".join(allowed) if allowed else "none"
                raise SchedulerError(f"unknown option {key!r} for scheduler {label!r} (allowed: {allowed_text})")
        return {**self.option_defaults, **options}

    @staticmethod
    def _make_rng(seed: int) -> np.random.Generator:
        return np.random.default_rng([seed, SCHEDULER_SEED_SALT])

    def on_run_start(self, total_steps: int, seed: int) -> None:
        """Store the run's length in training steps and seed the scheduler's own generator.

        ``self.rng`` never touches NumPy's global generator, so a scheduler's
        random choices cannot change the data order of the run. When resuming,
        call this before ``load``, which restores the saved generator state.
        """
        if int(total_steps) < 1:
            raise SchedulerError(f"invalid total_steps: {total_steps!r} (must be at least 1)")
        if int(seed) < 0:
            raise SchedulerError(f"invalid seed: {seed!r} (must not be negative)")
        self.total_steps = int(total_steps)
        self.seed = int(seed)
        self.rng = self._make_rng(self.seed)

    def act(self, observation: np.ndarray) -> Any:
        """Return the hardness action(s) for ``observation``.

        A per-batch scheduler gets one observation ``[F]`` and returns one
        action. A per-anchor scheduler gets ``[A, F]`` and returns ``A`` actions.
        """
        raise NotImplementedError

    def predict(self, observation: np.ndarray) -> Any:
        """Return the action without exploration (what a frozen policy plays); defaults to ``act``."""
        return self.act(observation)

    def observe(
        self,
        reward: float | np.ndarray,
        observation: np.ndarray,
        terminated: bool | np.ndarray,
        truncated: bool | np.ndarray,
        info: dict[str, Any],
    ) -> None:
        """Take the reward of the last action and the observation that followed it (default: ignore them)."""

    def save(self, path: Path) -> None:
        """Write ``scheduler.json`` (what rebuilds this scheduler, its seed and generator state) into ``path``.

        Subclasses call this first, then add their own state files.
        """
        metadata = {
            "spec": self.spec,
            "class": class_path(type(self)),
            "options": self.options,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
        }
        self._save_json(path, METADATA_FILE, metadata)

    def load(self, path: Path) -> None:
        """Restore what ``save`` wrote; the saved class must be this one."""
        metadata = self._load_json(path, METADATA_FILE)
        if metadata["class"] != class_path(type(self)):
            raise SchedulerError(
                f"the scheduler saved in {path} is {metadata['class']}, not {class_path(type(self))}; "
                f"load it with the scheduler {metadata['spec']!r}"
            )
        if json.loads(json.dumps(self.options)) != metadata["options"]:
            logger.warning("scheduler options %s differ from the saved options %s; keeping %s",
                           self.options, metadata["options"], self.options)
        self.total_steps = metadata["total_steps"]
        self.seed = metadata["seed"]
        self.rng.bit_generator.state = metadata["rng"]

    # Helpers for subclasses: one JSON file and one safetensors file per kind of state.

    @staticmethod
    def _save_json(path: Path, filename: str, data: dict[str, Any]) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        try:
            text = json.dumps(data, indent=2, sort_keys=True)
        except TypeError as error:
            raise SchedulerError(f"scheduler state for {filename} is not JSON-serializable: {error}") from error
        (path / filename).write_text(text + "\n", encoding="utf-8")

    @staticmethod
    def _load_json(path: Path, filename: str) -> dict[str, Any]:
        file = Path(path) / filename
        if not file.is_file():
            raise SchedulerError(f"scheduler state file not found: {file}")
        return json.loads(file.read_text(encoding="utf-8"))

    @staticmethod
    def _save_tensors(path: Path, filename: str, tensors: dict[str, torch.Tensor | np.ndarray]) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # Cloning gives every entry its own contiguous storage, which safetensors requires.
        converted = {key: torch.as_tensor(value).detach().cpu().contiguous().clone() for key, value in tensors.items()}
        save_file(converted, str(path / filename))

    @staticmethod
    def _load_tensors(path: Path, filename: str) -> dict[str, torch.Tensor]:
        file = Path(path) / filename
        if not file.is_file():
            raise SchedulerError(f"scheduler state file not found: {file}")
        return load_file(str(file))
