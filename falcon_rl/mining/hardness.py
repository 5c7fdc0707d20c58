"""Hardness levels: mapping scheduler actions to candidate ranks.

A hardness level q in [0, 1] selects a negative among the m candidates still
free for an anchor, sorted by similarity in descending order: rank
round((1 - q) * (m - 1)). q = 1 picks the most similar candidate (GRIT-VLP's
grouping), q = 0 the least similar of them. Rounding is NumPy's ``rint``
(half to even, as Python's ``round``).
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from falcon_rl.mining.errors import MiningError


def hardness_to_rank(q: float | np.ndarray, m: int | np.ndarray, validate: bool = True) -> np.ndarray:
    """Return the rank ``round((1 - q) * (m - 1))`` of the negative to pick.

    Works element-wise on arrays. Where ``m < 1`` (no free candidate) the rank
    is -1.

    :param q: hardness levels in [0, 1].
    :param m: number of free candidates.
    :param validate: check that every level is finite and in [0, 1]; callers
        that validated the levels already may skip it.
    :return: int64 ranks in ``[0, m - 1]``, with the broadcast shape of ``q`` and ``m``.
    """
    q = check_hardness(q) if validate else np.asarray(q, dtype=np.float64)
    m = np.asarray(m, dtype=np.int64)

    rank = np.rint((1.0 - q) * (m - 1)).astype(np.int64)
    return np.where(m >= 1, np.clip(rank, 0, np.maximum(m - 1, 0)), -1)


def check_hardness(q: float | np.ndarray) -> np.ndarray:
    """Return ``q`` as float64, raising :class:`MiningError` unless every level is finite and in [0, 1]."""
    q = np.asarray(q, dtype=np.float64)
    if np.any(~np.isfinite(q)) or np.any((q < 0.0) | (q > 1.0)):
        raise MiningError(f"hardness must be finite and in [0, 1], got {q}")
    return q


def levels(n_levels: int) -> np.ndarray:
    """Return ``n_levels`` evenly spaced hardness levels from 0 to 1 (float32)."""
    if int(n_levels) < 2:
        raise MiningError(f"n_levels must be an integer >= 2, got {n_levels}")
    return np.linspace(0.0, 1.0, int(n_levels), dtype=np.float32)


def action_to_hardness(action: int | float | np.ndarray, action_space: spaces.Space) -> np.ndarray:
    """Convert scheduler actions to hardness levels.

    ``Discrete(n)`` action a (counted from the space's ``start``) maps to
    ``a / (n - 1)``. ``Box`` actions are clipped to [0, 1]. Per-anchor
    actions of shape ``[A]`` or ``[A, 1]`` give ``[A]`` levels, and a single
    action gives a ``[1]`` array.

    :param action: one action or an array of per-anchor actions.
    :param action_space: the scheduler's ``Discrete`` or ``Box`` action space.
    :return: float32 hardness levels, shape ``[A]``.
    """
    values = np.asarray(action).reshape(-1)

    if isinstance(action_space, spaces.Discrete):
        n = int(action_space.n)
        if n < 2:
            raise MiningError(f"a Discrete action space needs n >= 2 hardness levels, got n={n}")
        index = values.astype(np.int64) - int(action_space.start)
        if np.any(index < 0) or np.any(index >= n) or np.any(values != np.round(values)):
            raise MiningError(
                f"discrete actions must be integers in [{action_space.start}, "
                f"{action_space.start + n - 1}], got {values}"
            )
        return (index / (n - 1)).astype(np.float32)

    if isinstance(action_space, spaces.Box):
        values = values.astype(np.float64)
        if np.any(np.isnan(values)):
            raise MiningError(f"continuous actions must not be NaN, got {values}")
        return np.clip(values, 0.0, 1.0).astype(np.float32)

    raise MiningError(
        f"action space must be gymnasium.spaces.Discrete or Box, got {type(action_space).__name__}"
    )
