"""Ant-v5: a four-legged robot walking forward in 3D.

Observation (105): qpos[2:] (13), qvel (14), and the external contact wrenches
``cfrc_ext[1:]`` of the 13 bodies, clipped to [-1, 1] (78). Action (8): torques in [-1, 1].
Reward: x velocity of the torso + 1 while healthy - 0.5 |a|^2
- 5e-4 |clip(cfrc_ext, -1, 1)|^2. Healthy: the state is finite and torso z in [0.2, 1.0];
unhealthy terminates. Reset noise: uniform +-0.1 on qpos, 0.1 * standard normal on qvel.
Frame skip 5, timestep 0.01 s, RK4, pyramidal friction cones.

Where MJX differs from MuJoCo's C engine on this model (contact friction frames, RK4 on the
free joint) see ``docs/ENVIRONMENTS.md``: the measured per-step differences are there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from mujoco import mjx

from envs.base import Env, control_cost, healthy_between, impl_field


class Ant(Env):
    xml = "ant.xml"
    frame_skip = 5
    uses_cfrc_ext = True
    before_fields = ("xpos",)  # the torso's position before the step (the velocity term)

    solver_defaults = {"iterations": 8, "ls_iterations": 4}  # see docs/ENVIRONMENTS.md
    defaults = {
        "forward_reward_weight": 1.0,
        "ctrl_cost_weight": 0.5,
        "contact_cost_weight": 5e-4,
        "healthy_reward": 1.0,
        "main_body": 1,
        "terminate_when_unhealthy": True,
        "healthy_z_range": (0.2, 1.0),
        "contact_force_range": (-1.0, 1.0),
        "reset_noise_scale": 0.1,
        "include_cfrc_ext_in_observation": True,
    }
    qvel_noise = "normal"

    def _reset_physics(self, data: mjx.Data) -> mjx.Data:
        # The first reward reads the torso position; cfrc_ext is zero after a reset, as in
        # Gymnasium (mj_forward does not compute it).
        return mjx.kinematics(self.mjx_model, data)

    def _contact_forces(self, data: mjx.Data) -> jax.Array:
        return jnp.clip(impl_field(data, "cfrc_ext"), *self.contact_force_range)

    def _observe(self, data: mjx.Data) -> jax.Array:
        parts = [data.qpos[2:], data.qvel]
        if self.include_cfrc_ext_in_observation:
            parts.append(self._contact_forces(data)[1:].ravel())
        return jnp.concatenate(parts)

    def _reward(self, before, after, action):
        velocity = (after.xpos[self.main_body, :2] - before.xpos[self.main_body, :2]) / self.dt
        state = jnp.concatenate([after.qpos, after.qvel])
        healthy = jnp.all(jnp.isfinite(state)) & healthy_between(
            state[2], *self.healthy_z_range, inclusive=True
        )
        contact = control_cost(self.contact_cost_weight, self._contact_forces(after))
        return walking_reward(self, velocity, healthy, action, contact)


def walking_reward(env, velocity, healthy, action, contact_cost):
    """Ant's and Humanoid's shared v5 reward: forward + healthy - control - contact."""
    forward = env.forward_reward_weight * velocity[0]
    survive = healthy.astype(forward.dtype) * env.healthy_reward
    ctrl = control_cost(env.ctrl_cost_weight, action)
    metrics = {
        "reward_forward": forward,
        "reward_ctrl": -ctrl,
        "reward_contact": -contact_cost,
        "reward_survive": survive,
        "x_velocity": velocity[0],
        "y_velocity": velocity[1],
    }
    terminated = ~healthy & env.terminate_when_unhealthy
    return forward + survive - ctrl - contact_cost, terminated, metrics
