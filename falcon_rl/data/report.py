"""Counts of skipped and converted dataset inputs, and the log lines that report them."""

from __future__ import annotations

import logging
from collections import Counter

# Log message of each kind of count, formatted with the count ``n``. Kinds that start with
# "converted" or "ignored" are logged at INFO, because nothing usable was lost; the rest
# are skips and logged at WARNING.
MESSAGES: dict[str, str] = {
    # Image files.
    "image_missing": "skipped {n} images listed but missing",
    "image_empty": "skipped {n} empty image files",
    "image_truncated": "skipped {n} truncated image files",
    "image_undecodable": "skipped {n} image files that could not be decoded",
    "image_converted": "converted {n} images to RGB",
    "image_without_captions": "skipped {n} images without captions",
    "image_listed_twice": "skipped {n} repeated entries of the split list",
    # Flickr8k caption file.
    "token_line_not_utf8": "skipped {n} caption lines that are not valid UTF-8",
    "token_line_malformed": "skipped {n} caption lines without an '<image>#<n><TAB>' prefix",
    "token_caption_empty": "skipped {n} empty captions",
    "token_caption_duplicate": "skipped {n} captions whose '<image>#<n>' id was already read",
    "token_caption_ignored": "ignored {n} captions of images in no split list",
    # Flickr8k split lists.
    "split_line_not_utf8": "skipped {n} split list lines that are not valid UTF-8",
    # Flickr8k CrowdFlower judgments.
    "judgment_line_not_utf8": "skipped {n} judgment lines that are not valid UTF-8",
    "judgment_line_malformed": "skipped {n} judgment lines that do not have 5 valid columns",
    # ALBEF / BLIP JSON annotations.
    "json_entry_malformed": "skipped {n} JSON entries without a valid 'image' and 'caption'",
    "json_caption_empty": "skipped {n} empty or non-string captions",
    "json_image_path_conflict": (
        "ignored {n} image paths that differ from the first path seen for the same image_id"
    ),
}


class DataReport(Counter):
    """Counts of skipped and converted inputs of one split, by kind.

    The kinds and their log messages are listed in ``MESSAGES``. Problems of a file that all
    splits share (Flickr8k's caption and judgment files) cannot be attributed to one split,
    so they appear in the report of every split.
    """

    def log(self, logger: logging.Logger, prefix: str) -> None:
        """Log one line per kind with a non-zero count, each starting with ``prefix``."""
        for kind in sorted(self):
            count = self[kind]
            if count == 0:
                continue
            message = MESSAGES.get(kind, kind + ": {n}").format(n=count)
            benign = message.startswith(("converted", "ignored"))
            logger.log(logging.INFO if benign else logging.WARNING, "%s: %s", prefix, message)
