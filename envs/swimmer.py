"""Swimmer-v5: a three-link swimmer in a viscous fluid; it never terminates.

Observation (8): qpos[2:], qvel. Action (2): torques in [-1, 1].
Reward: x velocity of the root - 1e-4 |a|^2. Reset noise uniform +-0.1 on qpos and
qvel. Frame skip 4, timestep 0.01 s, RK4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from mujoco import mjx

from envs.base import Env, control_cost


class Swimmer(Env):
    xml = "swimmer.xml"
    frame_skip = 4
    camera_distance = 3.0

    solver_defaults = {"iterations": 4, "ls_iterations": 4}  # see docs/ENVIRONMENTS.md
    defaults = {"forward_reward_weight": 1.0, "ctrl_cost_weight": 1e-4, "reset_noise_scale": 0.1}

    def _reset_physics(self, data: mjx.Data) -> mjx.Data:
        return data  # observation and reward read qpos and qvel only

    def _observe(self, data: mjx.Data) -> jax.Array:
        return jnp.concatenate([data.qpos[2:], data.qvel])

    def _reward(self, before, after, action):
        velocity = (after.qpos[:2] - before.qpos[:2]) / self.dt
        forward = self.forward_reward_weight * velocity[0]
        ctrl = control_cost(self.ctrl_cost_weight, action)
        metrics = {
            "reward_forward": forward,
            "reward_ctrl": -ctrl,
            "x_velocity": velocity[0],
            "y_velocity": velocity[1],
        }
        return forward - ctrl, jnp.zeros((), bool), metrics
