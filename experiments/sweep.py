"""Compare schedulers over seeds and frameworks: ``falcon-rl sweep`` or ``python experiments/sweep.py``.

Every run is its own ``falcon-rl train`` process with its own run directory,
``OUTPUT/runs/<framework>-<label>-seed<N>/``, and its output in ``log.txt``
there. A run that fails is recorded with its error and the others go on.
Running the same command again skips finished runs, resumes stopped ones
from their newest checkpoint and retries failed ones from scratch (the failed
directory moves to ``OUTPUT/previous-attempts/``). At the end the sweep
writes ``results.csv``, ``summary.md`` and ``plots/`` through
``experiments/report.py``.

Runs with the same seed share the model initialisation and the data order
whatever their scheduler, because the trainer derives both from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

if __package__ in (None, ""):
    # Run as a script from a clone: make the repository's packages importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from experiments import report  # noqa: E402
from experiments.cli import UsageError  # noqa: E402

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
PREVIOUS_ATTEMPTS = "previous-attempts"
LOCK_FILE = ".sweep.lock"
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
SWEEP_FILE_KEYS = ("schedulers", "seeds", "frameworks", "baseline", "steps", "epochs", "train")
ENTRY_KEYS = ("name", "label", "options", "train")
# Configuration fields that the sweep sets per run, so a `train:` mapping must not set them.
FIELDS_SET_BY_SWEEP = {"scheduler": "schedulers", "scheduler_options": "the schedulers' options",
                       "framework": "frameworks", "seed": "seeds", "output": "--output"}
# Train options after `--` that the sweep sets itself, with the sweep option to use instead.
TRAIN_OPTIONS_SET_BY_SWEEP = {"scheduler": "--schedulers", "framework": "--frameworks", "seed": "--seeds",
                              "output": "--output", "steps": "--steps", "epochs": "--epochs"}
ERROR_TAIL_LINES = 20


class SweepError(UsageError):
    """A sweep specification or option that cannot be run (exit code 2)."""


@dataclass
class SchedulerEntry:
    """One scheduler of a sweep.

    :param name: the scheduler name given to ``falcon-rl train --scheduler``.
    :param label: the name of this entry in run directories and reports (unique in the sweep).
    :param options: the scheduler's constructor options (``scheduler_options``).
    :param train: configuration fields for this scheduler's runs only.
    """

    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepSpec:
    """The runs of a sweep, every framework x scheduler x seed, and their shared training options.

    :param schedulers: the scheduler entries.
    :param seeds: the seeds; runs with one seed share initialisation and data order.
    :param frameworks: the VLP frameworks.
    :param baseline: the scheduler label that the paired comparison uses as reference.
    :param steps: optimizer steps per run (or None).
    :param epochs: epochs per run (or None); not both with ``steps``.
    :param train: configuration fields applied to every run.
    :param config: a YAML training configuration that every run starts from.
    :param train_args: ``falcon-rl train`` options appended to every run's command line.
    """

    schedulers: list[SchedulerEntry]
    seeds: list[int]
    frameworks: list[str]
    baseline: str
    steps: int | None = None
    epochs: float | None = None
    train: dict[str, Any] = field(default_factory=dict)
    config: str | None = None
    train_args: list[str] = field(default_factory=list)


@dataclass
class PlannedRun:
    """One run of the sweep: a framework, a scheduler entry and a seed."""

    name: str
    framework: str
    entry: SchedulerEntry
    seed: int
    directory: Path
    config_file: Path
    config: dict[str, Any]


# -- options ------------------------------------------------------------------------

def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """Add the sweep's options to ``parser`` (the ``falcon-rl sweep`` subcommand or the script's parser)."""
    parser.description = ("Train every framework x scheduler x seed as its own falcon-rl train process, then "
                          "write results.csv, summary.md and plots. Runs with the same seed share the model "
                          "initialisation and the data order whatever the scheduler. Re-running the same "
                          "command skips finished runs, resumes stopped ones and retries failed ones.")
    parser.epilog = ("Exit codes: 0 when every run finished, 1 when a run failed or did not finish, 2 for an "
                     "invalid option or sweep file, 130 or 143 when stopped by SIGINT or SIGTERM.")
    parser.add_argument("--sweep", metavar="FILE.yaml", help="YAML sweep file with schedulers, seeds, "
                        "frameworks, baseline, steps or epochs, and train (configuration fields of every "
                        "run); a bare file name is also looked up in experiments/configs/. Options given "
                        "on the command line override the file.")
    parser.add_argument("--schedulers", metavar="A,B,...", help="Comma-separated scheduler names: built-in "
                        "names, policy:PATH, module:Class or path/to/file.py:Class.")
    parser.add_argument("--seeds", metavar="N,N,...", help="Comma-separated integer seeds, e.g. 0,1,2.")
    parser.add_argument("--frameworks", metavar="A,B,...", help="Comma-separated VLP frameworks "
                        "(default: albef).")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML training configuration that every run "
                        "starts from; the sweep sets each run's scheduler, framework, seed and output.")
    parser.add_argument("--steps", type=int, metavar="N", help="Optimizer steps per run.")
    parser.add_argument("--epochs", type=float, metavar="X", help="Epochs per run (not with --steps).")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="Runs in parallel (default 1); each "
                        "gets --num-threads max(1, CPU cores // N) unless the options set it.")
    parser.add_argument("--baseline", metavar="LABEL", help="Scheduler label that the paired comparison "
                        f"uses as reference (default: {report.DEFAULT_BASELINE}, when it is swept).")
    parser.add_argument("--output", required=True, metavar="DIR", help="Sweep directory: runs/, results.csv, "
                        "summary.md, plots/.")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide the progress bar.")
    parser.add_argument("train_args", nargs="*", metavar="-- TRAIN_OPTIONS", help="falcon-rl train options "
                        "for every run, after --, e.g. -- --preset test --batch-size 16.")


def parse_list(text: str, option: str) -> list[str]:
    """Split a comma-separated option value into its non-empty, unique items."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise SweepError(f"invalid value for {option}: {text!r} (expected a comma-separated list, e.g. a,b)")
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise SweepError(f"invalid value for {option}: {', '.join(duplicates)} given more than once")
    return items


def parse_seeds(value: Any, source: str) -> list[int]:
    """Read seeds from ``0,1,2`` or a YAML list of integers."""
    items = parse_list(value, source) if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise SweepError(f"invalid value for {source}: {value!r} (expected a non-empty list of integers)")
    seeds = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not re.fullmatch(r"[+-]?\d+", text):
            raise SweepError(f"invalid seed in {source}: {item!r} (expected an integer, e.g. 0,1,2)")
        seeds.append(int(text))
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"invalid value for {source}: {seeds} repeats a seed")
    return seeds


# -- the sweep specification -------------------------------------------------------

def find_sweep_file(name: str) -> Path:
    """Return the sweep file ``name``: a path, or a bare file name in experiments/configs/."""
    path = Path(name)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        for candidate in (CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    raise SweepError(f"invalid value for --sweep: {name!r} (file not found, and not a file in {CONFIGS_DIR})")


def load_sweep_file(name: str) -> dict[str, Any]:
    """Read a sweep file and check that it holds only known keys."""
    from falcon_rl.config import ConfigError, load_yaml_mapping

    path = find_sweep_file(name)
    try:
        values = load_yaml_mapping(path)
    except ConfigError as error:
        raise SweepError(str(error)) from None
    unknown = sorted(set(values) - set(SWEEP_FILE_KEYS))
    if unknown:
        raise SweepError(f"unknown key(s) in sweep file {path}: {', '.join(unknown)} "
                         f"(allowed: {', '.join(SWEEP_FILE_KEYS)})")
    return values


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """Merge the sweep file and the command-line options (which win) into a checked ``SweepSpec``."""
    values = load_sweep_file(args.sweep) if args.sweep else {}
    if args.schedulers is not None:
        values["schedulers"] = parse_list(args.schedulers, "--schedulers")
    if args.seeds is not None:
        values["seeds"] = parse_seeds(args.seeds, "--seeds")
    if args.frameworks is not None:
        values["frameworks"] = parse_list(args.frameworks, "--frameworks")
    if args.baseline is not None:
        values["baseline"] = args.baseline
    if args.steps is not None and args.epochs is not None:
        raise SweepError("--steps and --epochs are both given; give only one of them")
    if args.steps is not None:
        values["steps"], values["epochs"] = args.steps, None
    if args.epochs is not None:
        values["epochs"], values["steps"] = args.epochs, None
    return build_spec(values, args.config, list(args.train_args))


def build_spec(values: dict[str, Any], config: str | None, train_args: list[str]) -> SweepSpec:
    """Check a merged sweep mapping and return the specification it describes."""
    if not values.get("schedulers"):
        raise SweepError("no schedulers given; use --schedulers a,b or a schedulers list in the sweep file")
    if "seeds" not in values:
        raise SweepError("no seeds given; use --seeds 0,1,2 or a seeds list in the sweep file")
    schedulers = parse_scheduler_entries(values["schedulers"])
    seeds = parse_seeds(values["seeds"], "seeds")
    frameworks = check_frameworks(values.get("frameworks") or ["albef"])
    steps, epochs = check_budget(values.get("steps"), values.get("epochs"))
    train = check_train_mapping(values.get("train") or {}, "train")

    labels = [entry.label for entry in schedulers]
    baseline = values.get("baseline")
    if baseline is not None and baseline not in labels:
        raise SweepError(f"invalid value for baseline: {baseline!r} (not a swept scheduler label; "
                         f"labels: {', '.join(labels)})")
    if config is not None and not Path(config).is_file():
        raise SweepError(f"invalid value for --config: {config!r} (file not found)")
    check_train_args(train_args)
    return SweepSpec(schedulers=schedulers, seeds=seeds, frameworks=frameworks,
                     baseline=baseline or report.DEFAULT_BASELINE, steps=steps, epochs=epochs, train=train,
                     config=config, train_args=train_args)


def parse_scheduler_entries(items: Any) -> list[SchedulerEntry]:
    """Read scheduler entries: names, or mappings with ``name`` and optional ``label``, ``options``, ``train``."""
    if not isinstance(items, list):
        raise SweepError(f"invalid value for schedulers: {items!r} (expected a list)")
    entries = [parse_scheduler_entry(item) for item in items]
    labels = [entry.label for entry in entries]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise SweepError(f"scheduler label(s) {', '.join(duplicates)} appear more than once; give each "
                         "entry its own label")
    return entries


def parse_scheduler_entry(item: Any) -> SchedulerEntry:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
        raise SweepError(f"invalid scheduler entry {item!r} (expected a name or a mapping with a name)")
    unknown = sorted(set(item) - set(ENTRY_KEYS))
    if unknown:
        raise SweepError(f"unknown key(s) in scheduler entry {item['name']!r}: {', '.join(unknown)} "
                         f"(allowed: {', '.join(ENTRY_KEYS)})")
    name = item["name"].strip()
    check_scheduler_name(name)
    options = item.get("options") or {}
    if not isinstance(options, dict):
        raise SweepError(f"invalid options for scheduler {name!r}: {options!r} (expected a mapping)")
    train = check_train_mapping(item.get("train") or {}, f"train of scheduler {name!r}")
    label = str(item["label"]) if item.get("label") is not None else default_label(name, options)
    if not LABEL_PATTERN.fullmatch(label):
        raise SweepError(f"invalid label {label!r} for scheduler {name!r} (letters, digits and ._+=- only, "
                         "starting with a letter or digit)")
    return SchedulerEntry(name=name, label=label, options=dict(options), train=train)


def default_label(name: str, options: dict[str, Any]) -> str:
    """Name a scheduler entry after its name and options, with characters safe in a directory name."""
    parts = [name, *(f"{key}{value}" for key, value in options.items())]
    label = "-".join(parts)
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", label).strip("_") or "scheduler"


def check_scheduler_name(name: str) -> None:
    """Accept a built-in or entry-point scheduler name, ``policy:PATH``, ``module:Class`` or ``file.py:Class``."""
    import importlib.metadata

    from agents import SCHEDULERS
    from agents.registry import ENTRY_POINT_GROUP, POLICY_PREFIX

    if name in SCHEDULERS:
        return
    if name.startswith(POLICY_PREFIX) and len(name) > len(POLICY_PREFIX):
        return
    source, separator, class_name = name.rpartition(":")
    if separator and source and class_name:
        return  # a plugin class; `falcon-rl train` imports it and fails that run cleanly if it cannot
    plugins = sorted(entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    if name in plugins:
        return
    raise SweepError(f"unknown scheduler {name!r} (known: {', '.join(sorted(SCHEDULERS) + plugins)}; "
                     "or policy:PATH, module:Class, path/to/file.py:Class)")


def check_frameworks(frameworks: Any) -> list[str]:
    import dataclasses

    from falcon_rl.config import TrainConfig

    if isinstance(frameworks, str):
        frameworks = parse_list(frameworks, "frameworks")
    allowed = next(f.metadata["choices"] for f in dataclasses.fields(TrainConfig) if f.name == "framework")
    if not isinstance(frameworks, list) or not frameworks:
        raise SweepError(f"invalid value for frameworks: {frameworks!r} (expected a non-empty list)")
    for framework in frameworks:
        if framework not in allowed:
            raise SweepError(f"invalid framework {framework!r} (allowed: {', '.join(allowed)})")
    return list(frameworks)


def check_budget(steps: Any, epochs: Any) -> tuple[int | None, float | None]:
    if steps is not None and epochs is not None:
        raise SweepError("steps and epochs are both set; give only one of them")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise SweepError(f"invalid value for steps: {steps!r} (expected an integer of at least 1)")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0):
        raise SweepError(f"invalid value for epochs: {epochs!r} (expected a positive number)")
    return steps, None if epochs is None else float(epochs)


def check_train_mapping(values: Any, source: str) -> dict[str, Any]:
    """Check a ``train`` mapping: configuration fields, none of which the sweep sets itself."""
    if not isinstance(values, dict):
        raise SweepError(f"invalid value for {source}: {values!r} (expected a mapping of configuration fields)")
    for name, instead in FIELDS_SET_BY_SWEEP.items():
        if name in values:
            raise SweepError(f"{source} sets {name!r}, which the sweep sets per run; use {instead} instead")
    return dict(values)


def train_options_parser() -> argparse.ArgumentParser:
    from experiments.cli import add_train_options

    parser = argparse.ArgumentParser(prog="falcon-rl train", add_help=False, exit_on_error=False)
    add_train_options(parser)
    return parser


def check_train_args(train_args: Sequence[str]) -> argparse.Namespace:
    """Parse the train options given after ``--`` and reject those that the sweep sets itself."""
    try:
        namespace, unknown = train_options_parser().parse_known_args(list(train_args))
    except argparse.ArgumentError as error:
        raise SweepError(f"invalid train option after --: {error}") from None
    if unknown:
        raise SweepError(f"unknown train option(s) after --: {' '.join(unknown)} (see falcon-rl train --help)")
    for dest, instead in TRAIN_OPTIONS_SET_BY_SWEEP.items():
        if hasattr(namespace, dest):
            raise SweepError(f"--{dest} after -- is set by the sweep per run; use the sweep option {instead}")
    if namespace.config is not None:
        raise SweepError("--config after -- is not allowed; give the sweep's own --config before --")
    if namespace.resume is not None:
        raise SweepError("--resume after -- is not allowed; re-run the sweep command to resume its runs")
    return namespace


# -- the plan ---------------------------------------------------------------------------

def merge_config(values: dict[str, Any], layer: dict[str, Any]) -> None:
    """Update ``values`` with ``layer``, where a step budget replaces an epoch budget and the reverse."""
    if layer.get("steps") is not None:
        values.pop("epochs", None)
    if layer.get("epochs") is not None:
        values.pop("steps", None)
    values.update(layer)


def scheduler_config(spec: SweepSpec, framework: str, entry: SchedulerEntry) -> dict[str, Any]:
    """Return the configuration mapping shared by one framework and scheduler's runs (all seeds).

    Layers, later ones winning: ``--config``, the sweep's ``train``, its steps or
    epochs, the entry's ``train``, then the entry's framework, scheduler and options.
    """
    from falcon_rl.config import ConfigError, load_yaml_mapping

    try:
        values = load_yaml_mapping(spec.config) if spec.config else {}
    except ConfigError as error:
        raise SweepError(str(error)) from None
    for name in FIELDS_SET_BY_SWEEP:
        values.pop(name, None)
    merge_config(values, spec.train)
    budget = {"steps": spec.steps, "epochs": spec.epochs}
    merge_config(values, {name: value for name, value in budget.items() if value is not None})
    merge_config(values, entry.train)
    values.update(framework=framework, scheduler=entry.name, scheduler_options=dict(entry.options), progress=False)
    return values


def run_name(framework: str, label: str, seed: int) -> str:
    return f"{framework}-{label}-seed{seed}"


def plan_runs(spec: SweepSpec, output: Path) -> list[PlannedRun]:
    """List every run, seed by seed, so that a partial sweep already contains whole seeds for paired comparisons."""
    runs = []
    for framework in spec.frameworks:
        configs = {entry.label: scheduler_config(spec, framework, entry) for entry in spec.schedulers}
        for seed in spec.seeds:
            for entry in spec.schedulers:
                name = run_name(framework, entry.label, seed)
                runs.append(PlannedRun(name=name, framework=framework, entry=entry, seed=seed,
                                       directory=output / report.RUNS_FOLDER / name,
                                       config_file=output / "configs" / f"{framework}-{entry.label}.yaml",
                                       config=configs[entry.label]))
    return runs


def check_run_configs(runs: Sequence[PlannedRun], train_args: Sequence[str]) -> None:
    """Resolve each scheduler's configuration as ``falcon-rl train`` will, so bad values stop the sweep early."""
    from experiments.cli import config_from_args

    checked = set()
    with tempfile.TemporaryDirectory() as folder:
        for run in runs:
            if run.config_file.name in checked:
                continue
            checked.add(run.config_file.name)
            path = Path(folder) / run.config_file.name
            path.write_text(yaml.safe_dump(run.config, sort_keys=False), encoding="utf-8")
            namespace = train_options_parser().parse_args([*train_args, "--config", str(path),
                                                           "--seed", str(run.seed)])
            config, _ = config_from_args(namespace)
            for name in ("data", "image_root"):
                value = getattr(config, name)
                if value is not None and not Path(value).exists():
                    raise SweepError(f"invalid value for {name}: {value!r} (not found; relative paths start "
                                     f"from the current directory, {Path.cwd()})")


def thread_count(spec: SweepSpec, runs: Sequence[PlannedRun], jobs: int) -> int | None:
    """Return the torch threads per run, or None when the options set ``num_threads`` themselves."""
    if hasattr(check_train_args(spec.train_args), "num_threads"):
        return None
    if any(run.config.get("num_threads") is not None for run in runs):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def write_plan(spec: SweepSpec, runs: Sequence[PlannedRun], output: Path, argv: Sequence[str]) -> None:
    """Write the resolved sweep (``sweep.yaml``) and one configuration file per framework and scheduler."""
    from experiments.run_directory import write_text_atomic

    resolved = {"command": [Path(sys.argv[0]).name, *argv], **asdict(spec)}
    write_text_atomic(output / report.SWEEP_FILE, yaml.safe_dump(resolved, sort_keys=False))
    for run in runs:
        text = yaml.safe_dump(run.config, sort_keys=False)
        if not run.config_file.is_file() or run.config_file.read_text(encoding="utf-8") != text:
            write_text_atomic(run.config_file, text)


# -- running ------------------------------------------------------------------------------

class SweepStopped(Exception):
    """Raised in the sweep's main thread when SIGTERM arrives, so the runs can stop cleanly."""


def error_summary(log_path: Path) -> tuple[str, list[str]]:
    """Return a failed run's error line and the last lines of its log.

    The error line is the message of the last ``falcon-rl: error:`` line, else the
    log's last line (the exception line when a traceback ends the log).
    """
    try:
        lines = [line.rstrip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return f"log {log_path} could not be read", []
    lines = [line for line in lines if line.strip()]
    tail = lines[-ERROR_TAIL_LINES:]
    for line in reversed(lines):
        if ": error: " in line:
            return line.split(": error: ", 1)[1], tail
    return (lines[-1] if lines else "no output"), tail


class SweepRunner:
    """Run the planned runs as ``falcon-rl train`` processes, at most ``jobs`` at a time.

    :param runs: the planned runs.
    :param output: the sweep directory.
    :param jobs: processes run in parallel.
    :param threads: torch threads per run (``--num-threads``), or None to leave the options' choice.
    :param train_args: ``falcon-rl train`` options appended to every fresh run's command.
    :param progress: show a progress bar over runs.
    """

    def __init__(self, runs: Sequence[PlannedRun], output: Path, jobs: int, threads: int | None,
                 train_args: Sequence[str], progress: bool = True) -> None:
        self.runs = list(runs)
        self.output = output
        self.jobs = jobs
        self.threads = threads
        self.train_args = list(train_args)
        self.progress = progress
        self._stopping = threading.Event()
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    # -- deciding what each run needs -------------------------------------------------

    def next_action(self, run: PlannedRun) -> str:
        """Return ``skip`` (finished), ``resume`` (stopped), ``retry`` (failed or incomplete) or ``start``."""
        if not run.directory.exists():
            return "start"
        record = report.read_record(run.directory)
        status = report.run_status(run.directory, record)
        if record.get("config") not in (None, run.config) and status in ("finished", "stopped"):
            logger.warning("run %s was started with another configuration; it is %s as saved (use another "
                           "--output to run the new configuration)", run.name,
                           "kept" if status == "finished" else "resumed")
        return {"finished": "skip", "stopped": "resume"}.get(status, "retry")

    def command(self, run: PlannedRun, action: str) -> list[str]:
        train = [sys.executable, "-m", "experiments", "train"]
        if action == "resume":
            # A resumed run keeps its saved configuration; `--resume` accepts no other options.
            return [*train, "--resume", str(run.directory.resolve()), "--no-progress"]
        command = [*train, "--config", str(run.config_file.resolve()), "--seed", str(run.seed),
                   "--output", str(run.directory.resolve()), "--no-progress"]
        if self.threads is not None:
            command += ["--num-threads", str(self.threads)]
        return [*command, *self.train_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The children import the packages of this checkout even when falcon-rl is not installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        if self.threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(self.threads))  # FAISS's OpenMP threads
        return env

    def move_aside(self, run: PlannedRun, attempt: int) -> None:
        """Move a failed or incomplete run directory to ``previous-attempts/`` so the retry starts fresh."""
        target = self.output / PREVIOUS_ATTEMPTS / f"{run.name}-attempt{attempt}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = target.with_name(f"{run.name}-attempt{attempt}.{suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run.directory), str(target))
        logger.info("moved %s aside to %s before retrying", run.directory, target)

    # -- one run ----------------------------------------------------------------------

    def execute(self, run: PlannedRun, action: str) -> str:
        """Run one ``falcon-rl train`` process for ``run`` and return the run's status afterwards."""
        if self._stopping.is_set():
            return report.run_status(run.directory) if run.directory.exists() else "incomplete"
        previous = report.read_record(run.directory) if run.directory.exists() else {}
        attempt = int(previous.get("attempt", 0))
        if action == "retry":
            self.move_aside(run, attempt)
        if action != "resume":
            attempt += 1
        run.directory.mkdir(parents=True, exist_ok=True)
        command = self.command(run, action)
        record = {"name": run.name, "framework": run.framework, "scheduler": run.entry.label,
                  "scheduler_name": run.entry.name, "seed": run.seed, "attempt": attempt, "action": action,
                  "command": command, "config": run.config, "processes": previous.get("processes", []),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "exit_code": None}
        if action != "resume":
            record["processes"] = []
        self._write_record(run, record)

        started = time.monotonic()
        exit_code = self._run_process(run, command)
        record.update(exit_code=exit_code, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      process_seconds=round(time.monotonic() - started, 2))
        record["processes"].append({"action": action, "exit_code": exit_code,
                                    "seconds": record["process_seconds"]})
        if exit_code not in report.STOP_EXIT_CODES:
            record["error"], record["error_tail"] = error_summary(run.directory / report.LOG_FILE)
        self._write_record(run, record)
        return report.run_status(run.directory, record)

    def _run_process(self, run: PlannedRun, command: list[str]) -> int:
        with open(run.directory / report.LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            try:
                # A session of its own keeps a terminal's Ctrl+C from reaching the run directly: the
                # sweep passes one signal on, and a second SIGINT would stop the trainer without a checkpoint.
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as error:
                log.write(f"sweep: error: could not start the run: {error}\n")
                return 127
            with self._lock:
                self._processes.add(process)
            try:
                return process.wait()
            finally:
                with self._lock:
                    self._processes.discard(process)

    @staticmethod
    def _write_record(run: PlannedRun, record: dict[str, Any]) -> None:
        from experiments.run_directory import write_text_atomic

        write_text_atomic(run.directory / report.RUN_RECORD, json.dumps(record, indent=2, default=str))

    # -- all runs -----------------------------------------------------------------------

    def run_all(self) -> dict[str, str]:
        """Run every run that is not finished; return the status of each run by name.

        SIGINT or SIGTERM stops the sweep: runs not yet started stay pending, and
        running ones receive the signal, write a checkpoint and can be resumed.
        """
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        actions = {run.name: self.next_action(run) for run in self.runs}
        statuses = {run.name: "finished" for run in self.runs if actions[run.name] == "skip"}
        pending = [run for run in self.runs if actions[run.name] != "skip"]
        if statuses:
            logger.info("skipping %d finished run(s)", len(statuses))
        bar = tqdm(total=len(self.runs), initial=len(statuses), desc="sweep", unit="run",
                   disable=not self.progress, dynamic_ncols=True)
        previous_handler = self._install_sigterm_handler()
        with logging_redirect_tqdm(), ThreadPoolExecutor(max_workers=self.jobs) as executor:
            futures = {executor.submit(self.execute, run, actions[run.name]): run for run in pending}
            try:
                for future in as_completed(futures):
                    run = futures[future]
                    statuses[run.name] = future.result()
                    self._log_result(run, statuses[run.name])
                    bar.update(1)
                    bar.set_postfix(failed=sum(s == "failed" for s in statuses.values()), refresh=False)
            except (KeyboardInterrupt, SweepStopped) as stop:
                self._stop(signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM)
                executor.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                bar.close()
                if previous_handler is not None:
                    signal.signal(signal.SIGTERM, previous_handler)
        return statuses

    def _log_result(self, run: PlannedRun, status: str) -> None:
        record = report.read_record(run.directory)
        if status == "failed":
            logger.error("run %s failed (exit code %s): %s; log: %s", run.name, record.get("exit_code"),
                         record.get("error"), run.directory / report.LOG_FILE)
        elif status == "finished":
            logger.info("run %s finished in %.0f s", run.name, record.get("process_seconds", 0.0))
        else:
            logger.warning("run %s is %s (exit code %s); re-run the sweep to continue it", run.name, status,
                           record.get("exit_code"))

    def _install_sigterm_handler(self) -> Any:
        def handle(signum: int, frame: FrameType | None) -> None:
            raise SweepStopped()

        try:
            return signal.signal(signal.SIGTERM, handle)
        except ValueError:  # not the main thread: the caller handles signals
            return None

    def _stop(self, signum: int) -> None:
        """Start no more runs and pass the signal on, so each running trainer writes a checkpoint and exits."""
        self._stopping.set()
        with self._lock:
            processes = list(self._processes)
        logger.warning("stopping the sweep: sending %s to %d running run(s), which write a checkpoint first",
                       signal.Signals(signum).name, len(processes))
        for process in processes:
            try:
                process.send_signal(signum)
            except ProcessLookupError:
                pass


# -- the command ---------------------------------------------------------------------------

class SweepLock:
    """A ``.sweep.lock`` file holding the process id, so two sweeps never run in one directory at once."""

    def __init__(self, output: Path) -> None:
        self.path = output / LOCK_FILE

    def __enter__(self) -> "SweepLock":
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8").strip()
            if text.isdigit() and int(text) != os.getpid() and _process_exists(int(text)):
                raise SweepError(f"another sweep (process {text}) is running in {self.path.parent}; wait for it "
                                 f"or stop it, or delete {self.path} if that process is not a sweep")
            logger.warning("removing the stale lock %s of process %s", self.path, text)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(str(os.getpid()), encoding="utf-8")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.path.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def command_sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``falcon-rl sweep``: check the specification, run the runs, write the report."""
    if args.train_args and "--" not in argv:
        raise SweepError(f"unexpected argument(s): {' '.join(args.train_args)} (put falcon-rl train options "
                         "after --, e.g. -- --preset test)")
    if args.jobs < 1:
        raise SweepError(f"invalid value for --jobs: {args.jobs} (must be at least 1)")
    spec = spec_from_args(args)
    output = Path(args.output)
    runs = plan_runs(spec, output)
    check_run_configs(runs, spec.train_args)
    threads = thread_count(spec, runs, args.jobs)
    logger.info("sweep of %d runs (%d frameworks x %d schedulers x %d seeds) in %s, %d at a time%s",
                len(runs), len(spec.frameworks), len(spec.schedulers), len(spec.seeds), output, args.jobs,
                f", {threads} torch thread(s) per run" if threads else "")

    with SweepLock(output):
        write_plan(spec, runs, output, argv)
        runner = SweepRunner(runs, output, args.jobs, threads, spec.train_args, progress=args.progress)
        try:
            statuses = runner.run_all()
        except (KeyboardInterrupt, SweepStopped) as stop:
            report.build_report(output)
            logger.warning("sweep stopped; re-run the same command to resume it")
            return 130 if isinstance(stop, KeyboardInterrupt) else 143
        result = report.build_report(output)

    counts = {status: sum(value == status for value in statuses.values()) for status in report.STATUSES}
    print(f"{counts['finished']} of {len(runs)} runs finished, {counts['failed']} failed; "
          f"summary: {result['summary']}, results: {result['results']}")
    return 0 if counts["finished"] == len(runs) else 1


def main(argv: Sequence[str] | None = None) -> int:
    from experiments.cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
