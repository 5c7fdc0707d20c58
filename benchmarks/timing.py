"""Shared helpers of the benchmarks: alternated timing, medians, hardware and memory records."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch


def alternated_medians(
    tasks: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every task ``warmup`` times, then ``repeats`` rounds in rotating order; return each task's samples.

    A task returns the seconds it measured itself (so it can exclude its own
    setup). Rotating the order each round spreads slow phases of a shared
    machine over all tasks instead of charging them to one.

    :param tasks: name -> callable returning measured seconds.
    :param repeats: measured rounds.
    :param warmup: unmeasured runs of each task before the first round.
    """
    names = list(tasks)
    for _ in range(warmup):
        for name in names:
            tasks[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(tasks[name]())
    return samples


def median(values: Sequence[float]) -> float:
    """Return the median of the samples, or NaN when there are none."""
    return float(statistics.median(values)) if values else float("nan")


def timed(function: Callable[[], Any]) -> float:
    """Return the seconds that one call of ``function`` takes."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def peak_memory_mb() -> float:
    """Return the peak resident set size of this process in MiB (``getrusage`` ``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware() -> dict[str, Any]:
    """Return the cores, CPU model, load, threads and package versions of this run."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }


def set_threads(threads: int | None) -> None:
    """Set torch's and FAISS's thread counts, when given."""
    if threads:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def write_json(path: str | None, record: dict[str, Any]) -> None:
    """Write ``record`` as indented JSON to ``path``, when given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Render rows as a Markdown table; ``columns`` contains (key, header, format) triples."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif fmt:
                cells.append(format(value, fmt))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
