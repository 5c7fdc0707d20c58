"""ALBEF: align before fuse (Li et al., NeurIPS 2021, arXiv 2107.07651).

ITC aligns the [CLS] embeddings of an image encoder and a text encoder. A fusion encoder
with cross-attention to the image tokens is trained by MLM and by ITM, whose in-batch hard
negatives are drawn from the ITC similarities.

NOTE: the momentum encoder, momentum distillation and the ITC feature queue of the original
are not implemented, so ITC contrasts in-batch pairs only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

from falcon_rl.models.base import ModelError, StepOutput, TextBatch, VLPFramework, pool_text
from falcon_rl.models.config import ALBEFConfig
from falcon_rl.models.fusion import FusionEncoder
from falcon_rl.models.heads import MLMHead, init_bert_style
from falcon_rl.models.image_encoders import build_image_encoder
from falcon_rl.models.losses import (
    IGNORE_INDEX,
    SpecialTokenIds,
    itc_loss,
    itm_loss,
    mask_tokens,
    mlm_loss,
    sample_itm_negatives,
)
from falcon_rl.models.pretrained import OFFLINE_MINILM, load_pretrained, resolve_name_or_path
from falcon_rl.models.text_cache import frozen_prefix_cache
from falcon_rl.models.text_encoders import build_text_encoder, freeze_lower_layers

logger = logging.getLogger(__name__)

PROXY_LOSSES = ("mlm", "itc", "itm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEMPERATURE_RANGE = (0.001, 0.5)

# Independent random streams derived from one mask_seed.
_MLM_STREAM = 0
_ITM_STREAM = 1


def _seeded_generator(mask_seed: int, stream: int) -> torch.Generator:
    """Return a CPU generator for one stream of ``mask_seed``, identical on every device."""
    seed = np.random.SeedSequence([mask_seed % 2**64, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(seed))


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Switch ``module`` to eval mode (no dropout) and restore every submodule's mode after."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


class ALBEF(VLPFramework):
    """ALBEF with ITC, ITM on in-batch hard negatives, and MLM.

    :param config: validated settings; build one with
        :func:`falcon_rl.models.factory.build_framework` to start from a preset
    """

    name = "albef"
    has_itm = True

    def __init__(self, config: ALBEFConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_dim = config.embed_dim
        self.image_size = config.image_size
        self.max_text_length = config.max_text_length
        self.tokenizer_path = resolve_name_or_path(
            config.tokenizer or config.text_pretrained or OFFLINE_MINILM
        )
        # Name the setting the user gave, so a load error points at the right one.
        tokenizer_field = "text_pretrained" if config.tokenizer is None else "tokenizer"
        tokenizer = load_pretrained(AutoTokenizer, self.tokenizer_path, tokenizer_field)
        self.special_ids = SpecialTokenIds(
            tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id,
        )

        self.image_encoder = build_image_encoder(
            config.image_encoder, config.image_size, config.image_pretrained, config.image_width,
            config.image_layers, config.image_heads, config.image_patch_size, config.dropout,
        )
        self.text_encoder = build_text_encoder(
            config.text_pretrained, config.text_hidden, config.text_layers, config.text_heads,
            config.dropout, vocab_size=len(tokenizer),
        )
        self.vocab_size = self.text_encoder.get_input_embeddings().num_embeddings
        self._check_vocabulary(len(tokenizer))
        freeze_lower_layers(self.text_encoder, config.text_frozen_layers)
        self.text_cache = frozen_prefix_cache(self, self.text_encoder, config.text_frozen_layers)
        self._build_heads(int(self.text_encoder.config.hidden_size))

        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def _check_vocabulary(self, tokenizer_size: int) -> None:
        if self.vocab_size < tokenizer_size:
            raise ModelError(
                f"tokenizer {self.tokenizer_path!r} has {tokenizer_size} tokens but the text "
                f"encoder embeds only {self.vocab_size}; set tokenizer to the text encoder's"
            )

    def _build_heads(self, text_width: int) -> None:
        config = self.config
        if text_width % config.fusion_heads != 0:
            raise ModelError(
                f"fusion_heads={config.fusion_heads} does not divide the text width "
                f"{text_width}; allowed values: divisors of {text_width}"
            )
        self.fusion = FusionEncoder(
            text_width, self.image_encoder.width, config.fusion_layers, config.fusion_heads,
            dropout=config.dropout, pre_norm=config.fusion_norm == "pre",
        )
        self.vision_proj = nn.Linear(self.image_encoder.width, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature)))
        self.itm_head = nn.Linear(text_width, 2)
        self.mlm_head = MLMHead(text_width, self.text_encoder.get_input_embeddings())
        # The MLM decoder weight belongs to the text encoder, so only the transform is reset.
        for module in (self.fusion, self.vision_proj, self.text_proj, self.itm_head,
                       self.mlm_head.transform):
            module.apply(init_bert_style)

    # ---- inputs -----------------------------------------------------------------------

    def preprocess_images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Convert uint8 images ``[B, 3, H, W]`` to ImageNet-normalised float32 pixels.

        Images of another size are resized (bilinear, antialiased) to ``image_size``.
        """
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
            raise ModelError(
                f"preprocess_images needs uint8 images [B, 3, H, W], got {images_uint8.dtype} "
                f"{tuple(images_uint8.shape)}"
            )
        pixels = images_uint8.to(self.pixel_mean.device).float() / 255.0
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bilinear",
                antialias=True, align_corners=False,
            )
        return (pixels - self.pixel_mean) / self.pixel_std

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return self.preprocess_images(images)
        return images.to(self.pixel_mean.device)

    def _text(self, text: TextBatch) -> TextBatch:
        """Move ``text`` to the model's device and drop trailing columns that no row uses."""
        text = text.to(self.pixel_mean.device)
        used_columns = text.attention_mask.bool().any(dim=0).nonzero()
        length = int(used_columns.max()) + 1 if used_columns.numel() > 0 else 1
        return TextBatch(text.input_ids[:, :length], text.attention_mask[:, :length])

    # ---- encoders -----------------------------------------------------------------------

    def _encode_text(self, text: TextBatch, remember: bool = True) -> torch.Tensor:
        if self.text_cache is not None:
            return self.text_cache.encode(text.input_ids, text.attention_mask, remember)
        output = self.text_encoder(input_ids=text.input_ids, attention_mask=text.attention_mask)
        return output.last_hidden_state

    def _image_embedding(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_tokens[:, 0]).float(), dim=-1)

    def _text_embedding(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = pool_text(text_hidden, attention_mask, self.config.text_pooling)
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised ITC image embeddings ``[B, embed_dim]`` (float32).

        ``images`` are preprocessed pixels or uint8 images, which are preprocessed here.
        """
        return self._image_embedding(self.image_encoder(self._pixels(images)))

    def embed_texts(self, text: TextBatch) -> torch.Tensor:
        """Return L2-normalised ITC text embeddings ``[B, embed_dim]`` (float32)."""
        text = self._text(text)
        return self._text_embedding(self._encode_text(text), text.attention_mask)

    def _itm_logits(
        self, text_hidden: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        return self.itm_head(self.fusion(text_hidden, attention_mask, image_tokens)[:, 0])

    # ---- losses -------------------------------------------------------------------------

    def _itm_loss(
        self,
        image_tokens: torch.Tensor,
        image_embed: torch.Tensor,
        text_hidden: torch.Tensor,
        text_embed: torch.Tensor,
        text: TextBatch,
        image_ids: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """ITM on the B aligned pairs plus, where one exists, a hard negative caption per
        image and a hard negative image per caption."""
        with torch.no_grad():
            sim_i2t = image_embed @ text_embed.t() / self.temperature.float()
            negatives = sample_itm_negatives(sim_i2t, sim_i2t.t(), image_ids, generator)
        images_with = negatives.image_has_negative.nonzero().squeeze(1)
        texts_with = negatives.text_has_negative.nonzero().squeeze(1)
        negative_texts = negatives.text_for_image[images_with]
        negative_images = negatives.image_for_text[texts_with]

        fused_text = torch.cat([text_hidden, text_hidden[negative_texts], text_hidden[texts_with]])
        mask = text.attention_mask
        fused_mask = torch.cat([mask, mask[negative_texts], mask[texts_with]])
        fused_image = torch.cat(
            [image_tokens, image_tokens[images_with], image_tokens[negative_images]]
        )
        logits = self._itm_logits(fused_text, fused_mask, fused_image)

        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[: image_tokens.shape[0]] = 1
        return itm_loss(logits, labels)

    def _mlm_loss(
        self, image_tokens: torch.Tensor, text: TextBatch, generator: torch.Generator
    ) -> torch.Tensor:
        """MLM on the fused tokens; only target positions go through the vocabulary decoder."""
        masked_ids, labels = mask_tokens(
            text.input_ids, text.attention_mask, self.special_ids, self.vocab_size,
            self.config.mlm_probability, generator,
        )
        hidden = self._encode_text(TextBatch(masked_ids, text.attention_mask), remember=False)
        fused = self.fusion(hidden, text.attention_mask, image_tokens)
        targets = labels != IGNORE_INDEX
        return mlm_loss(self.mlm_head(fused[targets]), labels[targets])

    def _losses(
        self,
        names: Sequence[str],
        images: torch.Tensor,
        text: TextBatch,
        image_ids: torch.Tensor,
        mask_seed: int,
        need_embeddings: bool,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """Compute the loss terms in ``names``; return them with the ITC embeddings, which
        are None when neither ``need_embeddings`` nor ITC or ITM asked for them."""
        with torch.no_grad():
            self.temperature.clamp_(*TEMPERATURE_RANGE)
        text = self._text(text)
        image_ids = image_ids.to(self.pixel_mean.device)
        if image_ids.shape != (len(text),):
            raise ModelError(f"image_ids must have shape ({len(text)},), got {tuple(image_ids.shape)}")

        image_tokens = self.image_encoder(self._pixels(images))
        image_embed = text_hidden = text_embed = None
        if need_embeddings or "itc" in names or "itm" in names:
            image_embed = self._image_embedding(image_tokens)
            text_hidden = self._encode_text(text)
            text_embed = self._text_embedding(text_hidden, text.attention_mask)

        losses: dict[str, torch.Tensor] = {}
        if "itc" in names:
            losses["itc"] = itc_loss(image_embed, text_embed, image_ids, self.temperature)
        if "itm" in names:
            losses["itm"] = self._itm_loss(
                image_tokens, image_embed, text_hidden, text_embed, text, image_ids,
                _seeded_generator(mask_seed, _ITM_STREAM),
            )
        if "mlm" in names:
            losses["mlm"] = self._mlm_loss(
                image_tokens, text, _seeded_generator(mask_seed, _MLM_STREAM)
            )
        return losses, image_embed, text_embed

    # ---- public steps -------------------------------------------------------------------

    def training_step(
        self, images: torch.Tensor, text: TextBatch, image_ids: torch.Tensor, mask_seed: int
    ) -> StepOutput:
        """Compute the weighted ITC + ITM + MLM loss of one batch, with gradients.

        Loss terms whose weight is 0 are skipped and missing from ``losses``. The returned
        embeddings are those of the unmasked captions, ready for the embedding bank.

        :param images: preprocessed pixels ``[B, 3, S, S]`` or uint8 images
        :param text: tokenised captions ``[B, L]``
        :param image_ids: int64 ``[B]``, equal for pairs that show the same image
        :param mask_seed: fixes the MLM mask and the ITM negatives
        """
        weights = {
            "itc": self.config.itc_weight,
            "itm": self.config.itm_weight,
            "mlm": self.config.mlm_weight,
        }
        names = [name for name, weight in weights.items() if weight > 0]
        losses, image_embed, text_embed = self._losses(
            names, images, text, image_ids, mask_seed, need_embeddings=True
        )
        assert image_embed is not None and text_embed is not None
        loss = sum(weights[name] * value for name, value in losses.items())
        return StepOutput(
            loss=loss,
            losses={name: value.detach() for name, value in losses.items()},
            image_embed=image_embed.detach(),
            text_embed=text_embed.detach(),
        )

    def proxy_loss(
        self,
        name: str,
        images: torch.Tensor,
        text: TextBatch,
        image_ids: torch.Tensor,
        mask_seed: int,
    ) -> torch.Tensor:
        """Evaluate one loss term without gradients and without dropout.

        With the same ``mask_seed`` the MLM mask is identical across calls. The ITM negatives
        use the same random draws, but they are drawn from the current ITC similarities, so
        after an update a few rows may pick a different negative.

        :param name: ``"mlm"``, ``"itc"`` or ``"itm"``
        :return: float32 scalar
        """
        if name not in PROXY_LOSSES:
            raise ModelError(
                f"proxy loss {name!r} is unknown; allowed values: {', '.join(PROXY_LOSSES)}"
            )
        with torch.no_grad(), _eval_mode(self):
            losses, _, _ = self._losses(
                [name], images, text, image_ids, mask_seed, need_embeddings=False
            )
        return losses[name]

    def itm_match_prob(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Return ITM P(match) ``[B]`` (float32) of image i with caption i, without gradients."""
        with torch.no_grad(), _eval_mode(self):
            text = self._text(text)
            image_tokens = self.image_encoder(self._pixels(images))
            logits = self._itm_logits(self._encode_text(text), text.attention_mask, image_tokens)
            return torch.softmax(logits.float(), dim=-1)[:, 1]
