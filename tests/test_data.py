"""Tests of falcon_rl.data: Flickr8k and JSON readers, image decoding, tokenization."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from falcon_rl.data import (
    DataError,
    caption_normal_form,
    load_splits,
    load_tokenizer,
    tokenize,
)
from falcon_rl.data.images import decode_images
from falcon_rl.data.text_lines import read_text_lines

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k"
SIZE = 16


def noise_image(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def write_images(folder: Path) -> None:
    """Write good, converted and broken image files under their test names."""
    folder.mkdir(parents=True)
    for seed, name in enumerate(["rgb1.jpg", "rgb2.jpg", "rgb3.jpg", "t1.jpg", "t2.jpg", "t3.jpg", "nocap.jpg"]):
        noise_image(seed).save(folder / name)
    noise_image(10).convert("L").save(folder / "gray.jpg")
    noise_image(11).convert("CMYK").save(folder / "cmyk.jpg")
    noise_image(12).convert("P").save(folder / "palette.png")
    transparent = Image.new("RGBA", (24, 24), (0, 0, 0, 0))
    transparent.save(folder / "rgba.png")
    (folder / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    (folder / "empty.jpg").write_bytes(b"")
    data = jpeg_bytes(noise_image(13, size=48))
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])


TRAIN = ["rgb1.jpg", "rgb2.jpg", "gray.jpg", "cmyk.jpg", "palette.png", "rgba.png", "missing.jpg", "nocap.jpg"]
VAL = ["corrupt.jpg", "empty.jpg", "truncated.jpg", "rgb3.jpg"]
TEST = ["t1.jpg", "t2.jpg", "t3.jpg"]


def token_file_bytes() -> bytes:
    lines = [f"{name}#{n}\t{name} caption {n} .".encode() for name in TRAIN + VAL + TEST if name != "nocap.jpg" for n in (0, 1)]
    lines[0] += b"\r"  # a CRLF line ending
    lines[1] += b"\r"
    bad = [
        b"rgb1.jpg#2\tcaf\xe9 au lait",  # Latin-1, not UTF-8
        b"rgb1.jpg#3 no tab here",
        b"rgb1.jpg#x\tbad caption number",
        b"rgb1.jpg#4\t   ",  # empty caption
        b"rgb1.jpg#0\ta second caption #0",  # duplicate id
        b"unlisted.jpg#0\tan image in no split",
    ]
    return b"\n".join(lines + bad) + b"\n"


JUDGMENTS = [
    "t1.jpg\tt2.jpg#0\t1\t3\t0",  # match across images
    "t1.jpg\tt1.jpg#0\t1\t3\t0",  # the image's own caption
    "t2.jpg\tt3.jpg#1\t0.666666666666667\t2\t1",  # match at exactly two thirds
    "t3.jpg\tt1.jpg#0\t0.333333333333333\t1\t2",  # not a match
    "t1.jpg\trgb1.jpg#0\t1\t3\t0",  # caption of another split
    "t1.jpg\tt2.jpg#0\t1\t3\t0",  # the first row again
    "t2.jpg\tt1.jpg#0\tnot-a-number\t3\t0",  # malformed
]


def make_flickr8k(root: Path, judgments: bool = True) -> Path:
    write_images(root / "Flicker8k_Dataset")
    text = root / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_bytes(token_file_bytes())
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(TRAIN + ["rgb1.jpg"]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\r\n".join(VAL) + "\r\n")
    (text / "Flickr_8k.testImages.txt").write_text("\n".join(TEST))
    if judgments:
        rows = "\n".join(JUDGMENTS).encode() + b"\nt3.jpg\tt2.jpg#1\t\xff\xfe\t1\t1\n"
        (text / "CrowdFlowerAnnotations.txt").write_bytes(rows)
    return root


@pytest.fixture(scope="module")
def flickr8k_splits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = make_flickr8k(tmp_path_factory.mktemp("flickr8k"))
    return load_splits(root, image_size=SIZE, progress=False)


# --- text lines ---------------------------------------------------------------------


def test_read_text_lines_strips_crlf_and_skips_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\n\n\xff bad\nthree")
    report: Counter = Counter()
    lines = read_text_lines(path, report, "bad")
    assert lines == ["one", "two", "three"]
    assert report["bad"] == 1


# --- Flickr8k -----------------------------------------------------------------------


def test_flickr8k_train_keeps_decodable_images(flickr8k_splits: dict) -> None:
    train = flickr8k_splits["train"]
    assert train.image_names == ["rgb1.jpg", "rgb2.jpg", "gray.jpg", "cmyk.jpg", "palette.png", "rgba.png"]


def test_flickr8k_train_pairs_follow_images(flickr8k_splits: dict) -> None:
    train = flickr8k_splits["train"]
    assert train.image_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert train.caption_keys[:3] == ["rgb1.jpg#0", "rgb1.jpg#1", "rgb2.jpg#0"]
    assert train.captions[0] == "rgb1.jpg caption 0 ."


def test_flickr8k_images_tensor_shape_and_dtype(flickr8k_splits: dict) -> None:
    images = flickr8k_splits["train"].images
    assert images.shape == (6, 3, SIZE, SIZE)
    assert images.dtype == torch.uint8


@pytest.mark.parametrize(
    ("split", "kind", "count"),
    [
        ("train", "image_missing", 1),
        ("train", "image_without_captions", 1),
        ("train", "image_listed_twice", 1),
        ("train", "image_converted", 4),
        ("val", "image_undecodable", 1),
        ("val", "image_empty", 1),
        ("val", "image_truncated", 1),
        ("test", "image_missing", 0),
    ],
)
def test_flickr8k_split_report_counts(flickr8k_splits: dict, split: str, kind: str, count: int) -> None:
    assert flickr8k_splits[split].report[kind] == count


@pytest.mark.parametrize(
    ("kind", "count"),
    [
        ("token_line_not_utf8", 1),
        ("token_line_malformed", 2),
        ("token_caption_empty", 1),
        ("token_caption_duplicate", 1),
        ("token_caption_ignored", 1),
        ("judgment_line_not_utf8", 1),
        ("judgment_line_malformed", 1),
    ],
)
def test_flickr8k_shared_file_counts_in_every_split(flickr8k_splits: dict, kind: str, count: int) -> None:
    for split in ("train", "val", "test"):
        assert flickr8k_splits[split].report[kind] == count, split


def test_flickr8k_crlf_line_is_parsed(flickr8k_splits: dict) -> None:
    assert flickr8k_splits["train"].captions[1] == "rgb1.jpg caption 1 ."


def test_flickr8k_val_keeps_only_good_image(flickr8k_splits: dict) -> None:
    assert flickr8k_splits["val"].image_names == ["rgb3.jpg"]


def test_flickr8k_grayscale_becomes_equal_channels(flickr8k_splits: dict) -> None:
    gray = flickr8k_splits["train"].images[2]
    assert torch.equal(gray[0], gray[1])
    assert torch.equal(gray[1], gray[2])


def test_flickr8k_transparent_pixels_become_white(flickr8k_splits: dict) -> None:
    rgba = flickr8k_splits["train"].images[5]
    assert int(rgba.min()) == 255


def test_flickr8k_human_matches_cross_image_rows(flickr8k_splits: dict) -> None:
    # Test pairs: t1 -> 0, 1; t2 -> 2, 3; t3 -> 4, 5.
    matches = flickr8k_splits["test"].human_matches
    assert matches.tolist() == [[0, 2], [1, 5]]
    assert matches.dtype == np.int64


def test_flickr8k_human_matches_empty_for_unjudged_split(flickr8k_splits: dict) -> None:
    assert flickr8k_splits["train"].human_matches.shape == (0, 2)


def test_flickr8k_without_judgment_file_has_no_matches(tmp_path: Path) -> None:
    splits = load_splits(make_flickr8k(tmp_path, judgments=False), image_size=SIZE, progress=False)
    for split in ("train", "val", "test"):
        assert splits[split].human_matches is None, split


def test_flickr8k_image_root_overrides_folder(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path / "data")
    (root / "Flicker8k_Dataset").rename(tmp_path / "elsewhere")
    splits = load_splits(root, image_root=tmp_path / "elsewhere", image_size=SIZE, progress=False)
    assert splits["test"].n_images == 3


def test_flickr8k_missing_split_list_raises(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path)
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(DataError, match="Flickr_8k.devImages.txt"):
        load_splits(root, image_size=SIZE, progress=False)


def test_flickr8k_split_without_pairs_raises(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path)
    (root / "Flickr8k_text" / "Flickr_8k.testImages.txt").write_text("missing.jpg\n")
    with pytest.raises(DataError, match="test: no usable image-caption pairs"):
        load_splits(root, image_size=SIZE, progress=False)


def test_flickr8k_logs_one_line_per_kind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_flickr8k(tmp_path)
    with caplog.at_level("INFO", logger="falcon_rl.data"):
        load_splits(root, image_size=SIZE, progress=False)
    missing = [record.getMessage() for record in caplog.records if "listed but missing" in record.getMessage()]
    assert missing == ["train: skipped 1 images listed but missing"]
    not_utf8 = [record for record in caplog.records if "caption lines that are not valid UTF-8" in record.getMessage()]
    assert len(not_utf8) == 1


# --- image decoding -----------------------------------------------------------------


def test_decode_images_resizes_without_keeping_aspect(tmp_path: Path) -> None:
    Image.new("RGB", (40, 10), (10, 200, 30)).save(tmp_path / "wide.png")
    images, kept, report = decode_images([tmp_path / "wide.png"], 8, progress=False)
    assert images.shape == (1, 3, 8, 8)
    assert images[0, :, 4, 4].tolist() == [10, 200, 30]
    assert kept.tolist() == [True]
    assert sum(report.values()) == 0


def test_decode_images_missing_file_is_skipped(tmp_path: Path) -> None:
    noise_image(0).save(tmp_path / "a.jpg")
    images, kept, report = decode_images([tmp_path / "gone.jpg", tmp_path / "a.jpg"], 8, progress=False)
    assert kept.tolist() == [False, True]
    assert images.shape[0] == 1
    assert report["image_missing"] == 1


def test_decode_images_rejects_zero_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image_size"):
        decode_images([], 0, progress=False)


# --- ALBEF / BLIP JSON --------------------------------------------------------------


def make_json_dataset(folder: Path) -> Path:
    images = folder / "images"
    images.mkdir(parents=True)
    for seed in range(4):
        noise_image(seed).save(images / f"{seed}.jpg")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    train = [
        {"image": "images/0.jpg", "caption": "a red cat", "image_id": 7},
        {"image": "images/0.jpg", "caption": "a cat on a mat", "image_id": 7},
        {"image": "images/1.jpg", "caption": "a dog", "image_id": "dog"},
        {"image": "images/1.jpg", "caption": "   ", "image_id": "dog"},
        {"image": "images/broken.jpg", "caption": "broken", "image_id": 9},
        {"caption": "no image"},
        "not an entry",
        {"image": "images/9.jpg", "caption": "missing file", "image_id": 3},
    ]
    val = [
        {"image": "images/2.jpg", "caption": ["two birds", "birds on a wire", 5]},
        {"image": str(images / "3.jpg"), "caption": ["an absolute path"]},
    ]
    test = [{"image": "images/3.jpg", "caption": ["one", "two", "three"]}]
    for name, entries in (("train", train), ("val", val), ("test", test)):
        (folder / f"{name}.json").write_text(json.dumps(entries))
    return folder


@pytest.fixture(scope="module")
def json_splits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_splits(make_json_dataset(tmp_path_factory.mktemp("json")), image_size=SIZE, progress=False)


def test_json_train_groups_by_image_id(json_splits: dict) -> None:
    train = json_splits["train"]
    assert train.image_names == ["images/0.jpg", "images/1.jpg"]
    assert train.image_ids.tolist() == [0, 0, 1]
    assert train.caption_keys == ["images/0.jpg#0", "images/0.jpg#1", "images/1.jpg#0"]


@pytest.mark.parametrize(
    ("kind", "count"),
    [
        ("json_entry_malformed", 2),
        ("json_caption_empty", 1),
        ("image_undecodable", 1),
        ("image_missing", 1),
    ],
)
def test_json_train_report_counts(json_splits: dict, kind: str, count: int) -> None:
    assert json_splits["train"].report[kind] == count


def test_json_caption_list_gives_one_pair_each(json_splits: dict) -> None:
    val = json_splits["val"]
    assert val.captions == ["two birds", "birds on a wire", "an absolute path"]
    assert val.image_ids.tolist() == [0, 0, 1]
    assert val.report["json_caption_empty"] == 1


def test_json_has_no_human_matches(json_splits: dict) -> None:
    assert json_splits["test"].human_matches is None


def test_json_image_root_resolves_relative_paths(tmp_path: Path) -> None:
    folder = make_json_dataset(tmp_path / "annotations")
    (folder / "images").rename(tmp_path / "images")
    for name in ("train.json", "val.json", "test.json"):
        text = (folder / name).read_text().replace(str(folder / "images"), str(tmp_path / "images"))
        (folder / name).write_text(text)
    splits = load_splits(folder, image_root=tmp_path, image_size=SIZE, progress=False)
    assert splits["test"].n_pairs == 3


def test_json_invalid_file_raises(tmp_path: Path) -> None:
    folder = make_json_dataset(tmp_path)
    (folder / "val.json").write_text("{not json")
    with pytest.raises(DataError, match="val.json"):
        load_splits(folder, image_size=SIZE, progress=False)


# --- load_splits dispatch -----------------------------------------------------------


def test_load_splits_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path not found"):
        load_splits(tmp_path / "nowhere", image_size=SIZE)


def test_load_splits_unknown_layout_names_both(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Flickr8k_text.*train.json"):
        load_splits(tmp_path, image_size=SIZE)


def test_load_splits_rejects_bad_image_size() -> None:
    with pytest.raises(DataError, match="image_size"):
        load_splits(None, image_size=-3)


# --- embedded dataset ---------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_splits() -> dict:
    return load_splits(None, image_size=64, progress=False)


@pytest.mark.parametrize(("split", "n_images"), [("train", 1000), ("val", 200), ("test", 200)])
def test_embedded_dataset_image_counts(embedded_splits: dict, split: str, n_images: int) -> None:
    assert embedded_splits[split].n_images == n_images


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_embedded_dataset_five_captions_each(embedded_splits: dict, split: str) -> None:
    pairs = embedded_splits[split]
    assert np.bincount(pairs.image_ids).tolist() == [5] * pairs.n_images


def test_embedded_dataset_has_test_human_matches(embedded_splits: dict) -> None:
    assert len(embedded_splits["test"].human_matches) > 100


def test_embedded_dataset_loads_cleanly(embedded_splits: dict) -> None:
    assert sum(embedded_splits["train"].report.values()) == 0


# --- full Flickr8k ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"Flickr8k not found at {FLICKR8K}")
def test_full_flickr8k_counts() -> None:
    splits = load_splits(FLICKR8K, image_size=32, progress=False)
    assert {split: pairs.n_images for split, pairs in splits.items()} == {"train": 6000, "val": 1000, "test": 1000}
    assert {split: pairs.report["image_missing"] for split, pairs in splits.items()} == {
        "train": 74,
        "val": 13,
        "test": 13,
    }
    assert len(splits["test"].human_matches) > 0


# --- tokenizer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_tokenize_pads_and_truncates(tokenizer) -> None:
    input_ids, attention_mask = tokenize(tokenizer, ["a dog", "word " * 100], max_length=12)
    assert input_ids.shape == (2, 12)
    assert input_ids.dtype == torch.int64
    assert attention_mask.dtype == torch.int64
    assert attention_mask[0].tolist() == [1, 1, 1, 1] + [0] * 8
    assert attention_mask[1].tolist() == [1] * 12


def test_tokenize_empty_list(tokenizer) -> None:
    input_ids, attention_mask = tokenize(tokenizer, [], max_length=8)
    assert input_ids.shape == (0, 8)
    assert attention_mask.shape == (0, 8)


def test_load_tokenizer_bad_path_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "no-tokenizer")


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("A dog 's ball .", "a dog s ball"),
        ("a dog's   ball", "a dog s ball"),
        ("Black-and-white DOG!", "black and white dog"),
        ("  ", ""),
    ],
)
def test_caption_normal_form_cases(text: str, normal: str) -> None:
    assert caption_normal_form(text) == normal
