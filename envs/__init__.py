"""Gymnasium environments that wrap a live VLP training run.

Importing this package registers ``falcon_rl/NegativeMining-v0``::

    import gymnasium as gym
    import envs  # noqa: F401  (registers the environment)

    env = gym.make("falcon_rl/NegativeMining-v0", steps=50)
"""

from gymnasium.envs.registration import register, registry

from envs.anchor_vec_env import AnchorMiningVecEnv
from envs.negative_mining import NegativeMiningEnv

ENV_ID = "falcon_rl/NegativeMining-v0"

if ENV_ID not in registry:
    # Deterministic: the same seed and actions give the same observations and rewards on CPU.
    register(id=ENV_ID, entry_point="envs.negative_mining:NegativeMiningEnv", nondeterministic=False,
             disable_env_checker=False)

__all__ = ["ENV_ID", "AnchorMiningVecEnv", "NegativeMiningEnv"]
