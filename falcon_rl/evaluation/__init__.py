"""Retrieval evaluation (recall@K, RSUM, FN-aware recall, mAP@R) and statistics over seeds."""

from falcon_rl.evaluation.errors import EvaluationError
from falcon_rl.evaluation.metrics import RECALL_KS, chance_rsum, map_at_r, recall_at_k, retrieval_metrics
from falcon_rl.evaluation.retrieval import evaluate_retrieval, itm_rerank
from falcon_rl.evaluation.stats import mean_confidence_interval, paired_comparison

__all__ = [
    "RECALL_KS",
    "EvaluationError",
    "chance_rsum",
    "evaluate_retrieval",
    "itm_rerank",
    "map_at_r",
    "mean_confidence_interval",
    "paired_comparison",
    "recall_at_k",
    "retrieval_metrics",
]
