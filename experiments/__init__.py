"""The composition root: the ``falcon-rl`` command, the trainer, sweeps and reports."""
