"""Batch construction speed: falcon-rl's BatchBuilder against GRIT-VLP's greedy grouping and a plain top-k miner.

Setting: random unit vectors (image and text independent, d = 256), five
captions per image (``image_id = pair // 5``), search space S = 4,096, batch
B = 128 (64 anchors), top-K = 16 candidates. Builders:

- ``builder_q1``: :class:`falcon_rl.mining.BatchBuilder`, propose + select,
  q = 1 for every anchor, at the builder's default search precision
  (``"auto"``: bfloat16 scores certified and re-scored in float32 where the
  CPU runs bfloat16 products faster, see :mod:`falcon_rl.mining.certified`).
- ``builder_q1[torch, float32]``: the same with ``precision="float32"``.
- ``builder_mixed_q``: the same as ``builder_q1`` with a uniform random q per anchor.
- ``torch_topk``: :class:`benchmarks.baselines.TorchTopkBuilder`.
- ``grit_greedy``: :class:`benchmarks.baselines.GreedyGrouping`, GRIT-VLP's grouping.
- ``bound``: the bare similarity products the builder cannot avoid. Per
  batch, the A = 64 anchor queries ``[txt, img]`` against the S - A pool keys
  ``[img, txt]``, one ``torch.mm`` of ``[A, 2d] x [2d, S - A]`` on
  contiguous float32 tensors gathered beforehand. This is A x (S - A) x 2d
  multiply-adds, both directions (image-to-text and text-to-image) of the
  cross-modal similarity. It excludes the row gathers, masks, top-k and
  selection that every miner needs as well. The products cycle through 16
  operand sets (128 MiB), so the keys come from memory, as they do for the
  builder when a training step runs between two searches.
- ``bound_cached``: the same products on one operand set, which stays in
  the CPU cache: the fastest the products can run.
- ``bound_bfloat16``: the same products as ``bound`` in bfloat16, key-major
  (``[S - A, 2d] x [2d, A]``) as the builder's bfloat16 search computes them.
  This is the product a bfloat16 search cannot avoid. Its results still need
  the float32 re-scoring of the candidates, which the bound leaves out.

The certificate counters of the bfloat16 search (``certificate`` in the
JSON) come from one more run of ``builder_q1`` over the timed batches, outside
the timing.

Timing: every builder is warmed up, then measured in ``--repeats`` rounds
whose order rotates. A measurement times consecutive batches (greedy: whole
search spaces) of a freshly constructed builder, without its construction. The
table reports medians. ``epoch_seconds`` is measured over a whole epoch where
``epoch_seconds_extrapolated`` is false. Otherwise it is the median seconds
per pair times N. The last batches of an epoch search fewer pairs, so the
extrapolation slightly overestimates.

Run from the repository root: ``python -m benchmarks.mining --quick --output mining.json``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.baselines import GreedyGrouping, TorchTopkBuilder
from benchmarks.timing import (
    alternated_medians,
    format_table,
    hardware,
    median,
    peak_memory_mb,
    set_threads,
    timed,
    write_json,
)
from falcon_rl.mining import BatchBuilder, EmbeddingBank
from falcon_rl.mining.certified import bfloat16_matmul_is_faster
from falcon_rl.mining.search import PRECISIONS, queries_from_keys

logger = logging.getLogger("benchmarks.mining")

DIM = 256
SEARCH_SPACE = 4096
BATCH_SIZE = 128
TOP_K = 16
CAPTIONS_PER_IMAGE = 5
SEED = 0
ONE_MILLION = 1_000_000
# Operand sets the bound cycles through: 16 x 8 MiB of keys, more than the L3 cache.
BOUND_BUFFERS = 16


def make_bank(n_pairs: int, dtype: torch.dtype, seed: int = SEED) -> EmbeddingBank:
    """Bank of independent random unit vectors, written in chunks to bound the peak memory."""
    bank = EmbeddingBank(n_pairs, DIM, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    chunk = 65536
    for start in range(0, n_pairs, chunk):
        rows = min(chunk, n_pairs - start)
        image = torch.nn.functional.normalize(torch.randn(rows, DIM, generator=generator), dim=1)
        text = torch.nn.functional.normalize(torch.randn(rows, DIM, generator=generator), dim=1)
        bank.fill(image, text, start=start)
    return bank


def builder_task(bank: EmbeddingBank, image_ids: np.ndarray, n_batches: int, mixed: bool,
                 backend: str, precision: str = "auto") -> Callable[[], float]:
    """Return a task that times ``n_batches`` propose + select calls of a fresh BatchBuilder."""

    def run() -> float:
        builder = BatchBuilder(image_ids, BATCH_SIZE, SEARCH_SPACE, TOP_K, SEED, backend=backend,
                               precision=precision)
        rng = np.random.default_rng(SEED)

        def batches() -> None:
            for _ in range(n_batches):
                proposal = builder.propose(bank)
                hardness = rng.uniform(0.0, 1.0, proposal.anchors.size) if mixed else 1.0
                batch = builder.select(proposal, hardness)
                if batch.epoch_end:
                    return

        return timed(batches)

    return run


def topk_task(bank: EmbeddingBank, image_ids: np.ndarray, n_batches: int) -> Callable[[], float]:
    """Return a task that times ``n_batches`` batches of a fresh TorchTopkBuilder."""

    def run() -> float:
        builder = TorchTopkBuilder(bank, image_ids, BATCH_SIZE, SEARCH_SPACE, TOP_K, SEED)

        def batches() -> None:
            for _ in range(n_batches):
                builder.next_batch()
                if builder.epoch_finished:
                    return

        return timed(batches)

    return run


def greedy_task(bank: EmbeddingBank, n_spaces: int) -> Callable[[], float]:
    """Return a task that times ``n_spaces`` search spaces of a fresh GreedyGrouping."""

    def run() -> float:
        grouping = GreedyGrouping(bank, BATCH_SIZE, SEARCH_SPACE, SEED)

        def spaces() -> None:
            for _ in range(n_spaces):
                grouping.next_search_space()
                if grouping.epoch_finished:
                    return

        return timed(spaces)

    return run


def bound_task(bank: EmbeddingBank, n_batches: int, n_buffers: int, bfloat16: bool = False) -> Callable[[], float]:
    """Return a task that times ``n_batches`` bare ``[A, 2d] x [2d, S - A]`` products on pre-gathered operands.

    The products cycle through ``n_buffers`` separate operand sets. With
    enough of them (16 sets are 128 MiB in float32), every product reads its
    keys from memory, as the builder's search does when a training step runs
    between two searches. With one set, the keys stay in the CPU cache. With
    ``bfloat16``, the operands are bfloat16 and the product is key-major,
    ``[S - A, 2d] x [2d, A]``, as in the builder's bfloat16 search.
    """
    n_anchors = math.ceil(BATCH_SIZE / 2)
    dtype = torch.bfloat16 if bfloat16 else torch.float32
    rng = np.random.default_rng(SEED)
    operands = []
    for _ in range(n_buffers):
        rows = rng.permutation(bank.n_pairs)[: min(SEARCH_SPACE, bank.n_pairs)]
        operands.append((queries_from_keys(bank.keys(rows[:n_anchors])).to(dtype).contiguous(),
                         bank.keys(rows[n_anchors:]).to(dtype).contiguous()))

    def products() -> None:
        for batch in range(n_batches):
            queries, keys = operands[batch % n_buffers]
            if bfloat16:
                torch.mm(keys, queries.T)
            else:
                torch.mm(queries, keys.T)

    return lambda: timed(products)


def certificate_counts(bank: EmbeddingBank, image_ids: np.ndarray, n_batches: int, backend: str,
                       precision: str) -> dict[str, Any]:
    """Return the bfloat16 search's counters over ``n_batches`` batches of a fresh builder at q = 1, with rates."""
    builder = BatchBuilder(image_ids, BATCH_SIZE, SEARCH_SPACE, TOP_K, SEED, backend=backend, precision=precision)
    for _ in range(n_batches):
        batch = builder.select(builder.propose(bank), 1.0)
        if batch.epoch_end:
            break
    counts: dict[str, Any] = builder.search_counts
    searched = counts["bfloat16_anchors"]
    counts["full_row_rate"] = counts["full_row_anchors"] / searched if searched else None
    counts["second_pass_anchor_rate"] = counts["second_pass_anchors"] / searched if searched else None
    counts["second_pass_keys_per_anchor"] = counts["second_pass_keys"] / searched if searched else None
    return counts


def counted_builder_batches(bank: EmbeddingBank, image_ids: np.ndarray, n_batches: int) -> tuple[int, int]:
    """Return the batches and pairs that ``n_batches`` steps of a fresh builder place (fewer at the epoch end)."""
    builder = BatchBuilder(image_ids, BATCH_SIZE, SEARCH_SPACE, TOP_K, SEED, backend="torch")
    placed = batches = 0
    for _ in range(n_batches):
        batch = builder.random_batch()
        placed += batch.pair_indices.size
        batches += 1
        if batch.epoch_end:
            break
    return batches, placed


def measure_bank(n_pairs: int, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every builder on one bank size; return one table row per builder and the certificate counters."""
    dtype = torch.float16 if args.bank_dtype == "float16" else torch.float32
    bank = make_bank(n_pairs, dtype)
    image_ids = np.arange(n_pairs, dtype=np.int64) // CAPTIONS_PER_IMAGE
    steps_per_epoch = math.ceil(n_pairs / BATCH_SIZE)
    spaces_per_epoch = math.ceil(n_pairs / SEARCH_SPACE)
    whole_epoch = n_pairs <= args.whole_epoch_up_to
    n_batches = steps_per_epoch if whole_epoch else min(args.batches, steps_per_epoch)
    n_spaces = spaces_per_epoch if whole_epoch else min(args.spaces, spaces_per_epoch)

    other = "faiss" if args.backend == "torch" else "torch"
    builders = {
        f"builder_q1[{args.backend}]": (False, args.backend, args.precision),
        f"builder_mixed_q[{args.backend}]": (True, args.backend, args.precision),
        f"builder_q1[{other}]": (False, other, "auto"),
    }
    if args.backend == "torch" and args.precision != "float32":
        builders["builder_q1[torch, float32]"] = (False, "torch", "float32")
    tasks = {name: builder_task(bank, image_ids, n_batches, *options) for name, options in builders.items()}
    tasks.update({
        "torch_topk": topk_task(bank, image_ids, n_batches),
        "grit_greedy": greedy_task(bank, n_spaces),
        "bound": bound_task(bank, n_batches, BOUND_BUFFERS),
        "bound_cached": bound_task(bank, n_batches, 1),
        "bound_bfloat16": bound_task(bank, n_batches, BOUND_BUFFERS, bfloat16=True),
    })
    warmups = {name: builder_task(bank, image_ids, 3, *options) for name, options in builders.items()}
    warmups.update({
        "torch_topk": topk_task(bank, image_ids, 3),
        "grit_greedy": greedy_task(bank, 1),
        "bound": bound_task(bank, 3, 1),
        "bound_bfloat16": bound_task(bank, 3, 1, bfloat16=True),
    })
    for warmup in warmups.values():
        warmup()
    samples = alternated_medians(tasks, args.repeats, warmup=0)
    certificate = certificate_counts(bank, image_ids, n_batches, args.backend, args.precision)

    batches, pairs = counted_builder_batches(bank, image_ids, n_batches)
    greedy_pairs = min(n_spaces * SEARCH_SPACE, n_pairs)
    rows = []
    for name, seconds in samples.items():
        greedy = name == "grit_greedy"
        row_pairs = greedy_pairs if greedy else pairs
        row_batches = math.ceil(greedy_pairs / BATCH_SIZE) if greedy else batches
        rows.append(make_row(name, n_pairs, seconds, row_batches, row_pairs, has_anchors=not greedy))
    del bank
    gc.collect()
    return rows, certificate


def make_row(name: str, n_pairs: int, seconds: list[float], batches: int, pairs: int,
             has_anchors: bool) -> dict[str, Any]:
    """Build one table row from a builder's measured samples."""
    seconds_median = median(seconds)
    whole_epoch = pairs >= n_pairs
    n_anchors = math.ceil(BATCH_SIZE / 2)
    return {
        "builder": name,
        "bank_pairs": n_pairs,
        "measured_batches": batches,
        "measured_pairs": pairs,
        "samples_seconds": [round(value, 6) for value in seconds],
        "seconds_per_batch": seconds_median / batches,
        "ms_per_batch": 1000.0 * seconds_median / batches,
        "pairs_per_second": pairs / seconds_median,
        "anchors_per_second": batches * n_anchors / seconds_median if has_anchors else None,
        "epoch_seconds": seconds_median if whole_epoch else seconds_median / pairs * n_pairs,
        "epoch_seconds_extrapolated": not whole_epoch,
    }


def summary(rows: list[dict[str, Any]], backend: str, sizes: list[int]) -> dict[str, Any]:
    """Compute the top-level figures for the builder at q = 1 on the largest bank measured."""
    largest = max(sizes)

    def row(name: str, n_pairs: int = largest) -> dict[str, Any] | None:
        return next((r for r in rows if r["builder"] == name and r["bank_pairs"] == n_pairs), None)

    builder, greedy, bound = row(f"builder_q1[{backend}]"), row("grit_greedy"), row("bound")
    bound_cached, bound_bfloat16 = row("bound_cached"), row("bound_bfloat16")
    float32_builder = row("builder_q1[torch, float32]")
    one_million = row(f"builder_q1[{backend}]", ONE_MILLION)
    return {
        "bank_pairs": largest,
        "backend": backend,
        "speedup_vs_greedy": greedy["epoch_seconds"] / builder["epoch_seconds"],
        "speedup_vs_greedy_float32": (greedy["epoch_seconds"] / float32_builder["epoch_seconds"]
                                      if float32_builder else None),
        "anchors_per_second": builder["anchors_per_second"],
        "bound_ratio": builder["seconds_per_batch"] / bound["seconds_per_batch"],
        "bound_ratio_cached": builder["seconds_per_batch"] / bound_cached["seconds_per_batch"],
        "bound_ratio_bfloat16": builder["seconds_per_batch"] / bound_bfloat16["seconds_per_batch"],
        "epoch_seconds_1m": one_million["epoch_seconds"] if one_million else None,
        "epoch_seconds_1m_extrapolated": one_million["epoch_seconds_extrapolated"] if one_million else None,
    }


COLUMNS = [
    ("bank_pairs", "bank pairs", ",d"),
    ("builder", "builder", ""),
    ("measured_batches", "batches timed", "d"),
    ("ms_per_batch", "ms / batch", ".2f"),
    ("pairs_per_second", "pairs / s", ",.0f"),
    ("anchors_per_second", "anchors / s", ",.0f"),
    ("epoch_seconds", "epoch s", ",.1f"),
    ("epoch_seconds_extrapolated", "extrapolated", ""),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="banks of 10k and 100k pairs only (about 2 minutes)")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.add_argument("--sizes", type=int, nargs="+", help="bank sizes in pairs (default 10k 100k 1M; "
                        "--quick: 10k 100k)")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds per builder (default 3)")
    parser.add_argument("--batches", type=int, help="batches timed per measurement on banks measured in part "
                        "(default 30, or 100 without --quick)")
    parser.add_argument("--spaces", type=int, help="greedy search spaces timed per measurement on banks measured "
                        "in part (default 1, or 2 without --quick)")
    parser.add_argument("--whole-epoch-up-to", type=int, default=10_000,
                        help="banks up to this many pairs are timed over a whole epoch (default 10000)")
    parser.add_argument("--backend", choices=("torch", "faiss"), default="torch",
                        help="search backend of the builder rows that the summary uses (default torch); "
                        "the other backend is measured at q = 1 too")
    parser.add_argument("--bank-dtype", choices=("float32", "float16"), default="float32",
                        help="storage dtype of the bank (default float32)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="search precision of the builder rows that the summary uses (default auto); with "
                        "the torch backend and another precision than float32, float32 is measured at q = 1 too")
    parser.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (default: their own)")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, ONE_MILLION])
    args.batches = args.batches or (30 if args.quick else 100)
    args.spaces = args.spaces or (1 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(args.threads)
    started = time.perf_counter()
    rows = []
    certificates = {}
    for n_pairs in args.sizes:
        logger.info("measuring a bank of %d pairs", n_pairs)
        bank_rows, certificates[n_pairs] = measure_bank(n_pairs, args)
        rows.extend(bank_rows)

    largest = certificates[max(args.sizes)]
    record = {
        "setting": {"dim": DIM, "search_space": SEARCH_SPACE, "batch_size": BATCH_SIZE, "top_k": TOP_K,
                    "captions_per_image": CAPTIONS_PER_IMAGE, "bank_dtype": args.bank_dtype,
                    "repeats": args.repeats, "quick": args.quick, "precision": args.precision,
                    "bfloat16_search": largest["bfloat16_anchors"] > 0,
                    "bfloat16_measured_faster": bfloat16_matmul_is_faster()},
        **summary(rows, args.backend, args.sizes),
        "certificate_fallback_rate": largest["full_row_rate"],
        "certificate": {str(n_pairs): counts for n_pairs, counts in certificates.items()},
        "wall_seconds": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(),
        "peak_memory_source": "resource.getrusage(RUSAGE_SELF).ru_maxrss, whole process",
        "hardware": hardware(),
        "rows": rows,
    }
    print(format_table(rows, COLUMNS))
    print({key: record[key] for key in ("speedup_vs_greedy", "anchors_per_second", "bound_ratio",
                                        "bound_ratio_bfloat16", "epoch_seconds_1m", "peak_memory_mb",
                                        "certificate_fallback_rate")})
    write_json(args.output, record)
    return record


if __name__ == "__main__":
    main()
