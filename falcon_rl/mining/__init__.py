"""Negative mining: embedding bank, candidate search, batch building, observations, false negatives."""

from falcon_rl.mining.bank import EmbeddingBank
from falcon_rl.mining.batch import MinedBatch, Proposal
from falcon_rl.mining.builder import BatchBuilder
from falcon_rl.mining.errors import MiningError
from falcon_rl.mining.false_negatives import (
    LABEL_NAMES,
    FalseNegativeOracle,
    caption_normal_form,
    encode_sentences,
)
from falcon_rl.mining.hardness import action_to_hardness, hardness_to_rank, levels
from falcon_rl.mining.prefetch import BackgroundSearch
from falcon_rl.mining.observation import (
    FEATURE_NAMES,
    OBS_HIGH,
    OBS_LOW,
    SIMILARITY_FEATURE_NAMES,
    batch_observation,
    make_observation,
    similarity_features,
)
from falcon_rl.mining.search import INDEXES, CandidateSearch
from falcon_rl.mining.selection import choose_negatives, choose_negatives_reference

__all__ = [
    "FEATURE_NAMES",
    "INDEXES",
    "LABEL_NAMES",
    "OBS_HIGH",
    "OBS_LOW",
    "SIMILARITY_FEATURE_NAMES",
    "BackgroundSearch",
    "BatchBuilder",
    "CandidateSearch",
    "EmbeddingBank",
    "FalseNegativeOracle",
    "MinedBatch",
    "MiningError",
    "Proposal",
    "action_to_hardness",
    "batch_observation",
    "caption_normal_form",
    "choose_negatives",
    "choose_negatives_reference",
    "encode_sentences",
    "hardness_to_rank",
    "levels",
    "make_observation",
    "similarity_features",
]
