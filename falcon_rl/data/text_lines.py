"""Line-by-line reading of text files whose encoding may be damaged in places."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def read_text_lines(path: Path, report: Counter, not_utf8_kind: str) -> list[str]:
    """Return the non-blank lines of a UTF-8 text file, without line endings.

    Each line is decoded on its own, so one damaged line does not lose the rest of the file.
    Lines that are not valid UTF-8 are skipped and counted under ``not_utf8_kind`` in
    ``report``. LF and CRLF line endings and a leading byte order mark are accepted.
    """
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]

    lines = []
    for raw in data.split(b"\n"):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            report[not_utf8_kind] += 1
    return lines
