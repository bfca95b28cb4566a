"""Walker2d-v5: a two-legged planar walker (``walker2d_v5.xml``, both feet with friction 0.9).

Observation (17): qpos[1:], qvel clipped to [-10, 10]. Action (6): torques in [-1, 1].
Reward: forward velocity + 1 while healthy - 0.001 |a|^2. Healthy: z in (0.8, 2.0) and
angle in (-1, 1); unhealthy terminates. Reset noise uniform +-0.005. Frame skip 4,
timestep 0.002 s, RK4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from mujoco import mjx

from envs.base import Env, PhysicsOptions, healthy_between
from envs.hopper import planar_walker_reward


class Walker2d(Env):
    xml = "walker2d.xml"
    frame_skip = 4

    def __init__(
        self,
        forward_reward_weight: float = 1.0,
        ctrl_cost_weight: float = 1e-3,
        healthy_reward: float = 1.0,
        terminate_when_unhealthy: bool = True,
        healthy_z_range: tuple[float, float] = (0.8, 2.0),
        healthy_angle_range: tuple[float, float] = (-1.0, 1.0),
        reset_noise_scale: float = 5e-3,
        physics: PhysicsOptions | None = None,
    ):
        self.forward_reward_weight = forward_reward_weight
        self.ctrl_cost_weight = ctrl_cost_weight
        self.healthy_reward = healthy_reward
        self.terminate_when_unhealthy = terminate_when_unhealthy
        self.healthy_z_range = healthy_z_range
        self.healthy_angle_range = healthy_angle_range
        super().__init__(physics, reset_noise_scale)

    def _reset_physics(self, data: mjx.Data) -> mjx.Data:
        return data  # observation and reward read qpos and qvel only

    def _observe(self, data: mjx.Data) -> jax.Array:
        return jnp.concatenate([data.qpos[1:], jnp.clip(data.qvel, -10.0, 10.0)])

    def _reward(self, before, after, action):
        healthy = healthy_between(after.qpos[1], *self.healthy_z_range) & healthy_between(
            after.qpos[2], *self.healthy_angle_range
        )
        return planar_walker_reward(self, before, after, action, healthy)
