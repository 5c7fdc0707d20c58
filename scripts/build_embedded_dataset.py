"""Build the small Flickr8k subset that falcon-rl ships as its default dataset.

Train and val images are drawn at random from the official split lists. Test images are
chosen first for their CrowdFlower judgments: a greedy pass adds the test image with the
most human-judged matches to captions of test images already chosen, so that
false-negative-aware metrics have matches to count. The output keeps Flickr8k's layout,
so the ordinary Flickr8k reader loads it.

Example (from the repository root, with falcon-rl installed)::

    python scripts/build_embedded_dataset.py --source ../shared/datasets/flickr8k \
        --output falcon_rl/data/flickr8k_mini --train 1000 --val 200 --test 200 \
        --size 64 --quality 85 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from falcon_rl.data import DataError, load_splits
from falcon_rl.data.flickr8k import (
    JUDGMENT_FILE,
    SPLIT_FILES,
    TEXT_FOLDER,
    TOKEN_FILE,
    Judgment,
    find_image_folder,
    parse_caption_key,
    read_captions,
    read_judgments,
    read_split_list,
    require_file,
)
from falcon_rl.data.images import to_rgb
from falcon_rl.data.report import DataReport

logger = logging.getLogger("build_embedded_dataset")

IMAGE_FOLDER = "Flicker8k_Dataset"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="Flickr8k folder in its original layout")
    parser.add_argument("--output", type=Path, required=True, help="folder to write the subset to")
    parser.add_argument("--train", type=int, default=1000, help="number of train images")
    parser.add_argument("--val", type=int, default=200, help="number of val images")
    parser.add_argument("--test", type=int, default=200, help="number of test images")
    parser.add_argument("--size", type=int, default=64, help="side of the square output images, in pixels")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality, 1 to 95")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random image choice")
    args = parser.parse_args(argv)
    for option in ("train", "val", "test", "size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    if not 1 <= args.quality <= 95:
        parser.error(f"--quality must be between 1 and 95, got {args.quality}")
    return args


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        source_images = find_image_folder(args.source, None)
        captions, judgments, selected = select_images(args, source_images)
    except DataError as error:
        logger.error("%s", error)
        return 1

    write_images(selected, source_images, args.output / IMAGE_FOLDER, args.size, args.quality)
    write_text_files(selected, captions, judgments, args.output / TEXT_FOLDER)
    splits = load_splits(args.output, image_size=args.size, progress=False)
    write_readme(args.output, splits, argv)
    logger.info("wrote %s (%.1f MB)", args.output, folder_size(args.output) / 1e6)
    return 0


def select_images(
    args: argparse.Namespace, source_images: Path
) -> tuple[dict[str, dict[int, str]], list[Judgment], dict[str, list[str]]]:
    """Read the source's text files and choose the images of each split.

    :return: the captions by image, the judgments (empty without a judgment file), and the
        chosen image names of each split in the order of its official list.
    """
    rng = np.random.default_rng(args.seed)
    text_folder = args.source / TEXT_FOLDER
    report = DataReport()
    captions = read_captions(require_file(text_folder / TOKEN_FILE), report)
    judgment_path = text_folder / JUDGMENT_FILE
    judgments = read_judgments(judgment_path, report) if judgment_path.is_file() else []

    counts = {"train": args.train, "val": args.val, "test": args.test}
    selected: dict[str, list[str]] = {}
    for split, file_name in SPLIT_FILES.items():
        listed = read_split_list(require_file(text_folder / file_name), report)
        eligible = [name for name in listed if name in captions and (source_images / name).is_file()]
        order = [eligible[index] for index in rng.permutation(len(eligible))]
        if split == "test":
            order = order_by_judged_matches(order, judgments)
        chosen = set(take_decodable(order, counts[split], source_images))
        selected[split] = [name for name in listed if name in chosen]
    return captions, judgments, selected


def order_by_judged_matches(names: list[str], judgments: list[Judgment]) -> list[str]:
    """Order images greedily by human-judged matches to captions of images placed earlier.

    Each step places the image with the most matches (in either direction) to the images
    already placed, ties broken by its matches to all images, then by the input order.
    Images without any match follow in input order.
    """
    position = {name: index for index, name in enumerate(names)}
    neighbours: dict[str, Counter] = {name: Counter() for name in names}
    for judgment in judgments:
        parsed = parse_caption_key(judgment.caption_key)
        if not judgment.is_match or parsed is None:
            continue
        other = parsed[0]
        if other != judgment.image and judgment.image in position and other in position:
            neighbours[judgment.image][other] += 1
            neighbours[other][judgment.image] += 1

    degree = {name: sum(counter.values()) for name, counter in neighbours.items()}
    gain = Counter()
    remaining = {name for name in names if degree[name] > 0}
    ordered = []
    while remaining:
        best = max(remaining, key=lambda name: (gain[name], degree[name], -position[name]))
        remaining.remove(best)
        ordered.append(best)
        for other, count in neighbours[best].items():
            gain[other] += count
    placed = set(ordered)
    return ordered + [name for name in names if name not in placed]


def take_decodable(names: list[str], count: int, image_folder: Path) -> list[str]:
    """Return the first ``count`` names whose image decodes, in order."""
    taken = []
    for name in names:
        if len(taken) == count:
            break
        try:
            with Image.open(image_folder / name) as image:
                image.load()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            logger.warning("skipped %s: the image does not decode", name)
            continue
        taken.append(name)
    if len(taken) < count:
        raise DataError(f"only {len(taken)} usable images for a request of {count}")
    return taken


def write_images(
    selected: dict[str, list[str]], source: Path, output: Path, size: int, quality: int
) -> None:
    """Write each selected image as a ``size`` x ``size`` RGB JPEG, resized bilinearly."""
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    names = [name for split_names in selected.values() for name in split_names]
    for name in tqdm(names, desc="writing images", unit="image"):
        with Image.open(source / name) as image:
            resized = to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
        resized.save(output / name, format="JPEG", quality=quality, optimize=True)


def write_text_files(
    selected: dict[str, list[str]],
    captions: dict[str, dict[int, str]],
    judgments: list[Judgment],
    output: Path,
) -> None:
    """Write the token file, split lists and judgments of the selected images."""
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)

    token_lines = []
    for split_names in selected.values():
        for name in split_names:
            for number, text in sorted(captions[name].items()):
                token_lines.append(f"{name}#{number}\t{text}\n")
    (output / TOKEN_FILE).write_text("".join(token_lines), encoding="utf-8")

    for split, file_name in SPLIT_FILES.items():
        (output / file_name).write_text("".join(name + "\n" for name in selected[split]), encoding="utf-8")

    test_images = set(selected["test"])
    judgment_lines = []
    for judgment in judgments:
        parsed = parse_caption_key(judgment.caption_key)
        if judgment.image in test_images and parsed is not None and parsed[0] in test_images:
            judgment_lines.append(
                f"{judgment.image}\t{judgment.caption_key}\t{judgment.yes_share:.15g}"
                f"\t{judgment.n_yes}\t{judgment.n_no}\n"
            )
    (output / JUDGMENT_FILE).write_text("".join(judgment_lines), encoding="utf-8")


def write_readme(output: Path, splits: dict, argv: list[str]) -> None:
    """Write README.md with the source, terms, build command and counts of the subset."""
    rows = []
    for split, pairs in splits.items():
        matches = "-" if pairs.human_matches is None else str(len(pairs.human_matches))
        rows.append(f"| {split} | {pairs.n_images} | {pairs.n_pairs} | {matches} |")
    command = shlex.join(["python", "scripts/build_embedded_dataset.py", *argv])
    image_size = int(splits["train"].images.shape[-1])
    text = README_TEMPLATE.format(
        command=command,
        rows="\n".join(rows),
        size=image_size,
        megabytes=folder_size(output) / 1e6,
    )
    (output / "README.md").write_text(text, encoding="utf-8")


def folder_size(folder: Path) -> int:
    """Return the total size of the files under ``folder``, in bytes."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


README_TEMPLATE = """\
# Flickr8k mini: the embedded default dataset

A small subset of Flickr8k that falcon-rl ships so that `load_splits(None, ...)`, the
tests and first runs work without a download. It keeps Flickr8k's original layout:
`Flicker8k_Dataset/` holds {size} x {size} JPEG images, and `Flickr8k_text/` holds the
caption file, the three split lists and the CrowdFlower judgments of the chosen images.

## Source

Flickr8k: M. Hodosh, P. Young and J. Hockenmaier (2013), "Framing Image Description as
a Ranking Task: Data, Models and Evaluation Metrics", Journal of Artificial Intelligence
Research 47:853-899.

## Terms

Flickr8k is distributed for research use, and the images remain the property of their
Flickr authors. The readme of the Flickr8k archive requests that every user of the corpus cite
the paper above.

## How it was made

From the repository root, with falcon-rl installed:

```
{command}
```

Train and val images are drawn at random (with the given seed) from the official split
lists, among the images that exist in the source folder and have captions. Test images
are chosen greedily for their CrowdFlower judgments. A match is a judgment with at least
two thirds of "yes" votes for an image and a caption of another image. Each step adds the
test image with the most matches, in either direction, to test images already chosen.
Test images without any match fill the remaining places at random. Each image is
resized bilinearly, without keeping the aspect ratio, and saved as JPEG. The caption
file keeps the five captions of each chosen image. The judgment file keeps every row
whose image and caption both belong to chosen test images.

## Contents

| split | images | captions | human-judged matches |
|---|---|---|---|
{rows}

Human-judged matches are (image, caption of another image) rows with at least two thirds
of "yes" votes. Total size: {megabytes:.1f} MB.
"""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
