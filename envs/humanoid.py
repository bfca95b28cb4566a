"""Humanoid-v5: a 3D humanoid running forward.

Observation (348): qpos[2:] (22), qvel (23), and for bodies 1..13 ``cinert`` (130),
``cvel`` (78), ``qfrc_actuator[6:]`` (17) and ``cfrc_ext`` (78). Action (17): torques in
[-0.4, 0.4]. Reward: 1.25 * x velocity of the centre of mass + 5 while healthy
- 0.1 |a|^2 - min(5e-7 |cfrc_ext|^2, 10). Healthy: torso z in (1.0, 2.0); unhealthy
terminates. Reset noise uniform +-0.01 on qpos and qvel. Frame skip 5, timestep 0.003 s, RK4.

The XML asks for the PGS solver, which MJX does not implement; Newton replaces it (see
``docs/ENVIRONMENTS.md`` for the measured effect).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from mujoco import mjx

from envs.ant import walking_reward
from envs.base import Env, control_cost, healthy_between, impl_field


class Humanoid(Env):
    xml = "humanoid.xml"
    frame_skip = 5
    uses_cfrc_ext = True
    before_fields = ("xipos",)  # the mass centre before the step (the velocity term)
    solver_defaults = {"iterations": 8, "ls_iterations": 4}  # see docs/ENVIRONMENTS.md

    defaults = {
        "forward_reward_weight": 1.25,
        "ctrl_cost_weight": 0.1,
        "contact_cost_weight": 5e-7,
        "contact_cost_range": (-float("inf"), 10.0),
        "healthy_reward": 5.0,
        "terminate_when_unhealthy": True,
        "healthy_z_range": (1.0, 2.0),
        "reset_noise_scale": 1e-2,
    }

    def _reset_physics(self, data: mjx.Data) -> mjx.Data:
        # The reset observation reads cinert and cvel, the first reward xipos. At a reset
        # ctrl is zero, so qfrc_actuator is zero, and cfrc_ext is zero as in Gymnasium.
        if self.impl == "warp":  # Warp has no com_vel alone: its forward pass (no cfrc_ext)
            return mjx.forward(self.mjx_model, data)
        data = mjx.kinematics(self.mjx_model, data)
        data = mjx.com_pos(self.mjx_model, data)
        return mjx.com_vel(self.mjx_model, data)

    def _mass_center(self, data: mjx.Data) -> jax.Array:
        mass = jnp.asarray(self.mj_model.body_mass, data.xipos.dtype)
        return (mass @ data.xipos / mass.sum())[:2]

    def _observe(self, data: mjx.Data) -> jax.Array:
        return jnp.concatenate(
            [
                data.qpos[2:],
                data.qvel,
                impl_field(data, "cinert")[1:].ravel(),
                data.cvel[1:].ravel(),
                data.qfrc_actuator[6:],
                impl_field(data, "cfrc_ext")[1:].ravel(),
            ]
        )

    def _reward(self, before, after, action):
        velocity = (self._mass_center(after) - self._mass_center(before)) / self.dt
        healthy = healthy_between(after.qpos[2], *self.healthy_z_range)
        contact = jnp.clip(
            control_cost(self.contact_cost_weight, impl_field(after, "cfrc_ext")),
            *self.contact_cost_range,
        )
        return walking_reward(self, velocity, healthy, action, contact)
