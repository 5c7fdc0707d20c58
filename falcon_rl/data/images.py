"""Decoding of image files into one uint8 tensor, skipping files that cannot be read."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from falcon_rl.data.pairs import DataError
from falcon_rl.data.report import DataReport

# Outcomes of decoding one file that keep the image.
_KEPT = (None, "image_converted")


def decode_images(
    paths: Sequence[Path],
    image_size: int,
    progress: bool = True,
    description: str = "decoding images",
    max_workers: int | None = None,
) -> tuple[torch.Tensor, np.ndarray, DataReport]:
    """Decode image files, convert them to RGB and resize them to ``image_size`` squared.

    Missing, empty, truncated and undecodable files are skipped. Grayscale, palette, CMYK
    and other non-RGB images are converted to RGB, with transparent pixels composited on
    white. The resize is bilinear and does not keep the aspect ratio.

    :param paths: image files to decode.
    :param image_size: side S of the square output images, in pixels.
    :param progress: show a tqdm progress bar (only when stderr is a terminal).
    :param description: label of the progress bar.
    :param max_workers: decoding threads; ``None`` uses the ``ThreadPoolExecutor`` default.
        Pillow releases the GIL while it decodes and resizes, so threads run in parallel.
    :return: uint8 tensor ``[n_kept, 3, S, S]`` of the decoded images in input order,
        a bool array ``[len(paths)]`` marking which paths were kept, and the counts of
        skipped and converted files by kind.
    """
    validate_image_size(image_size)
    pixels = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    outcomes: list[str | None] = []

    def decode_at(index: int) -> str | None:
        return decode_image_into(paths[index], image_size, pixels[index])

    with (
        ThreadPoolExecutor(max_workers=max_workers) as pool,
        tqdm(total=len(paths), desc=description, unit="image", disable=None if progress else True) as bar,
    ):
        for outcome in pool.map(decode_at, range(len(paths))):
            outcomes.append(outcome)
            bar.update()

    kept = np.array([outcome in _KEPT for outcome in outcomes], dtype=bool)
    report = DataReport(outcome for outcome in outcomes if outcome is not None)
    if not kept.all():
        pixels = pixels[kept]
    return torch.from_numpy(pixels), kept, report


def validate_image_size(image_size: int) -> None:
    """Raise DataError unless ``image_size`` is a positive integer."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer (pixels), got {image_size!r}")


def decode_image_into(path: Path, image_size: int, out: np.ndarray) -> str | None:
    """Decode one image file into ``out`` (uint8 ``[3, S, S]``) and return the outcome.

    The outcome is ``None`` for an RGB image, ``"image_converted"`` for an image converted
    to RGB, or the report kind of the reason the file was skipped: ``"image_missing"``,
    ``"image_empty"``, ``"image_truncated"`` or ``"image_undecodable"``.
    """
    try:
        if path.stat().st_size == 0:
            return "image_empty"
        with Image.open(path) as image:
            image.load()
            converted = image.mode != "RGB"
            rgb = to_rgb(image)
            resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        return "image_missing"
    except (UnidentifiedImageError, Image.DecompressionBombError):
        return "image_undecodable"
    except OSError as error:
        # Pillow reports a file that ends early as OSError("image file is truncated ...").
        return "image_truncated" if "truncated" in str(error) else "image_undecodable"
    except (ValueError, SyntaxError, EOFError, IndexError):
        # Pillow's format plugins raise these for malformed headers.
        return "image_undecodable"

    out[...] = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)
    return "image_converted" if converted else None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to RGB.

    Transparent pixels are composited on white, because their stored colour is often black
    or arbitrary. 16-bit grayscale is scaled to 8 bits.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            values = values / 257.0
        # NOTE: 32-bit integer and float images are clipped to [0, 255], not rescaled,
        # because their value range is not stored in the file.
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")
