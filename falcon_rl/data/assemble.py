"""Assembly of decoded images and their captions into ImageTextPairs, shared by all formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from falcon_rl.data.images import decode_images
from falcon_rl.data.pairs import ImageTextPairs
from falcon_rl.data.report import DataReport

# One caption of an image: (caption key, caption text).
Caption = tuple[str, str]


def assemble_pairs(
    split: str,
    image_names: list[str],
    image_paths: list[Path],
    image_captions: list[list[Caption]],
    image_size: int,
    progress: bool,
    report: DataReport,
) -> ImageTextPairs:
    """Decode the images of one split and pair each kept image with its captions.

    Images whose file is missing or has no captions are skipped before decoding, and
    images that fail to decode after it; ``report`` counts each kind. Pairs keep the
    order of the images, then of each image's captions.

    :param split: split name stored in the result.
    :param image_names: name of each image as the annotations give it.
    :param image_paths: file of each image, in the same order.
    :param image_captions: the captions of each image, in the same order.
    :param image_size: side of the square decoded images, in pixels.
    :param progress: show a progress bar while decoding.
    :param report: counts to add the skipped and converted images to; it becomes the
        result's ``report``.
    :return: the pairs, with ``human_matches`` set to ``None``.
    """
    candidates = []
    for index, path in enumerate(image_paths):
        if not path.is_file():
            report["image_missing"] += 1
        elif not image_captions[index]:
            report["image_without_captions"] += 1
        else:
            candidates.append(index)

    images, kept, decode_report = decode_images(
        [image_paths[index] for index in candidates],
        image_size,
        progress=progress,
        description=f"{split} images",
    )
    report.update(decode_report)
    kept_indices = [index for index, keep in zip(candidates, kept) if keep]

    captions: list[str] = []
    caption_keys: list[str] = []
    image_ids: list[int] = []
    for image_id, index in enumerate(kept_indices):
        for key, text in image_captions[index]:
            caption_keys.append(key)
            captions.append(text)
            image_ids.append(image_id)

    return ImageTextPairs(
        split=split,
        images=images,
        image_names=[image_names[index] for index in kept_indices],
        captions=captions,
        caption_keys=caption_keys,
        image_ids=np.asarray(image_ids, dtype=np.int64),
        human_matches=None,
        report=report,
    )
