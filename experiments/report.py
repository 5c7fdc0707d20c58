"""The report of a scheduler sweep: ``results.csv``, ``summary.md`` and plots, rebuilt from run directories.

``python experiments/report.py SWEEP_DIR`` reads every run directory under
``SWEEP_DIR/runs/`` (its ``metrics.json``, ``history.json``, ``sweep_run.json``
and ``checkpoints/``) and writes

- ``results.csv``: one row per run with its status, every metric and its error;
- ``summary.md``: per framework and scheduler, the mean and 95% confidence
  interval over seeds of the validation, test and training metrics, and a
  paired comparison of each scheduler with the baseline;
- ``plots/*.png``: metric bars, hardness over training, and mined
  false-negative rate against mean hardness.

``falcon-rl sweep`` writes the same report when its runs end.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    # Run as a script from a clone: make the repository's packages importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from experiments.run_directory import read_metrics, write_text_atomic  # noqa: E402

logger = logging.getLogger(__name__)

RUNS_FOLDER = "runs"
RUN_RECORD = "sweep_run.json"  # the sweep's record of a run's processes, beside the trainer's files
SWEEP_FILE = "sweep.yaml"  # the resolved sweep specification
LOG_FILE = "log.txt"
DEFAULT_BASELINE = "hardest"

# Exit codes of a run that was stopped, not broken: 0, or a checkpoint written on SIGINT (130) or
# SIGTERM (143), or a process killed by SIGINT or SIGTERM before the trainer installed its handlers.
STOP_EXIT_CODES = frozenset({0, 130, 143, -signal.SIGINT, -signal.SIGTERM})
STATUSES = ("finished", "failed", "stopped", "incomplete")
ID_COLUMNS = ("framework", "scheduler", "seed", "status")
TAIL_COLUMNS = ("wall_seconds", "error")

# (metrics.json key, column header, display scale, decimals)
Metric = tuple[str, str, float, int]
VALIDATION_METRICS: tuple[Metric, ...] = (
    ("val_rsum", "RSUM", 1.0, 2), ("val_i2t_r1", "i2t R@1", 1.0, 2), ("val_t2i_r1", "t2i R@1", 1.0, 2),
    ("val_fn_rsum", "FN-aware RSUM", 1.0, 2))
TEST_METRICS: tuple[Metric, ...] = tuple((key.removeprefix("val_"), header, scale, decimals)
                                         for key, header, scale, decimals in VALIDATION_METRICS)
TRAINING_METRICS: tuple[Metric, ...] = (
    ("mean_hardness", "mean hardness", 1.0, 3), ("mined_fn_rate", "mined FN rate (%)", 100.0, 2),
    ("wall_seconds", "wall time (s)", 1.0, 0))
PAIRED_METRICS: tuple[Metric, ...] = (
    ("val_rsum", "validation RSUM", 1.0, 2), ("rsum", "test RSUM", 1.0, 2),
    ("fn_rsum", "test FN-aware RSUM", 1.0, 2))
BAR_PLOTS = (("val_rsum", "validation RSUM"), ("rsum", "test RSUM"), ("fn_rsum", "test FN-aware RSUM"))


class ReportError(ValueError):
    """A sweep directory that cannot be reported on."""


@dataclass
class RunResult:
    """One run of a sweep as its directory records it.

    :param name: the run directory's name, ``<framework>-<label>-seed<N>``.
    :param directory: the run directory.
    :param framework: the VLP framework trained.
    :param scheduler: the scheduler's label in the sweep (``fixed-0.5``).
    :param seed: the run's seed.
    :param status: ``finished``, ``failed``, ``stopped`` (a checkpoint to resume from) or ``incomplete``.
    :param metrics: the contents of ``metrics.json`` (empty unless the run finished).
    :param error: the last error line of a failed run's log.
    """

    name: str
    directory: Path
    framework: str
    scheduler: str
    seed: int
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def value(self, key: str) -> float | None:
        """Return a finite metric value, or None when the run lacks it."""
        value = self.metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)


# -- reading run directories ---------------------------------------------------

def read_record(directory: Path) -> dict[str, Any]:
    """Return the sweep's record of a run (``sweep_run.json``), or an empty mapping when there is none."""
    path = directory / RUN_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("ignoring unreadable %s", path)
        return {}
    return record if isinstance(record, dict) else {}


def has_checkpoint(directory: Path) -> bool:
    from falcon_rl.training.checkpoint import list_checkpoints

    return bool(list_checkpoints(directory / "checkpoints"))


def run_status(directory: Path, record: dict[str, Any] | None = None,
               metrics: dict[str, Any] | None = None) -> str:
    """Classify a run directory as ``finished``, ``failed``, ``stopped`` or ``incomplete``.

    A run is finished when its ``metrics.json`` has status ``finished``, failed
    when its last process exited with an error code, and stopped when a
    checkpoint exists to resume from. Otherwise it is incomplete: never
    started, or killed before its first checkpoint.
    """
    record = read_record(directory) if record is None else record
    metrics = read_metrics(directory) if metrics is None else metrics
    if metrics and metrics.get("status") == "finished":
        return "finished"
    exit_code = record.get("exit_code")
    if exit_code is not None and exit_code not in STOP_EXIT_CODES:
        return "failed"
    if has_checkpoint(directory):
        return "stopped"
    return "incomplete"


def read_run(directory: Path) -> RunResult:
    """Read one run directory, taking its identity from the sweep's record or else from ``config.yaml``."""
    record = read_record(directory)
    metrics = read_metrics(directory) or {}
    status = run_status(directory, record, metrics)
    identity = dict(record)
    if not identity and (directory / "config.yaml").is_file():
        config = yaml.safe_load((directory / "config.yaml").read_text(encoding="utf-8")) or {}
        identity = {"framework": config.get("framework"), "scheduler": config.get("scheduler"),
                    "seed": config.get("seed")}
    return RunResult(
        name=directory.name,
        directory=directory,
        framework=str(identity.get("framework", metrics.get("framework", "unknown"))),
        scheduler=str(identity.get("scheduler", metrics.get("scheduler", directory.name))),
        seed=int(identity.get("seed", metrics.get("seed", -1))),
        status=status,
        metrics=metrics if status == "finished" else {},
        error=record.get("error") if status == "failed" else None,
    )


def collect_runs(sweep_dir: Path) -> list[RunResult]:
    """Read every run directory under ``sweep_dir/runs``, sorted by name."""
    runs_dir = Path(sweep_dir) / RUNS_FOLDER
    if not runs_dir.is_dir():
        raise ReportError(f"invalid sweep directory {str(sweep_dir)!r}: {RUNS_FOLDER}/ not found")
    return [read_run(path) for path in sorted(runs_dir.iterdir()) if path.is_dir()]


def read_sweep_file(sweep_dir: Path) -> dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        return {}
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    return values if isinstance(values, dict) else {}


def scheduler_order(runs: Sequence[RunResult], sweep: dict[str, Any]) -> list[str]:
    """Return the scheduler labels in the sweep file's order, then any others in order of appearance."""
    order = [entry["label"] for entry in sweep.get("schedulers", []) if isinstance(entry, dict) and "label" in entry]
    for run in runs:
        if run.scheduler not in order:
            order.append(run.scheduler)
    return order


# -- results.csv ----------------------------------------------------------------

def write_results_csv(runs: Sequence[RunResult], path: Path) -> None:
    """Write one row per run: identity, status, every metric of ``metrics.json``, wall time and error."""
    metric_columns: list[str] = []
    excluded = set(ID_COLUMNS) | set(TAIL_COLUMNS)
    for run in runs:
        metric_columns.extend(key for key in run.metrics if key not in excluded and key not in metric_columns)
    columns = [*ID_COLUMNS, *metric_columns, *TAIL_COLUMNS]

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, restval="")
        writer.writeheader()
        for run in runs:
            row = {key: ("" if value is None else value) for key, value in run.metrics.items() if key in columns}
            row.update({"framework": run.framework, "scheduler": run.scheduler, "seed": run.seed,
                        "status": run.status, "wall_seconds": run.metrics.get("wall_seconds", ""),
                        "error": run.error or ""})
            writer.writerow(row)


# -- summary.md -------------------------------------------------------------------

def group_finished(runs: Sequence[RunResult]) -> dict[str, dict[str, list[RunResult]]]:
    """Return the finished runs grouped by framework, then by scheduler label."""
    groups: dict[str, dict[str, list[RunResult]]] = {}
    for run in runs:
        if run.status == "finished":
            groups.setdefault(run.framework, {}).setdefault(run.scheduler, []).append(run)
    return groups


def metric_values(runs: Sequence[RunResult], key: str, scale: float = 1.0) -> list[float]:
    """Return the finite values of one metric over runs (one per seed), multiplied by ``scale``."""
    return [value * scale for value in (run.value(key) for run in runs) if value is not None]


def format_interval(values: Sequence[float], decimals: int) -> str:
    """Format values over seeds as ``mean ± half-width`` of the 95% Student-t interval."""
    from falcon_rl.evaluation.stats import mean_confidence_interval

    if not values:
        return "n/a"
    mean, half_width = mean_confidence_interval(values)
    spread = "n/a" if math.isnan(half_width) else f"{half_width:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {spread}"


def best_scheduler(groups: dict[str, list[RunResult]], key: str = "val_rsum") -> str | None:
    """Return the label with the highest mean of ``key`` (validation RSUM), or None when no run has it."""
    means = {label: float(np.mean(values)) for label, runs in groups.items()
             if (values := metric_values(runs, key))}
    return max(means, key=means.__getitem__) if means else None


def metric_table(groups: dict[str, list[RunResult]], order: Sequence[str], metrics: Sequence[Metric],
                 bold: tuple[str, str] | None = None) -> list[str]:
    """Render a Markdown table of mean ± CI per scheduler; ``bold`` is the (label, key) cell to emphasise."""
    lines = ["| scheduler | n | " + " | ".join(header for _, header, _, _ in metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for label in order:
        if label not in groups:
            continue
        cells = []
        for key, _, scale, decimals in metrics:
            cell = format_interval(metric_values(groups[label], key, scale), decimals)
            cells.append(f"**{cell}**" if bold == (label, key) else cell)
        lines.append(f"| {label} | {len(groups[label])} | " + " | ".join(cells) + " |")
    return lines


def paired_rows(groups: dict[str, list[RunResult]], order: Sequence[str], baseline: str,
                metrics: Sequence[Metric] = PAIRED_METRICS) -> list[dict[str, Any]]:
    """Compare each scheduler with the baseline on the seeds where both have the metric.

    :return: one row per (scheduler, metric): ``scheduler``, ``metric``, ``seeds`` and the
        fields of ``paired_comparison`` (``mean_diff``, ``ci_half_width``, ``p_value``, ``n``),
        which are None when no seed is shared.
    """
    from falcon_rl.evaluation.stats import paired_comparison

    rows = []
    for label in order:
        if label == baseline or label not in groups:
            continue
        for key, header, scale, _ in metrics:
            ours = {run.seed: value * scale for run in groups[label] if (value := run.value(key)) is not None}
            theirs = {run.seed: value * scale for run in groups[baseline] if (value := run.value(key)) is not None}
            seeds = sorted(set(ours) & set(theirs))
            row: dict[str, Any] = {"scheduler": label, "metric": header, "key": key, "seeds": seeds,
                                   "mean_diff": None, "ci_half_width": None, "p_value": None, "n": 0}
            if seeds:
                row.update(paired_comparison([ours[s] for s in seeds], [theirs[s] for s in seeds]))
            rows.append(row)
    return rows


def paired_table(rows: Sequence[dict[str, Any]], decimals: int = 2) -> list[str]:
    lines = ["| scheduler | metric | mean difference ± 95% CI | p-value | n |", "|---|---|---:|---:|---:|"]
    for row in rows:
        if not row["n"]:
            lines.append(f"| {row['scheduler']} | {row['metric']} | n/a (no shared seed) | n/a | 0 |")
            continue
        half_width = row["ci_half_width"]
        spread = "n/a" if math.isnan(half_width) else f"{half_width:.{decimals}f}"
        p_value = "n/a" if math.isnan(row["p_value"]) else f"{row['p_value']:.3f}"
        lines.append(f"| {row['scheduler']} | {row['metric']} | {row['mean_diff']:+.{decimals}f} ± {spread} "
                     f"| {p_value} | {row['n']} |")
    return lines


def framework_section(framework: str, groups: dict[str, list[RunResult]], order: Sequence[str],
                      baseline: str) -> list[str]:
    """Render one framework's tables: validation, test, training and the paired comparison."""
    best = best_scheduler(groups)
    lines = [f"## {framework}", ""]
    if best is not None:
        test_rsum = format_interval(metric_values(groups[best], "rsum"), 2)
        lines += [f"Selected by validation RSUM: **{best}** (its test RSUM: {test_rsum}).", ""]
    lines += ["### Validation", "",
              *metric_table(groups, order, VALIDATION_METRICS, bold=(best, "val_rsum") if best else None), "",
              "### Test", "", *metric_table(groups, order, TEST_METRICS), "",
              "### Training", "", *metric_table(groups, order, TRAINING_METRICS), "",
              f"### Paired comparison with `{baseline}`", ""]
    if baseline not in groups:
        lines += [f"No finished `{baseline}` run for {framework}, so there is no paired comparison.", ""]
        return lines
    lines += [f"Difference scheduler minus `{baseline}` over the seeds where both finished, with the "
              "95% Student-t interval of the mean difference and a two-sided paired t-test.", "",
              *paired_table(paired_rows(groups, order, baseline)), ""]
    return lines


def unfinished_section(runs: Sequence[RunResult]) -> list[str]:
    unfinished = [run for run in runs if run.status != "finished"]
    if not unfinished:
        return []
    lines = ["## Runs that did not finish", "",
             "Re-running the same sweep command retries failed and incomplete runs and resumes stopped ones.", "",
             "| run | status | error | log |", "|---|---|---|---|"]
    for run in unfinished:
        error = (run.error or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {run.name} | {run.status} | {error} | `{RUNS_FOLDER}/{run.name}/{LOG_FILE}` |")
    return lines + [""]


def render_summary(runs: Sequence[RunResult], order: Sequence[str], baseline: str,
                   plots: Sequence[Path] = ()) -> str:
    """Render ``summary.md``: how to read it, one section per framework, unfinished runs and plots."""
    counts = ", ".join(f"{sum(run.status == status for run in runs)} {status}" for status in STATUSES)
    lines = [
        "# Sweep summary", "",
        f"{len(runs)} runs: {counts}. Baseline: `{baseline}`.", "",
        "Each cell is the mean over seeds ± the half-width of its 95% confidence interval (Student t "
        "with n - 1 degrees of freedom, \"± n/a\" for a single seed), and n counts the finished seeds. "
        "Recalls and RSUM are in percent.", "",
        "Selection uses the validation split only: each framework's best mean validation RSUM is in "
        "bold, and the test split is reported for that choice but never used to make it.", "",
        "Runs with the same seed share the model initialisation and the data order, so the differences "
        "between schedulers at one seed come from the scheduler.", "",
    ]
    groups = group_finished(runs)
    for framework in sorted(groups):
        lines += framework_section(framework, groups[framework], order, baseline)
    if not groups:
        lines += ["No run has finished yet.", ""]
    lines += unfinished_section(runs)
    if plots:
        lines += ["## Plots", "", *[f"- `{path.as_posix()}`" for path in plots], ""]
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------

def _new_figure(width: float = 7.0, height: float = 4.0):
    # The object-oriented Figure renders through Agg without pyplot, so no display is needed.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def _color(index: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def plot_metric_bars(runs: Sequence[RunResult], order: Sequence[str], key: str, title: str, path: Path) -> bool:
    """Draw one bar per scheduler and framework at the mean of ``key``, with 95% intervals and seed points."""
    from falcon_rl.evaluation.stats import mean_confidence_interval

    groups = group_finished(runs)
    labels = [label for label in order if any(metric_values(g.get(label, []), key) for g in groups.values())]
    if not labels:
        return False
    figure, axes = _new_figure(max(6.0, 0.9 * len(labels) + 2.0))
    width = 0.8 / len(groups)
    for index, framework in enumerate(sorted(groups)):
        for position, label in enumerate(labels):
            values = metric_values(groups[framework].get(label, []), key)
            if not values:
                continue
            mean, half_width = mean_confidence_interval(values)
            x = position - 0.4 + width * (index + 0.5)
            axes.bar(x, mean, width, color=_color(index), label=framework if position == 0 else None,
                     yerr=None if math.isnan(half_width) else half_width, capsize=4)
            axes.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_ylabel(title)
    axes.set_title(f"{title}\nmean and 95% interval over seeds, dots are seeds", fontsize="medium")
    if len(groups) > 1:
        axes.legend(title="framework")
    figure.savefig(path, dpi=120)
    return True


def read_history(directory: Path) -> list[dict[str, Any]]:
    """Return the per-step entries of a run's ``history.json`` (empty when missing or unreadable)."""
    path = directory / "history.json"
    try:
        steps = json.loads(path.read_text(encoding="utf-8")).get("steps", [])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    return steps if isinstance(steps, list) else []


def mean_curve(runs: Sequence[RunResult], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Average a per-step history value over runs (seeds), step by step."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for entry in read_history(run.directory):
            value = entry.get(key)
            if isinstance(entry.get("step"), int) and isinstance(value, (int, float)):
                by_step.setdefault(entry["step"], []).append(float(value))
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([np.mean(by_step[step]) for step in steps], dtype=np.float64)


def plot_hardness_curves(runs: Sequence[RunResult], order: Sequence[str], path: Path) -> bool:
    """Draw the mean hardness over training steps, averaged over seeds, one line per scheduler."""
    groups = group_finished(runs)
    figure, axes = _new_figure()
    drawn = False
    window = 1
    for f_index, framework in enumerate(sorted(groups)):
        for index, label in enumerate(order):
            steps, hardness = mean_curve(groups[framework].get(label, []), "mean_hardness")
            if len(steps) == 0:
                continue
            # A moving average of about 1/50 of the run keeps per-step noise from hiding the trend.
            window = max(1, len(steps) // 50)
            smooth = np.convolve(hardness, np.ones(window) / window, mode="valid")
            name = label if len(groups) == 1 else f"{framework} {label}"
            axes.plot(steps[window - 1:], smooth, color=_color(index), label=name,
                      linestyle=("-", "--", ":", "-.")[f_index % 4])
            drawn = True
    if not drawn:
        return False
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("training step")
    axes.set_ylabel("mean hardness q")
    axes.set_ylim(-0.05, 1.05)
    axes.set_title("hardness over training, mean over seeds" + (f", moving average of {window} steps"
                                                                if window > 1 else ""))
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return True


def plot_fn_rate_against_hardness(runs: Sequence[RunResult], order: Sequence[str], path: Path) -> bool:
    """Draw one point per finished run: mined false-negative rate against mean hardness."""
    figure, axes = _new_figure()
    frameworks = sorted({run.framework for run in runs})
    drawn = set()
    for run in runs:
        hardness, fn_rate = run.value("mean_hardness"), run.value("mined_fn_rate")
        if run.status != "finished" or hardness is None or fn_rate is None:
            continue
        index = order.index(run.scheduler) if run.scheduler in order else 0
        marker = "osD^v"[frameworks.index(run.framework) % 5]
        name = run.scheduler if len(frameworks) == 1 else f"{run.framework} {run.scheduler}"
        axes.scatter(hardness, 100.0 * fn_rate, color=_color(index), marker=marker,
                     label=None if name in drawn else name)
        drawn.add(name)
    if not drawn:
        return False
    axes.set_xlabel("mean hardness q over training")
    axes.set_ylabel("mined false-negative rate (%)")
    axes.set_ylim(bottom=0.0)
    axes.set_title("mined false negatives against hardness, one point per run")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return True


def write_plots(runs: Sequence[RunResult], order: Sequence[str], plots_dir: Path) -> list[Path]:
    """Write the report's PNG plots and return their paths; a plot without data is left out."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in BAR_PLOTS:
        path = plots_dir / f"{key}.png"
        if plot_metric_bars(runs, order, key, title, path):
            written.append(path)
    for name, draw in (("hardness.png", plot_hardness_curves), ("fn-rate-vs-hardness.png",
                                                                 plot_fn_rate_against_hardness)):
        if draw(runs, order, plots_dir / name):
            written.append(plots_dir / name)
    return written


# -- the report ---------------------------------------------------------------------

def build_report(sweep_dir: Path, baseline: str | None = None) -> dict[str, Any]:
    """Rebuild ``results.csv``, ``summary.md`` and ``plots/`` of a sweep from its run directories.

    :param sweep_dir: the sweep's output directory, holding ``runs/``.
    :param baseline: the scheduler label of the paired comparison (default: the sweep's
        ``baseline``, else ``hardest``).
    :return: ``results``, ``summary`` and ``plots`` paths and the ``runs`` read.
    """
    sweep_dir = Path(sweep_dir)
    runs = collect_runs(sweep_dir)
    sweep = read_sweep_file(sweep_dir)
    baseline = baseline or sweep.get("baseline") or DEFAULT_BASELINE
    order = scheduler_order(runs, sweep)
    runs.sort(key=lambda run: (run.framework, order.index(run.scheduler), run.seed))

    results = sweep_dir / "results.csv"
    write_results_csv(runs, results)
    plots = write_plots(runs, order, sweep_dir / "plots")
    summary = sweep_dir / "summary.md"
    relative_plots = [path.relative_to(sweep_dir) for path in plots]
    write_text_atomic(summary, render_summary(runs, order, baseline, relative_plots))
    return {"results": results, "summary": summary, "plots": plots, "runs": runs}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="report.py", description="Rebuild results.csv, summary.md and plots "
                                     "of a sweep directory from its run directories.")
    parser.add_argument("directory", metavar="SWEEP_DIR", help="The sweep's --output directory.")
    parser.add_argument("--baseline", metavar="LABEL", help="Scheduler label that the paired comparison "
                        "uses as reference (default: the sweep's baseline, else hardest).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = build_report(Path(args.directory), args.baseline)
    except ReportError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    finished = sum(run.status == "finished" for run in report["runs"])
    print(f"{finished} of {len(report['runs'])} runs finished; wrote {report['results']}, {report['summary']} "
          f"and {len(report['plots'])} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
