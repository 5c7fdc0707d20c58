"""falcon-rl: learned negative mining for vision-language pretraining.

The library holds the data readers, VLP frameworks, mining machinery,
training run and evaluation. Schedulers live in ``agents``, Gymnasium
environments in ``envs`` and the command line in ``experiments``.
"""

__version__ = "0.1.0"
