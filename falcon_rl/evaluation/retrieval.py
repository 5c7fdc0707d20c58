"""Image-text retrieval evaluation of a VLP framework on one split: ITC ranking, optional ITM re-ranking."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from falcon_rl.evaluation.errors import EvaluationError
from falcon_rl.evaluation.metrics import retrieval_metrics

if TYPE_CHECKING:
    from falcon_rl.data.pairs import ImageTextPairs
    from falcon_rl.models.base import VLPFramework

logger = logging.getLogger(__name__)

PRECISION_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

# Framework names already warned that ITM re-ranking was requested but has no ITM head.
_WARNED_NO_ITM: set[str] = set()

# Maps (query indices [P], item indices [P]) to the ITM match probability of each pair [P].
MatchProbability = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate_retrieval(
    framework: VLPFramework,
    pairs: ImageTextPairs,
    tokenizer: Any,
    device: torch.device | str,
    batch_size: int = 256,
    itm_rerank_k: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, float | int | None]:
    """Evaluate image-to-text and text-to-image retrieval on every image and caption of a split.

    Images and captions are ranked by the framework's ITC similarity
    (``VLPFramework.retrieval_similarity``): the cosine of the ITC embeddings, or for BLIP-2
    the maximum over its query embeddings. With ``itm_rerank_k > 0`` and a framework that
    has an ITM head, the top k captions of each image and the top k images of each caption
    are re-ordered by ITM match probability, as ALBEF evaluates. Items outside the top k
    keep their ITC order below them.

    :param framework: the model; it is evaluated in eval mode and its previous mode is restored.
    :param pairs: the split's images and captions, with human judgments when the dataset has them.
    :param tokenizer: a Hugging Face tokenizer, e.g. from ``falcon_rl.data.tokenizer.load_tokenizer``.
    :param device: device the framework lives on.
    :param batch_size: images, captions or ITM pairs per forward pass.
    :param itm_rerank_k: number of top ITC candidates per query to re-rank with ITM; 0 turns
        re-ranking off. Costs ``(n_images + n_captions) * k`` ITM forward passes.
    :param precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast for the forward passes.
    :param progress: show tqdm progress bars.
    :return: the metrics of ``retrieval_metrics`` plus ``num_images`` and ``num_captions``.
    """
    _validate_options(batch_size, itm_rerank_k, precision)
    from falcon_rl.data.tokenizer import tokenize

    device = torch.device(device)
    was_training = framework.training
    framework.eval()
    try:
        with torch.no_grad(), _autocast(device, precision):
            input_ids, attention_mask = tokenize(tokenizer, pairs.captions, framework.max_text_length)
            image_features = _embed_images(framework, pairs.images, device, batch_size, progress)
            text_embed = _embed_texts(framework, input_ids, attention_mask, device, batch_size, progress)
            sim = framework.retrieval_similarity(image_features, text_embed)
            i2t_sim, t2i_sim = sim, sim
            if itm_rerank_k > 0 and framework.has_itm:
                match_prob = _image_caption_match_prob(
                    framework, pairs.images, input_ids, attention_mask, device
                )

                def caption_image_match_prob(captions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
                    return match_prob(images, captions)

                i2t_sim = itm_rerank(sim, itm_rerank_k, match_prob, batch_size, progress)
                t2i_sim = itm_rerank(sim.T, itm_rerank_k, caption_image_match_prob, batch_size, progress).T
            elif itm_rerank_k > 0 and framework.name not in _WARNED_NO_ITM:
                _WARNED_NO_ITM.add(framework.name)
                logger.warning("%s has no ITM head, so retrieval is ranked by ITC only", framework.name)
    finally:
        framework.train(was_training)

    metrics: dict[str, float | int | None] = dict(
        retrieval_metrics(i2t_sim, pairs.image_ids, pairs.human_matches, t2i_sim=t2i_sim)
    )
    metrics["num_images"] = int(pairs.images.shape[0])
    metrics["num_captions"] = len(pairs.captions)
    return metrics


def itm_rerank(
    scores: torch.Tensor, k: int, match_prob: MatchProbability, batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """Re-score the top k items of each query with ITM, keeping the rest in their ITC order below.

    :param scores: ITC scores ``[n_queries, n_items]``.
    :param k: items re-ranked per query; capped at ``n_items``.
    :param match_prob: maps query indices and item indices ``[P]`` to match probabilities ``[P]``.
    :param batch_size: (query, item) pairs per ``match_prob`` call.
    :param progress: show a tqdm progress bar.
    :return: float32 scores ``[n_queries, n_items]`` in which each query's top k hold
        ``offset + P(match)`` with an offset above every ITC score, and the rest are unchanged.
    """
    n_queries, n_items = scores.shape
    k = min(k, n_items)
    scores = scores.float()
    top_items = scores.topk(k, dim=1).indices
    queries = torch.arange(n_queries, device=scores.device).repeat_interleave(k)
    items = top_items.reshape(-1)

    probabilities = []
    for start in tqdm(range(0, len(items), batch_size), desc="ITM re-rank", disable=not progress):
        batch_probs = match_prob(queries[start:start + batch_size], items[start:start + batch_size])
        probabilities.append(batch_probs.float().to(scores.device))

    # Probabilities lie in [0, 1], so max + 1 lifts every re-ranked item above the rest.
    offset = scores.max() + 1.0
    reranked = scores.clone()
    reranked.scatter_(1, top_items, torch.cat(probabilities).view(n_queries, k) + offset)
    return reranked


def _embed_images(
    framework: VLPFramework, images: torch.Tensor, device: torch.device, batch_size: int, progress: bool
) -> torch.Tensor:
    embeddings = []
    for start in tqdm(range(0, len(images), batch_size), desc="embed images", disable=not progress):
        pixels = framework.preprocess_images(images[start:start + batch_size].to(device))
        embeddings.append(framework.retrieval_image_features(pixels).float())
    return torch.cat(embeddings)


def _embed_texts(
    framework: VLPFramework,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    from falcon_rl.models.base import TextBatch

    embeddings = []
    for start in tqdm(range(0, len(input_ids), batch_size), desc="embed captions", disable=not progress):
        end = start + batch_size
        text = TextBatch(input_ids[start:end].to(device), attention_mask[start:end].to(device))
        embeddings.append(framework.embed_texts(text).float())
    return torch.cat(embeddings)


def _image_caption_match_prob(
    framework: VLPFramework,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    device: torch.device,
) -> MatchProbability:
    from falcon_rl.models.base import TextBatch

    def match_prob(image_indices: torch.Tensor, caption_indices: torch.Tensor) -> torch.Tensor:
        image_indices = image_indices.cpu()
        caption_indices = caption_indices.cpu()
        pixels = framework.preprocess_images(images[image_indices].to(device))
        text = TextBatch(input_ids[caption_indices].to(device), attention_mask[caption_indices].to(device))
        return framework.itm_match_prob(pixels, text)

    return match_prob


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISION_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _validate_options(batch_size: int, itm_rerank_k: int, precision: str) -> None:
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
    if itm_rerank_k < 0:
        raise EvaluationError(
            f"itm_rerank_k must be 0 (off) or a positive number of candidates, got {itm_rerank_k}"
        )
    if precision not in PRECISION_DTYPES:
        raise EvaluationError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
