"""The files of a run directory: resolved config, provenance and final metrics."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from falcon_rl.config import TrainConfig

RECORDED_PACKAGES = ("falcon-rl", "torch", "gymnasium", "stable-baselines3", "transformers", "faiss-cpu",
                     "faiss-gpu", "numpy", "tensorboard")


def default_run_directory(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = config.scheduler.replace("/", "_").replace(":", "_")
    return Path("runs") / f"{stamp}-{config.framework}-{name}-seed{config.seed}"


def write_config(directory: Path, config: TrainConfig) -> None:
    write_text_atomic(directory / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_config(directory: Path) -> TrainConfig:
    from falcon_rl.config import load_yaml_mapping
    return TrainConfig.from_dict(load_yaml_mapping(directory / "config.yaml"))


def write_run_info(directory: Path, device: str, argv: list[str]) -> None:
    """Record the command line, package versions, git commit and device of a run."""
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    info = {
        "command": [Path(sys.argv[0]).name, *argv],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": git_commit(),
        "device": device,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = directory / "run_info.json"
    if path.exists():
        # A resumed run keeps its original record and appends the new command.
        previous = json.loads(path.read_text(encoding="utf-8"))
        previous.setdefault("resumed", []).append({"command": info["command"], "started": info["started"],
                                                   "device": device, "git_commit": info["git_commit"]})
        info = previous
    write_text_atomic(path, json.dumps(info, indent=2))


def git_commit() -> str | None:
    """The commit of the falcon-rl source tree, or None outside a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def write_metrics(directory: Path, metrics: dict[str, Any]) -> None:
    write_text_atomic(directory / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))


def write_history(directory: Path, steps: list[dict[str, Any]], validation: list[dict[str, Any]]) -> None:
    """Write the per-step curves (reward, loss, hardness, mined FN rate) and validation results."""
    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and value != value else value

    history = {"steps": [{key: clean(value) for key, value in entry.items()} for entry in steps],
               "validation": [{key: clean(value) for key, value in entry.items()} for entry in validation]}
    write_text_atomic(directory / "history.json", json.dumps(history))


def read_metrics(directory: Path) -> dict[str, Any] | None:
    path = directory / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)
