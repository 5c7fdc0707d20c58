"""Heuristic schedulers: random batches, fixed hardness and hardness curricula.

These are the baselines FALCON (Kim, Shim, Lee, 2025) is compared with:
plain shuffled batches, GRIT-VLP's hardest negatives (q = 1.0), a fixed
intermediate q, and progressive hardening or softening over the run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from agents.actions import hardness_action, validate_action_space
from agents.base import Scheduler, SchedulerError
from agents.options import validate_unit_interval

CURRICULUM_SHAPES = ("linear", "cosine")


class RandomBatches(Scheduler):
    """Plain shuffled batches with mining turned off (the ``random`` baseline).

    The trainer ignores the action because ``uses_mining`` is False; ``act``
    returns the q = 0 action only so that every scheduler returns a valid action.

    :param observation_space: the per-batch observation ``Box``
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    """

    name = "random"
    uses_mining = False
    option_defaults = {}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        validate_action_space(action_space)

    def act(self, observation: np.ndarray) -> int | np.ndarray:
        return hardness_action(self.action_space, 0.0)


class _ConstantHardness(Scheduler):
    """A scheduler that plays the same hardness ``self.q`` at every step."""

    q: float

    def act(self, observation: np.ndarray) -> int | np.ndarray:
        return hardness_action(self.action_space, self.q)


class Hardest(_ConstantHardness):
    """The hardest remaining candidate for every anchor (q = 1.0, GRIT-VLP's setting).

    :param observation_space: the per-batch observation ``Box``
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    """

    name = "hardest"
    option_defaults = {}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        validate_action_space(action_space)
        self.q = 1.0


class MafaFilter(Hardest):
    """GRIT-VLP's hardest negatives behind a MAFA-style false-negative filter, the baseline FALCON compares to.

    The scheduler itself plays q = 1.0 like ``hardest``; selecting it by name
    also turns on the trainer's ITM filter (``fn_filter: itm:0.5`` unless the
    configuration sets another threshold), which skips candidates that the
    current ITM head takes for matches of their anchor.
    """

    name = "mafa-filter"


class FixedHardness(_ConstantHardness):
    """One fixed hardness for every anchor of every batch.

    :param observation_space: the per-batch observation ``Box``
    :param action_space: ``Discrete(n_levels)`` (the nearest level is played) or ``Box(0, 1, (1,))``
    :param q: hardness in [0, 1]; 1 picks the most similar candidate, 0 the least similar of the top K
    """

    name = "fixed"
    option_defaults = {"q": 0.5}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        validate_action_space(action_space)
        self.q = validate_unit_interval("q", self.options["q"])


class Curriculum(Scheduler):
    """Hardness that moves from ``start`` to ``end`` over the run's training steps.

    Step t of a run of T steps plays q(p) with p = t / (T - 1), so the first
    step plays ``start`` and the last plays ``end``; steps past the run keep ``end``.

    :param observation_space: the per-batch observation ``Box``
    :param action_space: ``Discrete(n_levels)`` (the nearest level is played) or ``Box(0, 1, (1,))``
    :param start: hardness at the first step, in [0, 1]
    :param end: hardness at the last step, in [0, 1]
    :param shape: ``linear``, or ``cosine`` (slow at both ends, half-way at mid-run)
    """

    option_defaults = {"start": 0.0, "end": 1.0, "shape": "linear"}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        validate_action_space(action_space)
        self.start = validate_unit_interval("start", self.options["start"])
        self.end = validate_unit_interval("end", self.options["end"])
        self.shape = self.options["shape"]
        if self.shape not in CURRICULUM_SHAPES:
            raise SchedulerError(f"invalid value for shape: {self.shape!r} (allowed: {', '.join(CURRICULUM_SHAPES)})")
        self.step = 0

    def hardness_at(self, step: int) -> float:
        """Return the hardness the curriculum plays at training step ``step`` (counted from 0)."""
        if self.total_steps is None:
            raise RuntimeError(f"{type(self).__name__} needs on_run_start(total_steps, seed) before act")
        progress = min(step / max(self.total_steps - 1, 1), 1.0)
        if self.shape == "cosine":
            progress = (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.start + (self.end - self.start) * progress

    def on_run_start(self, total_steps: int, seed: int) -> None:
        super().on_run_start(total_steps, seed)
        self.step = 0

    def act(self, observation: np.ndarray) -> int | np.ndarray:
        q = self.hardness_at(self.step)
        self.step += 1
        return hardness_action(self.action_space, q)

    def save(self, path: Path) -> None:
        super().save(path)
        self._save_json(path, "state.json", {"step": self.step})

    def load(self, path: Path) -> None:
        super().load(path)
        self.step = int(self._load_json(path, "state.json")["step"])


class Hardening(Curriculum):
    """Progressive hardening: q rises from ``start`` (default 0.0) to ``end`` (default 1.0).

    :param observation_space: the per-batch observation ``Box``
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param start: hardness at the first step, in [0, 1]
    :param end: hardness at the last step, in [0, 1]
    :param shape: ``linear`` or ``cosine``
    """

    name = "hardening"
    option_defaults = {"start": 0.0, "end": 1.0, "shape": "linear"}


class Softening(Curriculum):
    """Progressive softening: q falls from ``start`` (default 1.0) to ``end`` (default 0.0).

    :param observation_space: the per-batch observation ``Box``
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param start: hardness at the first step, in [0, 1]
    :param end: hardness at the last step, in [0, 1]
    :param shape: ``linear`` or ``cosine``
    """

    name = "softening"
    option_defaults = {"start": 1.0, "end": 0.0, "shape": "linear"}
