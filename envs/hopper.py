"""Hopper-v5: a one-legged planar robot hopping forward.

Observation (11): qpos[1:] (rootz, rooty, thigh, leg, foot), qvel clipped to [-10, 10].
Action (3): joint torques in [-1, 1]. Reward: forward velocity + 1 while healthy
- 0.001 |a|^2. Healthy: every entry of (qpos[2:], qvel) in (-100, 100), z in (0.7, inf),
angle in (-0.2, 0.2); unhealthy terminates. Reset noise uniform +-0.005. Frame skip 4,
timestep 0.002 s, RK4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from mujoco import mjx

from envs.base import Env, control_cost, healthy_between


class Hopper(Env):
    xml = "hopper.xml"
    frame_skip = 4
    camera_distance = 3.0

    solver_defaults = {"iterations": 4, "ls_iterations": 4}  # see docs/ENVIRONMENTS.md
    defaults = {
        "forward_reward_weight": 1.0,
        "ctrl_cost_weight": 1e-3,
        "healthy_reward": 1.0,
        "terminate_when_unhealthy": True,
        "healthy_state_range": (-100.0, 100.0),
        "healthy_z_range": (0.7, float("inf")),
        "healthy_angle_range": (-0.2, 0.2),
        "reset_noise_scale": 5e-3,
    }

    def _reset_physics(self, data: mjx.Data) -> mjx.Data:
        return data  # observation and reward read qpos and qvel only

    def _observe(self, data: mjx.Data) -> jax.Array:
        return planar_walker_observation(data)

    def _is_healthy(self, data: mjx.Data) -> jax.Array:
        state = jnp.concatenate([data.qpos[2:], data.qvel])
        return (
            jnp.all(healthy_between(state, *self.healthy_state_range))
            & healthy_between(data.qpos[1], *self.healthy_z_range)
            & healthy_between(data.qpos[2], *self.healthy_angle_range)
        )

    def _reward(self, before, after, action):
        return planar_walker_reward(self, before, after, action, self._is_healthy(after))


def planar_walker_observation(data: mjx.Data) -> jax.Array:
    """Hopper's and Walker2d's observation: qpos without x, qvel clipped to [-10, 10]."""
    return jnp.concatenate([data.qpos[1:], jnp.clip(data.qvel, -10.0, 10.0)])


def planar_walker_reward(env, before, after, action, healthy):
    """Hopper's and Walker2d's shared v5 reward: forward + healthy - control."""
    x_velocity = (after.qpos[0] - before.qpos[0]) / env.dt
    forward = env.forward_reward_weight * x_velocity
    survive = healthy.astype(x_velocity.dtype) * env.healthy_reward
    ctrl = control_cost(env.ctrl_cost_weight, action)
    terminated = ~healthy & env.terminate_when_unhealthy
    metrics = {
        "reward_forward": forward,
        "reward_ctrl": -ctrl,
        "reward_survive": survive,
        "x_velocity": x_velocity,
    }
    return forward + survive - ctrl, terminated, metrics
