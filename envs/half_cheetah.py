"""HalfCheetah-v5: a planar cheetah running forward; it never terminates.

Observation (17): qpos[1:], qvel (unclipped). Action (6): torques in [-1, 1].
Reward: forward velocity - 0.1 |a|^2. Reset noise: uniform +-0.1 on qpos,
0.1 * standard normal on qvel. Frame skip 5, timestep 0.01 s, Euler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from mujoco import mjx

from envs.base import Env, control_cost


class HalfCheetah(Env):
    xml = "half_cheetah.xml"
    frame_skip = 5

    solver_defaults = {"iterations": 8, "ls_iterations": 4}  # see docs/ENVIRONMENTS.md
    defaults = {"forward_reward_weight": 1.0, "ctrl_cost_weight": 0.1, "reset_noise_scale": 0.1}
    qvel_noise = "normal"

    def _reset_physics(self, data: mjx.Data) -> mjx.Data:
        return data  # observation and reward read qpos and qvel only

    def _observe(self, data: mjx.Data) -> jax.Array:
        return jnp.concatenate([data.qpos[1:], data.qvel])

    def _reward(self, before, after, action):
        x_velocity = (after.qpos[0] - before.qpos[0]) / self.dt
        forward = self.forward_reward_weight * x_velocity
        ctrl = control_cost(self.ctrl_cost_weight, action)
        metrics = {"reward_forward": forward, "reward_ctrl": -ctrl, "x_velocity": x_velocity}
        return forward - ctrl, jnp.zeros((), bool), metrics
