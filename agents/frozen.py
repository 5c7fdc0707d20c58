"""A saved scheduler replayed without exploration or learning (``policy:PATH``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from agents.base import Scheduler, SchedulerError


class FrozenPolicy(Scheduler):
    """Play a saved scheduler's deterministic actions (``predict``) and never update it.

    The directory is one that a scheduler's ``save`` wrote; its
    ``scheduler.json`` names the class and options that rebuild it. The frozen
    policy acts per anchor exactly when the saved scheduler does. ``save``
    writes the saved scheduler's own files, so a checkpoint of a run with a
    frozen policy is itself a valid ``policy:PATH`` directory.

    :param observation_space: the observation ``Box`` the saved scheduler was trained on
    :param action_space: the action space the saved scheduler was trained on
    :param path: directory written by a scheduler's ``save``
    """

    name = "policy"
    learns = False
    option_defaults = {"path": None}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        path = self.options["path"]
        if not path:
            raise SchedulerError("a frozen policy needs the directory of a saved scheduler: policy:PATH")
        # Imported here because the registry itself builds FrozenPolicy for "policy:" names.
        from agents.registry import load_scheduler

        self.policy = load_scheduler(Path(path), observation_space, action_space)
        self.per_anchor = self.policy.per_anchor
        self.contextual = self.policy.contextual
        self.uses_mining = self.policy.uses_mining
        self.spec = f"policy:{path}"

    def on_run_start(self, total_steps: int, seed: int) -> None:
        super().on_run_start(total_steps, seed)
        self.policy.on_run_start(total_steps, seed)

    def act(self, observation: np.ndarray) -> Any:
        return self.policy.predict(observation)

    def save(self, path: Path) -> None:
        """Write the saved scheduler's files (not a FrozenPolicy record) into ``path``."""
        self.policy.save(path)

    def load(self, path: Path) -> None:
        self.policy.load(path)
