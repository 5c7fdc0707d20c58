"""The framework interface that every vision-language pretraining model implements."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from falcon_rl.models.text_cache import FrozenPrefixCache


class ModelError(ValueError):
    """A model name, preset, configuration value or weights path that cannot be used."""


@dataclass
class TextBatch:
    """Tokenised captions.

    :param input_ids: token ids, int64 ``[B, L]``
    :param attention_mask: 1 for real tokens and 0 for padding, int64 ``[B, L]``
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> TextBatch:
        """Return a copy with both tensors on ``device``."""
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class StepOutput:
    """Result of one training step.

    :param loss: scalar that is back-propagated, the weighted sum of ``losses``
    :param losses: detached scalar loss terms by name (``"itc"``, ``"itm"``, ``"mlm"``)
    :param image_embed: detached, L2-normalised ITC image embeddings ``[B, d]``, float32
    :param text_embed: detached, L2-normalised ITC embeddings ``[B, d]`` of the unmasked
        captions, float32
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    image_embed: torch.Tensor
    text_embed: torch.Tensor


class VLPFramework(nn.Module, abc.ABC):
    """Base class of the vision-language pretraining frameworks (ALBEF, later BLIP-2, SigLIP).

    ``image_ids`` arguments are int64 ``[B]``: pairs with equal ids show the same image, so
    they are positives of each other. ``mask_seed`` fixes every random choice of a step
    (MLM mask, ITM negatives), so a proxy loss recomputed after the update uses the same
    masked tokens.
    """

    name: str
    has_itm: bool
    embed_dim: int
    image_size: int
    max_text_length: int
    tokenizer_path: str
    # Output of the frozen text layers per caption; frameworks without frozen text layers have none.
    text_cache: FrozenPrefixCache | None = None

    @property
    def device(self) -> torch.device:
        """Device of the first parameter."""
        return next(self.parameters()).device

    @abc.abstractmethod
    def preprocess_images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Convert uint8 images ``[B, 3, H, W]`` to normalised float pixels on the model's device."""

    @abc.abstractmethod
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised ITC image embeddings ``[B, embed_dim]``."""

    @abc.abstractmethod
    def embed_texts(self, text: TextBatch) -> torch.Tensor:
        """Return L2-normalised ITC text embeddings ``[B, embed_dim]``."""

    @abc.abstractmethod
    def training_step(
        self, images: torch.Tensor, text: TextBatch, image_ids: torch.Tensor, mask_seed: int
    ) -> StepOutput:
        """Compute the pretraining losses of one batch, with gradients."""

    @abc.abstractmethod
    def proxy_loss(
        self,
        name: str,
        images: torch.Tensor,
        text: TextBatch,
        image_ids: torch.Tensor,
        mask_seed: int,
    ) -> torch.Tensor:
        """Evaluate one loss term (``"mlm"``, ``"itc"`` or ``"itm"``) without gradients."""

    @abc.abstractmethod
    def itm_match_prob(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Return the ITM probability ``[B]`` that image i and caption i match."""

    def cache_texts(self, text: TextBatch) -> None:
        """Keep the frozen text layers' output for these captions, when ``text_cache`` is set.

        ALBEF and SigLIP set it when their lowest text layers are frozen, because that output
        never changes.
        """
        if self.text_cache is not None:
            text = text.to(self.device)
            self.text_cache.fill(text.input_ids, text.attention_mask)

    def retrieval_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the image features that :meth:`retrieval_similarity` compares with captions.

        The default is :meth:`embed_images`. A framework whose ITC similarity is not one dot
        product returns what that similarity needs: BLIP-2 returns every query embedding.
        """
        return self.embed_images(images)

    def retrieval_similarity(
        self, image_features: torch.Tensor, text_embed: torch.Tensor
    ) -> torch.Tensor:
        """Return the ITC similarities ``[N_images, N_texts]`` that rank retrieval.

        :param image_features: rows of :meth:`retrieval_image_features`
        :param text_embed: rows of :meth:`embed_texts`
        """
        return image_features.float() @ text_embed.float().T


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Return one vector per caption ``[B, H]``: the first token's output for ``"cls"``, or
    for ``"mean"`` the mean over the tokens that ``attention_mask`` marks."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_pixels(
    images_uint8: torch.Tensor, image_size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Convert uint8 images ``[B, 3, H, W]`` to float32 pixels normalised by ``mean`` and ``std``.

    Images of another size are resized (bilinear, antialiased) to ``image_size``. The result
    is on the device of ``mean``.

    :param mean: per-channel mean ``[1, 3, 1, 1]`` of pixels scaled to [0, 1]
    :param std: per-channel standard deviation ``[1, 3, 1, 1]``
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ModelError(
            f"preprocess_images needs uint8 images [B, 3, H, W], got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}"
        )
    pixels = images_uint8.to(mean.device).float() / 255.0
    if tuple(pixels.shape[-2:]) != (image_size, image_size):
        pixels = F.interpolate(
            pixels, size=(image_size, image_size), mode="bilinear", antialias=True,
            align_corners=False,
        )
    return (pixels - mean) / std


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Switch ``module`` to eval mode (no dropout) and restore every submodule's mode after."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training
