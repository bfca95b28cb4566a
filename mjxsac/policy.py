"""A trained policy outside the training loop: loaded from a checkpoint, acting in the
env's action units. ``mjxsac-render``, ``mjxsac-eval`` and ``mjxsac-export`` share it."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import envs
from envs import scale_action
from mjxsac import normalizer as obs_norm
from mjxsac.checkpoint import Checkpoints, find_checkpoints
from mjxsac.cli import UserError
from mjxsac.networks import deterministic_action
from mjxsac.sac import Trainer


class Loaded(NamedTuple):
    trainer: Trainer
    """A trainer built from the checkpoint's own config (its env, networks, sizes)."""
    policy: dict
    """One member's ``{"actor": params, "normalizer": Normalizer}``."""
    step: int
    """The checkpoint's env step."""
    member: int


def load(path, member: int | None = None, prog: str = "mjxsac") -> Loaded:
    """The policy of ``member`` (default: the best by the checkpoint's eval returns, else
    the first) from a run directory, its ``checkpoints`` or one step's directory."""
    directory, step = find_checkpoints(path)
    ckpt = Checkpoints(directory, read_only=True, prog=prog)
    trainer = Trainer(ckpt.config(step))
    step, policy = ckpt.restore_policy(trainer, step)
    size = trainer.population_size
    if member is None:
        returns = ckpt.meta(step).get("eval_returns")
        member = int(np.argmax(returns)) if returns else 0
    if isinstance(member, bool) or not 0 <= member < size:
        raise UserError(f"--member {member}: the population has members 0..{size - 1}")
    return Loaded(trainer, jax.tree.map(lambda x: x[member], policy), step, member)


def act(trainer: Trainer, policy: dict, obs: jax.Array, actor=None) -> jax.Array:
    """The deterministic action (the squashed mean) in the env's units, for raw ``obs``
    (one observation or a batch); ``actor``: another module for the same parameters
    (default the trainer's)."""
    normalized = obs_norm.normalize(policy["normalizer"], obs)
    mean, _ = (actor or trainer.actor).apply(policy["actor"], normalized)
    return scale_action(trainer.env, deterministic_action(mean))


jit_act = jax.jit(act, static_argnums=0)
"""``act`` compiled; trainers of equal configs share the program."""


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def observations(trainer: Trainer, policy: dict, num_envs: int, steps: int, key: jax.Array):
    """Observations the policy meets: ``num_envs`` MJX envs (auto-resetting at termination
    and at the time limit) driven by the deterministic policy for ``steps`` steps; returns
    the (steps * num_envs, obs) raw observations."""
    stack = envs.wrap(trainer.env, num_envs, trainer.config.episode_length)

    def step(state, _):
        action = act(trainer, policy, state.obs)
        return stack.step(state, action), state.obs

    _, obs = jax.lax.scan(step, stack.reset(key), None, length=steps)
    return jnp.reshape(obs, (-1, obs.shape[-1]))
