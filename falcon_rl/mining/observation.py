"""Per-anchor observation features for hardness schedulers.

An anchor's observation is a float32 vector in a fixed order, always finite
(NaN becomes 0, infinities are clipped) and clipped to ``[OBS_LOW, OBS_HIGH]``.
Similarities are inner products of L2-normalised ITC embeddings, so they lie
in [-1, 1]. The "candidates" are the anchor's top-K mined candidates (-1 pads
excluded), and s(a, c) is the mean of the two directional similarities.

==  =====================  ===========  =================================================
#   name                   range        meaning
==  =====================  ===========  =================================================
0   positive_sim           [-1, 1]      <img_a, txt_a>, similarity to the own caption
1   i2t_top1               [-1, 1]      max over candidates of <img_a, txt_c>
2   i2t_topk_mean          [-1, 1]      mean over candidates of <img_a, txt_c>
3   i2t_topk_std           [0, 1]       standard deviation of the same
4   t2i_top1               [-1, 1]      max over candidates of <txt_a, img_c>
5   t2i_topk_mean          [-1, 1]      mean over candidates of <txt_a, img_c>
6   t2i_topk_std           [0, 1]       standard deviation of the same
7   margin                 [-1, 1]      (positive_sim - max_c s(a, c)) / 2
8   candidate_entropy      [0, 1]       entropy of softmax(s / 0.07) over candidates / log K
9   positive_rank          [0, 1]       candidates with s above positive_sim, divided by K
10  valid_fraction         [0, 1]       share of the K candidate slots that are filled
11  progress               [0, 1]       share of the training run completed
12  recent_loss            [0, 1]       l / (1 + l) of the recent total training loss l >= 0
13  recent_loss_change     [-1, 1]      tanh of the recent change of the total loss
==  =====================  ===========  =================================================

Features 0-10 come from :func:`similarity_features` (computed when the batch
is proposed); :func:`make_observation` appends 11-13. Features of an anchor
without any candidate are 0, except ``positive_sim`` and ``valid_fraction``.
"""

from __future__ import annotations

import numpy as np

from falcon_rl.mining.errors import MiningError

SIMILARITY_FEATURE_NAMES: tuple[str, ...] = (
    "positive_sim",
    "i2t_top1",
    "i2t_topk_mean",
    "i2t_topk_std",
    "t2i_top1",
    "t2i_topk_mean",
    "t2i_topk_std",
    "margin",
    "candidate_entropy",
    "positive_rank",
    "valid_fraction",
)
RUN_FEATURE_NAMES: tuple[str, ...] = ("progress", "recent_loss", "recent_loss_change")
FEATURE_NAMES: tuple[str, ...] = SIMILARITY_FEATURE_NAMES + RUN_FEATURE_NAMES

OBS_LOW = np.array([-1, -1, -1, 0, -1, -1, 0, -1, 0, 0, 0, 0, 0, -1], dtype=np.float32)
OBS_HIGH = np.ones(len(FEATURE_NAMES), dtype=np.float32)

# Temperature of the candidate softmax, the ITC temperature of ALBEF and GRIT-VLP.
ENTROPY_TEMPERATURE = 0.07

_N_SIM = len(SIMILARITY_FEATURE_NAMES)


def similarity_features(
    positive_sims: np.ndarray,
    i2t_sims: np.ndarray,
    t2i_sims: np.ndarray,
    candidate_sims: np.ndarray,
    valid: np.ndarray,
    temperature: float = ENTROPY_TEMPERATURE,
) -> np.ndarray:
    """Compute features 0-10 of the table above for each anchor.

    :param positive_sims: <img_a, txt_a> per anchor ``[A]``.
    :param i2t_sims: <img_a, txt_c> of each candidate ``[A, K]``.
    :param t2i_sims: <txt_a, img_c> of each candidate ``[A, K]``.
    :param candidate_sims: s(a, c) of each candidate ``[A, K]``.
    :param valid: bool ``[A, K]``, False at -1 pads.
    :param temperature: softmax temperature of the entropy feature.
    :return: float32 ``[A, 11]``, finite and within the bounds of the table.
    """
    valid = np.asarray(valid, dtype=bool)
    n_anchors, k = valid.shape
    count = valid.sum(axis=1)
    has_any = count > 0
    positive = np.asarray(positive_sims, dtype=np.float64)
    # Without pads (the usual case) plain reductions give the same values as
    # the NaN-aware ones, at a fraction of their cost.
    all_valid = bool(valid.all())
    i2t = np.asarray(i2t_sims, dtype=np.float64) if all_valid else _masked(i2t_sims, valid)
    t2i = np.asarray(t2i_sims, dtype=np.float64) if all_valid else _masked(t2i_sims, valid)
    sims = np.asarray(candidate_sims, dtype=np.float64) if all_valid else _masked(candidate_sims, valid)
    maximum, mean, std = (np.max, np.mean, np.std) if all_valid else (np.nanmax, np.nanmean, np.nanstd)

    features = np.zeros((n_anchors, _N_SIM), dtype=np.float64)
    features[:, 0] = positive
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for column, directional in ((1, i2t), (4, t2i)):
            features[has_any, column] = maximum(directional[has_any], axis=1)
            features[has_any, column + 1] = mean(directional[has_any], axis=1)
            features[has_any, column + 2] = std(directional[has_any], axis=1)
        features[has_any, 7] = (positive[has_any] - maximum(sims[has_any], axis=1)) / 2.0
        features[:, 8] = _normalised_entropy(sims, valid, k, temperature)
        features[:, 9] = (valid & (sims > positive[:, None])).sum(axis=1) / max(k, 1)
    features[:, 10] = count / max(k, 1)

    return _sanitise(features, OBS_LOW[:_N_SIM], OBS_HIGH[:_N_SIM])


def make_observation(
    similarity_features: np.ndarray,
    progress: float,
    loss_features: np.ndarray | None = None,
) -> np.ndarray:
    """Append run features to per-anchor similarity features.

    :param similarity_features: ``[A, 11]`` from :func:`similarity_features`
        (or one ``[11]`` row).
    :param progress: share of the training run completed, in [0, 1].
    :param loss_features: raw ``[recent total loss, recent loss change]``;
        None (no loss seen yet) gives zeros. They are squashed here, as
        ``l / (1 + l)`` and ``tanh``.
    :return: float32 ``[A, 14]`` (or ``[14]``), finite and within ``[OBS_LOW, OBS_HIGH]``.
    """
    sim = np.asarray(similarity_features, dtype=np.float64)
    single = sim.ndim == 1
    sim = np.atleast_2d(sim)
    if sim.ndim != 2 or sim.shape[1] != _N_SIM:
        raise MiningError(f"similarity_features must have shape [A, {_N_SIM}], got {np.shape(similarity_features)}")

    loss = np.zeros(2) if loss_features is None else np.asarray(loss_features, dtype=np.float64).reshape(-1)
    if loss.shape != (2,):
        raise MiningError(f"loss_features must be [recent_loss, recent_loss_change], got shape {loss.shape}")
    loss = np.nan_to_num(loss, nan=0.0, posinf=1e30, neginf=-1e30)
    recent_loss = max(loss[0], 0.0)
    run = np.array([progress, recent_loss / (1.0 + recent_loss), np.tanh(loss[1])], dtype=np.float64)

    observation = np.concatenate([sim, np.broadcast_to(run, (sim.shape[0], run.size))], axis=1)
    observation = _sanitise(observation, OBS_LOW, OBS_HIGH)
    return observation[0] if single else observation


def batch_observation(anchor_observations: np.ndarray) -> np.ndarray:
    """Return the mean over anchors ``[F]`` of ``[A, F]`` observations, for per-batch schedulers."""
    observations = np.asarray(anchor_observations, dtype=np.float64)
    if observations.ndim != 2 or observations.shape[0] == 0 or observations.shape[1] != len(FEATURE_NAMES):
        raise MiningError(
            f"anchor_observations must have shape [A >= 1, {len(FEATURE_NAMES)}], got {observations.shape}"
        )
    return _sanitise(observations.mean(axis=0), OBS_LOW, OBS_HIGH)


def _masked(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.where(valid, np.asarray(values, dtype=np.float64), np.nan)


def _normalised_entropy(sims: np.ndarray, valid: np.ndarray, k: int, temperature: float) -> np.ndarray:
    if k < 2:
        return np.zeros(sims.shape[0])
    logits = np.where(valid & np.isfinite(sims), sims / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.exp(logits - top)
    total = weights.sum(axis=1, keepdims=True)
    probabilities = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    log_p = np.log(probabilities, out=np.zeros_like(probabilities), where=probabilities > 0)
    return -(probabilities * log_p).sum(axis=1) / np.log(k)


def _sanitise(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values, nan=0.0, posinf=np.inf, neginf=-np.inf)
    return np.clip(values, low, high).astype(np.float32)
