"""``python -m experiments`` runs the ``falcon-rl`` command."""

from experiments.cli import main

raise SystemExit(main())
