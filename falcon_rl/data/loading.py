"""Entry point that loads the train, val and test splits of any supported dataset layout."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from falcon_rl.data.albef_json import load_albef_json
from falcon_rl.data.flickr8k import TEXT_FOLDER, load_flickr8k
from falcon_rl.data.images import validate_image_size
from falcon_rl.data.pairs import DataError, ImageTextPairs
from falcon_rl.data.report import DataReport

logger = logging.getLogger(__name__)

# The Flickr8k subset shipped inside the package (train/val/test: 1000/200/200 images at
# 64 x 64 pixels), built by scripts/build_embedded_dataset.py.
EMBEDDED_DATASET = Path(__file__).resolve().parent / "flickr8k_mini"

LAYOUTS = (
    "Flickr8k's layout (a Flickr8k_text/ folder beside Flicker8k_Dataset/) or "
    "ALBEF/BLIP JSON annotations (train.json, val.json and test.json)"
)


def load_splits(
    path: str | os.PathLike[str] | None,
    image_root: str | os.PathLike[str] | None = None,
    image_size: int = 64,
    progress: bool = True,
) -> dict[str, ImageTextPairs]:
    """Load the ``train``, ``val`` and ``test`` splits of a dataset folder.

    Skipped and converted inputs are counted in each split's ``report`` and logged once
    per kind.

    :param path: dataset folder in Flickr8k's layout (contains ``Flickr8k_text/``) or of
        ALBEF / BLIP JSON files (contains ``train.json``); ``None`` loads the embedded
        Flickr8k subset.
    :param image_root: folder of the image files; ``None`` means the format's default
        (``Flicker8k_Dataset/`` for Flickr8k, the JSON folder for JSON).
    :param image_size: side of the square decoded images, in pixels.
    :param progress: show progress bars while decoding (only when stderr is a terminal).
    :return: ``{"train": ..., "val": ..., "test": ...}``.
    :raises DataError: when the path is not found or not a dataset folder, a required file
        is missing or invalid, or a split has no usable pair.
    """
    validate_image_size(image_size)
    folder = find_dataset_folder(path)
    images = None if image_root is None else Path(image_root).expanduser()

    if (folder / TEXT_FOLDER).is_dir():
        splits, shared = load_flickr8k(folder, images, image_size, progress)
        shared.log(logger, str(folder / TEXT_FOLDER))
    elif (folder / "train.json").is_file():
        splits, shared = load_albef_json(folder, images, image_size, progress)
    else:
        raise DataError(f"{folder} is not a dataset folder: expected {LAYOUTS}")

    for split, pairs in splits.items():
        split_report = DataReport(pairs.report - shared)
        split_report.log(logger, split)
        if pairs.n_pairs == 0:
            raise DataError(
                f"{split}: no usable image-caption pairs in {folder}; "
                "the counts of skipped inputs are logged above"
            )
        logger.info(
            "%s: %d pairs of %d images%s",
            split,
            pairs.n_pairs,
            pairs.n_images,
            "" if pairs.human_matches is None else f", {len(pairs.human_matches)} human-judged matches",
        )
    return splits


def find_dataset_folder(path: str | os.PathLike[str] | None) -> Path:
    """Return the dataset folder for ``path``, raising DataError when it does not exist."""
    if path is None:
        if not EMBEDDED_DATASET.is_dir():
            raise DataError(
                f"embedded dataset not found: {EMBEDDED_DATASET}; reinstall falcon-rl "
                "or pass the path of a dataset folder"
            )
        return EMBEDDED_DATASET
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"data path not found: {folder}; expected a folder in {LAYOUTS}")
    return folder
