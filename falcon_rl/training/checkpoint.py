"""Atomic checkpoint files that load with ``torch.load(..., weights_only=True)``.

A checkpoint is one ``.pt`` file holding only tensors, numbers, strings,
lists, tuples and dicts, so loading it never runs pickled code. NumPy arrays
are stored as tensors with a marker, and a scheduler's saved directory is
stored file by file as byte tensors.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)\.pt$")
# save_atomic's temporary files: ".step-N.pt.<random>.tmp", never matched by CHECKPOINT_PATTERN.
TEMPORARY_PATTERN = re.compile(r"^\.step-\d+\.pt\..*\.tmp$")
FORMAT_NAME = "falcon-rl-checkpoint"
FORMAT_VERSION = 1
PAYLOAD_KEYS = ("config", "run", "scheduler", "trainer", "random")
# Configuration fields a resumed run may change: the budget, where it runs and how it reports.
RESUMABLE_FIELDS = frozenset({"steps", "epochs", "device", "output", "progress"})


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another configuration."""


def to_safe(value: Any) -> Any:
    """Convert NumPy arrays and scalars nested in ``value`` to weights-only types."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value)).clone(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: to_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_safe(item) for item in value)
    return value


def from_safe(value: Any) -> Any:
    """Invert ``to_safe``."""
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return value["__ndarray__"].numpy().astype(value["dtype"], copy=True)
        return {key: from_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_safe(item) for item in value]
    if isinstance(value, tuple):
        return tuple(from_safe(item) for item in value)
    return value


def pack_directory(path: Path) -> dict[str, torch.Tensor]:
    """Read every file under ``path`` into a byte tensor keyed by its relative path."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        data = file.read_bytes()
        files[file.relative_to(path).as_posix()] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() \
            if data else torch.zeros(0, dtype=torch.uint8)
    return files


def unpack_directory(files: dict[str, torch.Tensor], path: Path) -> None:
    """Write byte tensors from ``pack_directory`` back as files under ``path``."""
    root = path.resolve()
    for name, data in files.items():
        target = (root / name).resolve()
        # Names come from our own checkpoint, but a crafted file must not write outside the folder.
        if root not in target.parents:
            raise CheckpointError(f"checkpoint holds a scheduler file outside its folder: {name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.numpy().tobytes())


def random_states() -> dict[str, Any]:
    """Capture Python's, NumPy's global and torch's random generators."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    """Restore what ``random_states`` captured.

    CUDA states are restored only when this process has as many CUDA
    devices as the one that saved them. Otherwise, as for a run resumed on
    another device, they are skipped with a warning, and the resumed run
    cannot repeat the uninterrupted one exactly.
    """
    python = states["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss"]))
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(states["torch"])
    saved_cuda = states.get("cuda")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved_cuda is not None and len(saved_cuda) == available:
        torch.cuda.set_rng_state_all(saved_cuda)
    elif saved_cuda is not None or available:
        logger.warning("the checkpoint contains CUDA random states for %d devices and this run has %d; "
                       "CUDA random states are not restored", 0 if saved_cuda is None else len(saved_cuda),
                       available)


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    The data goes to a temporary file in the same folder, is flushed and
    fsynced, then renamed over the target; the folder is fsynced so the
    rename itself survives a power loss.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file readable by its owner only; a checkpoint is an ordinary file.
        os.fchmod(handle, 0o644)
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; raise ``CheckpointError`` naming a bad file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"checkpoint {path} is not a falcon-rl checkpoint")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')!r}; this falcon-rl "
                              f"reads version {FORMAT_VERSION}")
    missing = [key for key in PAYLOAD_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {', '.join(missing)}")
    return payload


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Return ``(step, path)`` of the checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for file in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(file.name)
        if match:
            found.append((int(match.group(1)), file))
    return sorted(found)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints, and temporary files of interrupted writes.

    Call it only from the process that writes the checkpoints, after a write
    finished: any temporary file left then belongs to a writer that was killed.
    """
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)
    for file in directory.iterdir():
        if TEMPORARY_PATTERN.match(file.name):
            logger.info("deleting %s, left by an interrupted checkpoint write", file)
            file.unlink(missing_ok=True)


def load_newest_valid(directory: Path) -> tuple[dict[str, Any], Path]:
    """Load the newest checkpoint in ``directory`` that reads cleanly, falling back to older ones.

    Each unreadable checkpoint is logged once, by name, before the next older one is tried.
    """
    candidates = list_checkpoints(directory)
    if not candidates:
        raise CheckpointError(f"no checkpoint found in {directory}")
    errors = []
    for position, (_, path) in enumerate(reversed(candidates)):
        try:
            return load_checkpoint(path), path
        except CheckpointError as error:
            errors.append(str(error))
            if position + 1 < len(candidates):
                logger.warning("%s; falling back to the previous checkpoint", error)
    raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Raise ``CheckpointError`` naming every field, other than ``RESUMABLE_FIELDS``, that differs."""
    names = sorted((set(saved) | set(current)) - RESUMABLE_FIELDS)
    differing = [name for name in names if saved.get(name) != current.get(name)]
    if differing:
        detail = ", ".join(f"{name} ({saved.get(name)!r} in the checkpoint, {current.get(name)!r} now)"
                           for name in differing)
        raise CheckpointError(f"checkpoint {path} comes from another configuration: {detail}")
