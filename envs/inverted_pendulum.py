"""InvertedPendulum-v5: balance a pole on a cart.

Observation (4): qpos (cart position, pole angle), qvel. Action (1): cart force in [-3, 3].
Reward 1 per step while the pole stays within 0.2 rad; the episode terminates otherwise.
Reset noise: uniform +-0.01 on qpos and qvel. Frame skip 2, timestep 0.02 s (dt 0.04 s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from mujoco import mjx

from envs.base import Env


class InvertedPendulum(Env):
    xml = "inverted_pendulum.xml"
    frame_skip = 2
    camera_distance = 2.04
    camera_tracks = False

    solver_defaults = {"iterations": 4, "ls_iterations": 4}  # see docs/ENVIRONMENTS.md
    defaults = {"reset_noise_scale": 0.01}

    def _reset_physics(self, data: mjx.Data) -> mjx.Data:
        return data  # observation and reward read qpos and qvel only

    def _observe(self, data: mjx.Data) -> jax.Array:
        return jnp.concatenate([data.qpos, data.qvel])

    def _reward(self, before, after, action):
        obs = self._observe(after)
        terminated = ~jnp.all(jnp.isfinite(obs)) | (jnp.abs(obs[1]) > 0.2)
        reward = (~terminated).astype(obs.dtype)
        return reward, terminated, {"reward_survive": reward}
