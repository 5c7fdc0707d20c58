"""Reader for Flickr8k in its original layout, with the CrowdFlower human judgments.

The corpus (Hodosh, Young and Hockenmaier, 2013, "Framing Image Description as a Ranking
Task", JAIR 47:853-899) is distributed as::

    Flicker8k_Dataset/<image>.jpg            (the archive spells the folder "Flicker")
    Flickr8k_text/Flickr8k.token.txt         "<image>.jpg#<n>\t<caption>", n in 0..4
    Flickr8k_text/Flickr_8k.trainImages.txt  one image file name per line
    Flickr8k_text/Flickr_8k.devImages.txt    (the validation split)
    Flickr8k_text/Flickr_8k.testImages.txt
    Flickr8k_text/CrowdFlowerAnnotations.txt optional: image, "<image>.jpg#<n>",
                                             share of yes, number of yes, number of no
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from falcon_rl.data.assemble import Caption, assemble_pairs
from falcon_rl.data.pairs import DataError, ImageTextPairs
from falcon_rl.data.report import DataReport
from falcon_rl.data.text_lines import read_text_lines

TEXT_FOLDER = "Flickr8k_text"
IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
JUDGMENT_FILE = "CrowdFlowerAnnotations.txt"

# Share of "yes" votes from which a CrowdFlower judgment counts as a match: two of the
# usual three workers. The file stores 2/3 rounded to 15 digits, hence the tolerance.
MATCH_SHARE = 2 / 3 - 1e-9


@dataclass(frozen=True)
class Judgment:
    """One CrowdFlower row: whether a caption describes an image.

    :param image: image file name.
    :param caption_key: ``"<image>.jpg#<n>"`` of the judged caption.
    :param yes_share: share of workers who answered yes, in [0, 1].
    :param n_yes: number of yes answers.
    :param n_no: number of no answers.
    """

    image: str
    caption_key: str
    yes_share: float
    n_yes: int
    n_no: int

    @property
    def is_match(self) -> bool:
        """Whether at least two thirds of the workers judged that the caption describes the image."""
        return self.yes_share >= MATCH_SHARE


def parse_caption_key(key: str) -> tuple[str, int] | None:
    """Split ``"<image>#<n>"`` into the image name and caption number; ``None`` if malformed."""
    image, separator, number = key.strip().rpartition("#")
    if not separator or not image or not number.isdigit():
        return None
    return image, int(number)


def read_captions(path: Path, report: DataReport) -> dict[str, dict[int, str]]:
    """Read a token file into {image name: {caption number: caption}}, counting bad lines."""
    captions: dict[str, dict[int, str]] = {}
    for line in read_text_lines(path, report, "token_line_not_utf8"):
        key, tab, text = line.partition("\t")
        parsed = parse_caption_key(key)
        if not tab or parsed is None:
            report["token_line_malformed"] += 1
            continue
        text = text.strip()
        if not text:
            report["token_caption_empty"] += 1
            continue
        image, number = parsed
        image_captions = captions.setdefault(image, {})
        if number in image_captions:
            report["token_caption_duplicate"] += 1
            continue
        image_captions[number] = text
    return captions


def read_split_list(path: Path, report: DataReport) -> list[str]:
    """Read the image names of a split list in file order, counting repeated names."""
    names: list[str] = []
    seen: set[str] = set()
    for line in read_text_lines(path, report, "split_line_not_utf8"):
        name = line.strip()
        if name in seen:
            report["image_listed_twice"] += 1
            continue
        seen.add(name)
        names.append(name)
    return names


def read_judgments(path: Path, report: DataReport) -> list[Judgment]:
    """Read CrowdFlower judgment rows, counting lines that are not valid rows."""
    judgments = []
    for line in read_text_lines(path, report, "judgment_line_not_utf8"):
        columns = line.split("\t")
        try:
            image, caption_key = columns[0].strip(), columns[1].strip()
            yes_share, n_yes, n_no = float(columns[2]), int(columns[3]), int(columns[4])
        except (IndexError, ValueError):
            report["judgment_line_malformed"] += 1
            continue
        valid = (
            len(columns) == 5
            and image
            and parse_caption_key(caption_key) is not None
            and 0.0 <= yes_share <= 1.0
            and n_yes >= 0
            and n_no >= 0
        )
        if not valid:
            report["judgment_line_malformed"] += 1
            continue
        judgments.append(Judgment(image, caption_key, yes_share, n_yes, n_no))
    return judgments


def find_human_matches(pairs: ImageTextPairs, judgments: list[Judgment]) -> np.ndarray:
    """Return the (image index, pair index) rows judged to match across images of one split.

    A row needs a judgment with a yes share of at least 2/3 whose caption belongs to another
    image, where both the image and the caption's pair are in ``pairs``. Rows are unique
    and sorted.
    """
    image_index = {name: index for index, name in enumerate(pairs.image_names)}
    pair_index = {key: index for index, key in enumerate(pairs.caption_keys)}
    rows = []
    for judgment in judgments:
        if not judgment.is_match:
            continue
        image = image_index.get(judgment.image)
        pair = pair_index.get(judgment.caption_key)
        if image is None or pair is None or pairs.image_ids[pair] == image:
            continue
        rows.append((image, pair))
    if not rows:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.asarray(rows, dtype=np.int64), axis=0)


def load_flickr8k(
    root: Path,
    image_root: Path | None,
    image_size: int,
    progress: bool = True,
) -> tuple[dict[str, ImageTextPairs], DataReport]:
    """Load the train, val and test splits of a folder in Flickr8k's layout.

    :param root: folder that contains ``Flickr8k_text/``.
    :param image_root: folder of the image files; ``None`` means ``root/Flicker8k_Dataset``
        (or ``root/Flickr8k_Dataset``).
    :param image_size: side of the square decoded images, in pixels.
    :param progress: show progress bars while decoding.
    :return: the splits, and the counts of problems in the shared caption and judgment
        files (already added to every split's report). When the judgment file exists, a
        split it does not cover (train and val in the original corpus) gets an empty
        ``human_matches`` array rather than ``None``.
    """
    text_folder = root / TEXT_FOLDER
    image_folder = find_image_folder(root, image_root)
    shared = DataReport()
    captions = read_captions(require_file(text_folder / TOKEN_FILE), shared)
    judgment_path = text_folder / JUDGMENT_FILE
    judgments = read_judgments(judgment_path, shared) if judgment_path.is_file() else None

    reports = {split: DataReport() for split in SPLIT_FILES}
    split_names = {
        split: read_split_list(require_file(text_folder / file_name), reports[split])
        for split, file_name in SPLIT_FILES.items()
    }
    listed = set().union(*split_names.values())
    shared["token_caption_ignored"] = sum(
        len(image_captions) for image, image_captions in captions.items() if image not in listed
    )

    splits = {}
    for split, names in split_names.items():
        image_captions: list[list[Caption]] = [
            [(f"{name}#{number}", text) for number, text in sorted(captions.get(name, {}).items())]
            for name in names
        ]
        pairs = assemble_pairs(
            split,
            names,
            [image_folder / name for name in names],
            image_captions,
            image_size,
            progress,
            reports[split],
        )
        if judgments is not None:
            pairs = dataclasses.replace(pairs, human_matches=find_human_matches(pairs, judgments))
        pairs.report.update(shared)
        splits[split] = pairs
    return splits, shared


def find_image_folder(root: Path, image_root: Path | None) -> Path:
    """Return the folder of the image files, raising DataError when there is none."""
    if image_root is not None:
        if not image_root.is_dir():
            raise DataError(f"image folder not found: {image_root}")
        return image_root
    for name in IMAGE_FOLDERS:
        if (root / name).is_dir():
            return root / name
    raise DataError(
        f"Flickr8k image folder not found: expected {root / IMAGE_FOLDERS[0]}; "
        "pass image_root to name another folder"
    )


def require_file(path: Path) -> Path:
    """Return ``path``, raising DataError when it is not a file."""
    if not path.is_file():
        raise DataError(f"Flickr8k file not found: {path}")
    return path
