"""Conversions between hardness values q in [0, 1] and the actions of an action space.

``Discrete(n)`` level a stands for q = a / (n - 1); the value of a ``Box(0, 1, (1,))`` is q itself.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from agents.base import SchedulerError


def validate_action_space(action_space: spaces.Space) -> None:
    """Raise ``SchedulerError`` unless the space is ``Discrete(n >= 2)`` or a one-value ``Box``."""
    if isinstance(action_space, spaces.Discrete):
        if action_space.n < 2:
            raise SchedulerError(f"invalid action space {action_space}: a Discrete space needs at least 2 levels")
        if action_space.start != 0:
            raise SchedulerError(f"invalid action space {action_space}: a Discrete space must start at level 0")
        return
    if isinstance(action_space, spaces.Box):
        if action_space.shape != (1,):
            raise SchedulerError(f"invalid action space {action_space}: a Box space must have shape (1,)")
        return
    raise SchedulerError(f"unsupported action space {action_space} (allowed: Discrete(n), Box(0, 1, (1,)))")


def hardness_levels(action_space: spaces.Space, n_levels: int) -> np.ndarray:
    """Return the q of each level: the space's own levels, or ``n_levels`` evenly spaced ones for a Box."""
    validate_action_space(action_space)
    if isinstance(action_space, spaces.Discrete):
        n_levels = int(action_space.n)
    elif int(n_levels) < 2:
        raise SchedulerError(f"invalid n_levels: {n_levels!r} (must be at least 2)")
    return np.linspace(0.0, 1.0, int(n_levels))


def level_action(action_space: spaces.Space, levels: np.ndarray, index: int) -> int | np.ndarray:
    """Return the action for level ``index`` of ``levels``."""
    if isinstance(action_space, spaces.Discrete):
        return int(index)
    return hardness_action(action_space, float(levels[index]))


def hardness_action(action_space: spaces.Space, q: float) -> int | np.ndarray:
    """Return the action nearest to hardness ``q``: a level index, or ``array([q], float32)`` for a Box."""
    if isinstance(action_space, spaces.Discrete):
        # Half-way values round up: q = 0.5 on 6 levels picks level 3, where round() gives 2.
        return int(np.floor(q * (int(action_space.n) - 1) + 0.5))
    value = np.clip(np.array([q], dtype=np.float32), action_space.low, action_space.high)
    return value.astype(np.float32)

