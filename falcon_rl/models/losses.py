"""Pretraining losses: ALBEF's ITC, ITM and MLM, BLIP-2's max-over-queries ITC and ITG,
SigLIP's sigmoid loss, with ITM hard-negative sampling and MLM masking.

Every function here is pure: it reads tensors and an optional ``torch.Generator`` and
returns tensors. Losses are computed in float32 with autocast turned off, so they behave
the same under bfloat16 or float16 mixed precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from falcon_rl.models.base import ModelError

IGNORE_INDEX = -100
"""Label of tokens that the MLM loss skips, as in ``torch.nn.CrossEntropyLoss``."""

# Similarities are clamped to this magnitude before the softmax, so +-inf become finite.
_SIM_LIMIT = 1e4


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids that MLM masking never selects.

    :param pad: id of ``[PAD]``
    :param cls: id of ``[CLS]``
    :param sep: id of ``[SEP]``
    :param mask: id of ``[MASK]``, also the replacement for 80% of the masked tokens
    """

    pad: int
    cls: int
    sep: int
    mask: int

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        """Return the four ids as an int64 tensor."""
        return torch.tensor([self.pad, self.cls, self.sep, self.mask], device=device)


@dataclass
class ITMNegatives:
    """In-batch hard negatives for ITM, as batch positions.

    :param text_for_image: int64 ``[B]``, the caption paired with image i as its negative,
        -1 where image i has none
    :param image_for_text: int64 ``[B]``, the image paired with caption i as its negative,
        -1 where caption i has none
    :param image_has_negative: bool ``[B]``
    :param text_has_negative: bool ``[B]``
    """

    text_for_image: torch.Tensor
    image_for_text: torch.Tensor
    image_has_negative: torch.Tensor
    text_has_negative: torch.Tensor


def _no_autocast(tensor: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def positive_mask(image_ids: torch.Tensor) -> torch.Tensor:
    """Return the bool ``[B, B]`` matrix that is True where two pairs share an image_id."""
    if image_ids.dim() != 1:
        raise ModelError(f"image_ids must be a 1-D tensor, got shape {tuple(image_ids.shape)}")
    return image_ids[:, None] == image_ids[None, :]


def itc_loss(
    image_embed: torch.Tensor,
    text_embed: torch.Tensor,
    image_ids: torch.Tensor,
    temperature: torch.Tensor | float,
) -> torch.Tensor:
    """Compute the symmetric InfoNCE image-text contrastive loss.

    Pairs that share an image_id are positives of each other: the target of each row is
    uniform over its positives, as in ALBEF's soft targets without momentum distillation.

    :param image_embed: L2-normalised image embeddings ``[B, d]``
    :param text_embed: L2-normalised text embeddings ``[B, d]``
    :param image_ids: int64 ``[B]``
    :param temperature: softmax temperature (scalar tensor or float)
    :return: float32 scalar, the mean of the image-to-text and text-to-image losses
    """
    if image_embed.shape != text_embed.shape or image_embed.shape[0] != image_ids.shape[0]:
        raise ModelError(
            f"itc_loss needs image_embed and text_embed of equal shape [B, d] and B image_ids, "
            f"got {tuple(image_embed.shape)}, {tuple(text_embed.shape)}, {tuple(image_ids.shape)}"
        )
    with _no_autocast(image_embed):
        logits = image_embed.float() @ text_embed.float().t()
        if isinstance(temperature, torch.Tensor):
            logits = logits / temperature.float()
        else:
            logits = logits / float(temperature)
        positives = positive_mask(image_ids).float()
        targets = positives / positives.sum(dim=1, keepdim=True)

        # The positive matrix is symmetric, so the same targets serve both directions.
        loss_i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
        return (loss_i2t + loss_t2i) / 2


def _draw_negatives(
    sim: torch.Tensor, same_image: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one column per row with probability softmax(sim) over the other-image columns."""
    scores = torch.nan_to_num(sim.detach().float(), nan=0.0, posinf=_SIM_LIMIT, neginf=-_SIM_LIMIT)
    candidates = ~same_image
    has_candidate = candidates.any(dim=1)
    weights = torch.softmax(scores.masked_fill(same_image, float("-inf")), dim=1)
    weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0) * candidates

    # A row whose weights all vanished still has candidates: draw uniformly among them.
    # A row without candidates gets placeholder weights and is marked as having no negative.
    degenerate = ~(weights.sum(dim=1) > 0)
    weights = torch.where(degenerate[:, None], candidates.float(), weights)
    weights[~has_candidate] = 1.0

    sample_device = generator.device if generator is not None else weights.device
    drawn = torch.multinomial(weights.to(sample_device), 1, generator=generator).squeeze(1)
    drawn = drawn.to(sim.device)
    return torch.where(has_candidate, drawn, torch.full_like(drawn, -1)), has_candidate


def sample_itm_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    image_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> ITMNegatives:
    """Sample ALBEF's in-batch hard negatives for ITM from the ITC similarities.

    Each image draws a negative caption with probability softmax(sim_i2t row), and each
    caption draws a negative image the same way. Pairs that share the anchor's image_id are
    never drawn. Weights are computed in float32, and NaN or infinite similarities fall
    back to a uniform draw among the allowed pairs. When every pair in the batch shows the
    same image, no negative exists and the row is marked invalid in the returned masks.

    :param sim_i2t: image-to-text similarities ``[B, B]`` (any float dtype)
    :param sim_t2i: text-to-image similarities ``[B, B]``
    :param image_ids: int64 ``[B]``
    :param generator: random generator; its device is used for the draw
    :return: the sampled negatives and their validity masks
    """
    batch_size = image_ids.shape[0]
    expected = (batch_size, batch_size)
    if tuple(sim_i2t.shape) != expected or tuple(sim_t2i.shape) != expected:
        raise ModelError(
            f"sample_itm_negatives needs [B, B] similarities for B={batch_size} image_ids, "
            f"got {tuple(sim_i2t.shape)} and {tuple(sim_t2i.shape)}"
        )
    same_image = positive_mask(image_ids.to(sim_i2t.device))
    text_for_image, image_has_negative = _draw_negatives(sim_i2t, same_image, generator)
    image_for_text, text_has_negative = _draw_negatives(sim_t2i, same_image, generator)
    return ITMNegatives(text_for_image, image_for_text, image_has_negative, text_has_negative)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Compute the image-text matching cross-entropy in float32.

    :param logits: ``[N, 2]``, class 1 meaning "match"
    :param labels: int64 ``[N]`` of 0 or 1
    :return: float32 scalar; zero (still attached to ``logits``) when N is 0
    """
    with _no_autocast(logits):
        logits = logits.float()
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Compute the masked-language-modelling cross-entropy in float32.

    :param logits: ``[..., V]``
    :param labels: int64 ``[...]``, ``IGNORE_INDEX`` (-100) where no prediction is scored
    :return: float32 scalar; zero (still attached to ``logits``) when no label is scored
    """
    with _no_autocast(logits):
        logits = logits.float().reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
        if not bool((labels != IGNORE_INDEX).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: SpecialTokenIds,
    vocab_size: int,
    probability: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose MLM targets and corrupt them the BERT way (80% [MASK], 10% random, 10% kept).

    Padding and the special tokens are never chosen. A row with at least one eligible token
    always gets at least one target, so every caption contributes to the loss.

    :param input_ids: int64 ``[B, L]``
    :param attention_mask: ``[B, L]``, 1 for real tokens
    :param special_ids: ids that are never chosen
    :param vocab_size: random replacements are drawn from ``[0, vocab_size)``, as BERT does
    :param probability: chance that an eligible token becomes a target, in [0, 1]
    :param generator: random generator; its device is used for every draw
    :return: corrupted ``input_ids`` and ``labels`` (original id at targets, -100 elsewhere)
    """
    if not 0.0 <= probability <= 1.0:
        raise ModelError(f"MLM mask probability must be in [0, 1], got {probability}")
    shape, device = input_ids.shape, input_ids.device
    draw_device = generator.device if generator is not None else device

    # Draw every random tensor first and in a fixed order, so a seed fixes the whole mask.
    chosen_draw = torch.rand(shape, generator=generator, device=draw_device).to(device)
    fallback_draw = torch.rand(shape, generator=generator, device=draw_device).to(device)
    action_draw = torch.rand(shape, generator=generator, device=draw_device).to(device)
    random_tokens = torch.randint(
        vocab_size, shape, generator=generator, device=draw_device
    ).to(device)

    eligible = attention_mask.bool() & ~torch.isin(input_ids, special_ids.as_tensor(device))
    chosen = (chosen_draw < probability) & eligible
    needs_one = eligible.any(dim=1) & ~chosen.any(dim=1)
    fallback = fallback_draw.masked_fill(~eligible, -1.0).argmax(dim=1)
    chosen[needs_one, fallback[needs_one]] = True

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    masked_ids = input_ids.clone()
    masked_ids[chosen & (action_draw < 0.8)] = special_ids.mask
    use_random = chosen & (action_draw >= 0.8) & (action_draw < 0.9)
    masked_ids[use_random] = random_tokens[use_random]
    return masked_ids, labels


# ---- BLIP-2 and SigLIP ---------------------------------------------------------------


def seeded_generator(mask_seed: int, stream: int) -> torch.Generator:
    """Return a CPU generator for one random stream of ``mask_seed``, identical on every device.

    Streams with different numbers are independent, so one step's MLM mask and ITM negatives
    can each be replayed on their own.
    """
    seed = np.random.SeedSequence([mask_seed % 2**64, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(seed))


def itc_loss_from_logits(logits: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Compute the symmetric InfoNCE loss of image-to-text logits ``[B, B]``.

    The targets are those of :func:`itc_loss`: uniform over the pairs that share the row's
    image_id. Use this form when the logits are not a plain dot product, as with BLIP-2's
    maximum over query similarities.

    :param logits: image-to-text logits ``[B, B]``, already divided by the temperature
    :param image_ids: int64 ``[B]``
    :return: float32 scalar, the mean of the image-to-text and text-to-image losses
    """
    batch_size = image_ids.shape[0]
    if tuple(logits.shape) != (batch_size, batch_size):
        raise ModelError(
            f"itc_loss_from_logits needs [B, B] logits for B={batch_size} image_ids, "
            f"got {tuple(logits.shape)}"
        )
    with _no_autocast(logits):
        logits = logits.float()
        positives = positive_mask(image_ids.to(logits.device)).float()
        targets = positives / positives.sum(dim=1, keepdim=True)
        loss_i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
        return (loss_i2t + loss_t2i) / 2


def max_query_similarity(query_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Compute BLIP-2's image-text similarity: the maximum over an image's query embeddings.

    :param query_embed: L2-normalised query embeddings ``[N_images, Q, d]``
    :param text_embed: L2-normalised text embeddings ``[N_texts, d]``
    :return: float32 ``[N_images, N_texts]``, entry (i, j) the largest cosine between a
        query of image i and caption j
    """
    if query_embed.dim() != 3 or text_embed.dim() != 2 or query_embed.shape[2] != text_embed.shape[1]:
        raise ModelError(
            f"max_query_similarity needs query_embed [N, Q, d] and text_embed [M, d], "
            f"got {tuple(query_embed.shape)} and {tuple(text_embed.shape)}"
        )
    with _no_autocast(query_embed):
        similarity = torch.einsum("iqd,td->iqt", query_embed.float(), text_embed.float())
        return similarity.max(dim=1).values


def causal_lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return next-token labels ``[B, L]``: position t is labelled with token t + 1.

    Positions whose next token is padding, and the last position, get ``IGNORE_INDEX``.

    :param input_ids: int64 ``[B, L]``
    :param attention_mask: ``[B, L]``, 1 for real tokens
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    next_is_real = attention_mask[:, 1:].bool()
    labels[:, :-1] = torch.where(next_is_real, input_ids[:, 1:], labels[:, :-1])
    return labels


def itg_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Compute the image-grounded text generation (causal language modelling) loss in float32.

    :param logits: ``[..., V]`` next-token logits
    :param labels: int64 ``[...]``, ``IGNORE_INDEX`` (-100) where no token is predicted
    :param label_smoothing: share of the target mass spread uniformly over the vocabulary
        (BLIP-2 uses 0.1)
    :return: float32 scalar; zero (still attached to ``logits``) when no label is scored
    """
    with _no_autocast(logits):
        logits = logits.float().reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
        if not bool((labels != IGNORE_INDEX).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
        )


def sigmoid_loss(
    image_embed: torch.Tensor,
    text_embed: torch.Tensor,
    image_ids: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """Compute SigLIP's pairwise sigmoid loss (Zhai et al., ICCV 2023, arXiv 2303.15343).

    Every image-caption pair of the batch is a binary problem with logit
    ``exp(logit_scale) * cos + logit_bias`` and label +1 when the two share an image_id,
    -1 otherwise. The loss is the sum of ``-log sigmoid(label * logit)`` over all B * B
    pairs divided by B, as in the paper.

    :param image_embed: L2-normalised image embeddings ``[B, d]``
    :param text_embed: L2-normalised text embeddings ``[B, d]``
    :param image_ids: int64 ``[B]``
    :param logit_scale: log of the temperature t (the paper's t'), scalar tensor or float
    :param logit_bias: the bias b, scalar tensor or float
    :return: float32 scalar
    """
    if image_embed.shape != text_embed.shape or image_embed.shape[0] != image_ids.shape[0]:
        raise ModelError(
            f"sigmoid_loss needs image_embed and text_embed of equal shape [B, d] and B "
            f"image_ids, got {tuple(image_embed.shape)}, {tuple(text_embed.shape)}, "
            f"{tuple(image_ids.shape)}"
        )
    with _no_autocast(image_embed):
        scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=image_embed.device)
        bias = torch.as_tensor(logit_bias, dtype=torch.float32, device=image_embed.device)
        logits = image_embed.float() @ text_embed.float().t() * scale.exp() + bias
        labels = 2.0 * positive_mask(image_ids.to(logits.device)).float() - 1.0
        return -F.logsigmoid(labels * logits).sum() / image_ids.shape[0]
