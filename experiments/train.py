"""Train with a negative-mining scheduler: ``python experiments/train.py [options]``.

The same as ``falcon-rl train``; run ``python experiments/train.py --help``
for the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script from a clone: make the repository's packages importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
