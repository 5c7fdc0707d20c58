"""Datasets of image-caption pairs: loading, image decoding and caption tokenization."""

from falcon_rl.data.loading import EMBEDDED_DATASET, load_splits
from falcon_rl.data.pairs import DataError, ImageTextPairs
from falcon_rl.data.report import DataReport
from falcon_rl.data.tokenizer import caption_normal_form, load_tokenizer, tokenize

__all__ = [
    "EMBEDDED_DATASET",
    "DataError",
    "DataReport",
    "ImageTextPairs",
    "caption_normal_form",
    "load_splits",
    "load_tokenizer",
    "tokenize",
]
