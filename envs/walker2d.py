"""Walker2d-v5: a two-legged planar walker (``walker2d_v5.xml``, both feet with friction 0.9).

Observation (17): qpos[1:], qvel clipped to [-10, 10]. Action (6): torques in [-1, 1].
Reward: forward velocity + 1 while healthy - 0.001 |a|^2. Healthy: z in (0.8, 2.0) and
angle in (-1, 1); unhealthy terminates. Reset noise uniform +-0.005. Frame skip 4,
timestep 0.002 s, RK4.
"""

from __future__ import annotations

import jax
from mujoco import mjx

from envs.base import Env, healthy_between
from envs.hopper import planar_walker_observation, planar_walker_reward


class Walker2d(Env):
    xml = "walker2d.xml"
    frame_skip = 4

    solver_defaults = {"iterations": 8, "ls_iterations": 4}  # see docs/ENVIRONMENTS.md
    defaults = {
        "forward_reward_weight": 1.0,
        "ctrl_cost_weight": 1e-3,
        "healthy_reward": 1.0,
        "terminate_when_unhealthy": True,
        "healthy_z_range": (0.8, 2.0),
        "healthy_angle_range": (-1.0, 1.0),
        "reset_noise_scale": 5e-3,
    }

    def _reset_physics(self, data: mjx.Data) -> mjx.Data:
        return data  # observation and reward read qpos and qvel only

    def _observe(self, data: mjx.Data) -> jax.Array:
        return planar_walker_observation(data)

    def _reward(self, before, after, action):
        healthy = healthy_between(after.qpos[1], *self.healthy_z_range) & healthy_between(
            after.qpos[2], *self.healthy_angle_range
        )
        return planar_walker_reward(self, before, after, action, healthy)
