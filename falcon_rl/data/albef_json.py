"""Reader for ALBEF / BLIP JSON annotations (also used for COCO and Flickr30k Karpathy splits).

A folder contains ``train.json``, ``val.json`` and ``test.json``. Each is a list of entries
``{"image": path, "caption": text or [texts], "image_id": any}``. A list of captions gives
one pair per caption. Entries with equal ``image_id`` share one image. Where ``image_id``
is absent (ALBEF's val and test files), the image path identifies the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from falcon_rl.data.assemble import Caption, assemble_pairs
from falcon_rl.data.pairs import DataError, ImageTextPairs
from falcon_rl.data.report import DataReport

SPLIT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}


def load_albef_json(
    folder: Path,
    image_root: Path | None,
    image_size: int,
    progress: bool = True,
) -> tuple[dict[str, ImageTextPairs], DataReport]:
    """Load the train, val and test splits of a folder of ALBEF / BLIP JSON files.

    :param folder: folder that contains ``train.json``, ``val.json`` and ``test.json``.
    :param image_root: folder that relative image paths resolve against; ``None`` means
        ``folder``.
    :param image_size: side of the square decoded images, in pixels.
    :param progress: show progress bars while decoding.
    :return: the splits (``human_matches`` is ``None``), and an empty shared report
        because every problem belongs to one split's file.
    """
    root = folder if image_root is None else image_root
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")

    splits = {}
    for split, file_name in SPLIT_FILES.items():
        report = DataReport()
        entries = read_entries(folder / file_name)
        names, captions = group_captions(entries, report)
        paths = [Path(name) if Path(name).is_absolute() else root / name for name in names]
        splits[split] = assemble_pairs(split, names, paths, captions, image_size, progress, report)
    return splits, DataReport()


def read_entries(path: Path) -> list[Any]:
    """Read the top-level list of a JSON annotation file, raising DataError if there is none."""
    if not path.is_file():
        raise DataError(f"JSON annotation file not found: {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"invalid JSON annotation file {path}: {error}") from error
    if not isinstance(entries, list):
        raise DataError(
            f"invalid JSON annotation file {path}: expected a list of entries, "
            f"got {type(entries).__name__}"
        )
    return entries


def group_captions(entries: list[Any], report: DataReport) -> tuple[list[str], list[list[Caption]]]:
    """Group the captions of the entries by image.

    :return: the image path of each image in order of first appearance, and the captions
        of each image with keys ``"<image path>#<n>"``, n counting from 0 per image.
    """
    index_of: dict[str, int] = {}
    names: list[str] = []
    captions: list[list[Caption]] = []
    for entry in entries:
        parsed = parse_entry(entry, report)
        if parsed is None:
            continue
        image, identity, texts = parsed

        if identity not in index_of:
            index_of[identity] = len(names)
            names.append(image)
            captions.append([])
        index = index_of[identity]
        if names[index] != image:
            report["json_image_path_conflict"] += 1

        for text in texts:
            captions[index].append((f"{names[index]}#{len(captions[index])}", text))
    return names, captions


def parse_entry(entry: Any, report: DataReport) -> tuple[str, str, list[str]] | None:
    """Return (image path, image identity, captions) of one entry, or ``None`` if malformed.

    Captions that are empty or not strings are dropped and counted, so an entry may return
    no captions at all.
    """
    if not isinstance(entry, dict):
        report["json_entry_malformed"] += 1
        return None
    image = entry.get("image")
    caption = entry.get("caption")
    if not isinstance(image, str) or not image.strip() or not isinstance(caption, (str, list)):
        report["json_entry_malformed"] += 1
        return None

    texts = []
    for text in [caption] if isinstance(caption, str) else caption:
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
        else:
            report["json_caption_empty"] += 1

    if "image_id" in entry:
        identity = "id:" + json.dumps(entry["image_id"], sort_keys=True)
    else:
        identity = "path:" + image
    return image, identity, texts
