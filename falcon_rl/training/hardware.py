"""Device, precision and determinism settings."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from falcon_rl.config import ConfigError

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """Map ``auto|cpu|cuda`` to a device; ``cuda`` without a GPU is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid value for device: 'cuda' (no CUDA device is available; use cpu or auto)")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """Map ``auto`` to fp32 on CPU and bf16 on CUDA."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Return the autocast context for ``precision`` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def set_deterministic(enabled: bool) -> None:
    """Select deterministic kernels, which makes a resumed run repeat an uninterrupted one."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = not enabled
        torch.backends.cudnn.deterministic = enabled


@contextlib.contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
