"""Conversion of SB3 optimizer and buffer state to tensors plus JSON, so nothing is pickled."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from stable_baselines3.common.buffers import BaseBuffer

from agents.base import SchedulerError


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors keyed ``prefix.state.<param>.<name>`` and JSON."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], data: dict[str, Any]
) -> None:
    """Restore what ``optimizer_state`` returned into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for param_id, values in data["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    marker = f"{prefix}.state."
    for key, value in tensors.items():
        if key.startswith(marker):
            param_id, name = key[len(marker):].split(".", 1)
            state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": data["param_groups"]})


def _stored_rows(buffer: BaseBuffer) -> int:
    return buffer.buffer_size if buffer.full else buffer.pos


def buffer_state(buffer: BaseBuffer, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Return the filled rows of every per-step array of ``buffer``, and its position, as tensors plus JSON."""
    rows = _stored_rows(buffer)
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for name, value in vars(buffer).items():
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == buffer.buffer_size:
            arrays[f"{prefix}.{name}"] = value[:rows]
            dtypes[name] = str(value.dtype)
    return arrays, {"pos": buffer.pos, "full": buffer.full, "dtypes": dtypes}


def load_buffer_state(buffer: BaseBuffer, prefix: str, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    """Restore what ``buffer_state`` returned into ``buffer``, which must have the same shape."""
    buffer.pos = int(data["pos"])
    buffer.full = bool(data["full"])
    rows = _stored_rows(buffer)
    for name, dtype in data["dtypes"].items():
        target = getattr(buffer, name, None)
        saved = tensors.get(f"{prefix}.{name}")
        if target is None or saved is None:
            raise SchedulerError(f"saved {prefix} has no array {name!r}, or this buffer lacks it")
        if saved.shape[0] != rows or tuple(saved.shape[1:]) != target.shape[1:]:
            raise SchedulerError(f"saved {prefix} array {name!r} has shape {tuple(saved.shape)}, "
                                 f"this buffer holds {rows} rows of {target.shape[1:]}; "
                                 "was it saved with another number of anchors or features?")
        target[:rows] = saved.numpy().astype(dtype)
