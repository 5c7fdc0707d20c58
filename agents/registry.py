"""Resolution of scheduler names: built-ins, saved policies, plugins and entry points.

``make_scheduler`` accepts

- a built-in name (``ppo``, ``ucb``, ``hardest`` ...; see ``SCHEDULERS``),
- ``policy:PATH``, a directory written by a scheduler's ``save``, replayed frozen,
- ``package.module:Class``, imported with ``importlib``,
- ``path/to/file.py:Class``, loaded from that file only,
- a name registered in the ``falcon_rl.agents`` entry-point group.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from gymnasium import spaces

from agents.bandits import EXP3, UCB1, LinUCB, ThompsonSampling
from agents.base import METADATA_FILE, Scheduler, SchedulerError
from agents.frozen import FrozenPolicy
from agents.heuristics import FixedHardness, Hardening, Hardest, MafaFilter, RandomBatches, Softening
from agents.sb3 import A2CScheduler, DQNScheduler, PPOScheduler

ENTRY_POINT_GROUP = "falcon_rl.agents"
POLICY_PREFIX = "policy:"

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        PPOScheduler, A2CScheduler, DQNScheduler,
        RandomBatches, Hardest, MafaFilter, FixedHardness, Hardening, Softening,
        UCB1, EXP3, ThompsonSampling, LinUCB,
    )
}

# YAML 1.1 (PyYAML) reads "1e-4" as a string because it has no dot; options mean the number.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def make_scheduler(
    name: str, observation_space: spaces.Space, action_space: spaces.Space, options: dict[str, Any] | None = None
) -> Scheduler:
    """Build the scheduler that ``name`` refers to, with ``options`` as constructor keyword arguments."""
    options = dict(options or {})
    if name.startswith(POLICY_PREFIX):
        return FrozenPolicy(observation_space, action_space, **{**options, "path": name[len(POLICY_PREFIX):]})
    cls, spec = resolve_scheduler_class(name)
    scheduler = cls(observation_space, action_space, **options)
    scheduler.spec = spec
    return scheduler


def load_scheduler(path: Path, observation_space: spaces.Space, action_space: spaces.Space) -> Scheduler:
    """Rebuild the scheduler saved in directory ``path`` from its ``scheduler.json`` and load its state."""
    path = Path(path)
    if not (path / METADATA_FILE).is_file():
        raise SchedulerError(f"no saved scheduler in {path}: {METADATA_FILE} not found")
    metadata = Scheduler._load_json(path, METADATA_FILE)
    scheduler = make_scheduler(metadata["spec"], observation_space, action_space, metadata["options"])
    scheduler.load(path)
    return scheduler


def resolve_scheduler_class(name: str) -> tuple[type[Scheduler], str]:
    """Return the scheduler class for ``name`` and the name that resolves to it again later."""
    if name in SCHEDULERS:
        return SCHEDULERS[name], name
    if ":" in name:
        source, _, class_name = name.rpartition(":")
        if not source or not class_name:
            raise SchedulerError(f"invalid scheduler name {name!r}: expected 'module:Class' or 'path/to/file.py:Class'")
        if _names_file(source):
            file = Path(source).expanduser().resolve()
            return _scheduler_class(_import_file(file), class_name, name, str(file)), f"{file}:{class_name}"
        return _scheduler_class(_import_module(source), class_name, name, f"module {source!r}"), name
    entry_points = _entry_points()
    if name in entry_points:
        return _check_scheduler_class(entry_points[name].load(), name), name
    known = sorted(SCHEDULERS) + sorted(entry_points)
    raise SchedulerError(f"unknown scheduler {name!r} (known: {', '.join(known)}; "
                         "or policy:PATH, module:Class, path/to/file.py:Class)")


def _names_file(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source


def _import_module(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise SchedulerError(f"scheduler module {module_name!r} not found; check the name and that "
                                 "its package is installed or on PYTHONPATH") from error
        raise SchedulerError(f"scheduler module {module_name!r} failed to import: {error}") from error
    except Exception as error:
        raise SchedulerError(f"scheduler module {module_name!r} failed to import: "
                             f"{type(error).__name__}: {error}") from error


def _import_file(file: Path) -> ModuleType:
    if not file.is_file():
        raise SchedulerError(f"scheduler file not found: {file}")
    # One module name per file path, so loading the same file twice returns the same classes.
    digest = hashlib.sha1(str(file).encode("utf-8")).hexdigest()[:12]
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"falcon_rl_plugin_{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise SchedulerError(f"scheduler file {file} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise SchedulerError(f"scheduler file {file} failed to import: {type(error).__name__}: {error}") from error
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _scheduler_class(module: ModuleType, class_name: str, name: str, where: str) -> type[Scheduler]:
    obj: Any = module
    for part in class_name.split("."):
        if not hasattr(obj, part):
            found = sorted(key for key, value in vars(module).items()
                           if isinstance(value, type) and issubclass(value, Scheduler) and value is not Scheduler)
            listed = ", ".join(found) if found else "none"
            raise SchedulerError(f"class {class_name!r} not found in {where} (Scheduler subclasses there: {listed})")
        obj = getattr(obj, part)
    return _check_scheduler_class(obj, name)


def _check_scheduler_class(obj: Any, name: str) -> type[Scheduler]:
    if not (isinstance(obj, type) and issubclass(obj, Scheduler)):
        raise SchedulerError(f"{name!r} refers to {obj!r}, which is not a subclass of agents.Scheduler")
    return obj


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings into an options dict, reading each value as YAML.

    ``n_steps=16`` gives an int, ``normalize=false`` a bool, ``net=[64, 64]``
    a list and ``learning_rate=1e-4`` a float (which plain YAML 1.1 reads as
    a string). A dotted key sets a nested value: ``policy_kwargs.net_arch=[32]``.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        key = key.strip()
        if not separator or not key:
            raise SchedulerError(f"invalid scheduler option {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise SchedulerError(f"invalid value for scheduler option {key!r}: {text!r} is not valid YAML") from error
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(text.strip()):
            value = float(text)
        _set_nested(options, key.split("."), value, item)
    return options


def _set_nested(options: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    target = options
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise SchedulerError(f"invalid scheduler option {item!r}: {key!r} already has a value that is not a mapping")
    target[keys[-1]] = value
