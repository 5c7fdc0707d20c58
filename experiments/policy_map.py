"""Pictures of what a scheduler learned, for TensorBoard.

A policy map shows the hardness a scheduler chooses as a heatmap over two
observation features, the anchor's similarity to its own positive (x) and to
its hardest candidate caption (y), with every other feature held at its
running mean over the run so far. The false-negative chart shows the mined
false-negative rate per hardness bin.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402
from PIL import Image  # noqa: E402

from falcon_rl.mining import FEATURE_NAMES, action_to_hardness  # noqa: E402

X_FEATURE = "positive_sim"
Y_FEATURE = "i2t_top1"
GRID = 21
HARDNESS_BINS = 10


class ObservationStats:
    """Running mean, minimum and maximum of the anchors' observation features."""

    def __init__(self, n_features: int) -> None:
        self.count = 0
        self.mean = np.zeros(n_features, dtype=np.float64)
        self.low = np.full(n_features, np.inf)
        self.high = np.full(n_features, -np.inf)

    def update(self, observation: np.ndarray) -> None:
        rows = np.asarray(observation, dtype=np.float64).reshape(-1, self.mean.size)
        total = self.count + len(rows)
        self.mean += (rows.sum(axis=0) - len(rows) * self.mean) / total
        self.count = total
        self.low = np.minimum(self.low, rows.min(axis=0))
        self.high = np.maximum(self.high, rows.max(axis=0))


def policy_grid(stats: ObservationStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observations on a GRID x GRID lattice over the seen range of the two map features."""
    x_index, y_index = FEATURE_NAMES.index(X_FEATURE), FEATURE_NAMES.index(Y_FEATURE)
    axes = []
    for index in (x_index, y_index):
        low, high = stats.low[index], stats.high[index]
        if not np.isfinite(low) or high - low < 1e-3:
            low, high = low - 0.05 if np.isfinite(low) else -1.0, high + 0.05 if np.isfinite(high) else 1.0
        axes.append(np.linspace(low, high, GRID))
    xs, ys = np.meshgrid(*axes)
    observations = np.tile(stats.mean.astype(np.float32), (GRID * GRID, 1))
    observations[:, x_index] = xs.ravel()
    observations[:, y_index] = ys.ravel()
    return observations, axes[0], axes[1]


def predict_hardness(scheduler: Any, observations: np.ndarray, action_space: spaces.Space,
                     n_anchors: int) -> np.ndarray:
    """The scheduler's deterministic hardness for each observation row, without changing its state."""
    if scheduler.per_anchor:
        chunks = []
        for start in range(0, len(observations), n_anchors):
            chunk = observations[start:start + n_anchors]
            padded = np.resize(chunk, (n_anchors, chunk.shape[1])) if len(chunk) < n_anchors else chunk
            hardness = np.asarray(action_to_hardness(scheduler.predict(padded), action_space)).reshape(-1)
            chunks.append(hardness[:len(chunk)])
        return np.concatenate(chunks)
    return np.array([float(np.asarray(action_to_hardness(scheduler.predict(row), action_space)).reshape(-1)[0])
                     for row in observations])


def render_policy_map(hardness: np.ndarray, x_axis: np.ndarray, y_axis: np.ndarray, title: str) -> np.ndarray:
    figure, axes = plt.subplots(figsize=(4.2, 3.6), dpi=90)
    image = axes.imshow(hardness.reshape(GRID, GRID), origin="lower", aspect="auto", vmin=0.0, vmax=1.0,
                        extent=(x_axis[0], x_axis[-1], y_axis[0], y_axis[-1]), cmap="viridis")
    axes.set_xlabel(f"{X_FEATURE} (anchor to own caption)")
    axes.set_ylabel(f"{Y_FEATURE} (hardest candidate)")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="hardness q")
    return _to_array(figure)


def render_fn_rate(hardness: np.ndarray, is_false_negative: np.ndarray, title: str) -> np.ndarray:
    """Bar chart of the mined false-negative rate per hardness bin."""
    edges = np.linspace(0.0, 1.0, HARDNESS_BINS + 1)
    bins = np.clip(np.digitize(hardness, edges[1:-1]), 0, HARDNESS_BINS - 1)
    rates = np.full(HARDNESS_BINS, np.nan)
    counts = np.bincount(bins, minlength=HARDNESS_BINS)
    for index in np.flatnonzero(counts):
        rates[index] = 100.0 * is_false_negative[bins == index].mean()
    figure, axes = plt.subplots(figsize=(4.2, 3.2), dpi=90)
    centers = (edges[:-1] + edges[1:]) / 2
    axes.bar(centers, np.nan_to_num(rates), width=0.09)
    for center, count in zip(centers, counts):
        if count:
            axes.annotate(str(count), (center, 0), ha="center", va="bottom", fontsize=6)
    axes.set_xlabel("hardness q")
    axes.set_ylabel("mined false negatives (%)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, max(5.0, 1.2 * float(np.nanmax(rates, initial=0.0))))
    axes.set_title(title, fontsize=9)
    return _to_array(figure)


def _to_array(figure: plt.Figure) -> np.ndarray:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))
