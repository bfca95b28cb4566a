"""The three wrappers: time limit, auto-reset (keeping the terminal observation), vmap."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from envs.base import Env, State, mjx


class Wrapper:
    """Forwards everything it does not change to the wrapped env."""

    def __init__(self, env: Env | Wrapper):
        self.env = env

    def reset(self, key: jax.Array) -> State:
        return self.env.reset(key)

    def step(self, state: State, action: jax.Array) -> State:
        return self.env.step(state, action)

    @property
    def unwrapped(self) -> Env:
        return self.env.unwrapped if isinstance(self.env, Wrapper) else self.env

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.env, name)


class TimeLimit(Wrapper):
    """Marks ``truncated`` once an episode has run ``episode_length`` steps."""

    def __init__(self, env: Env | Wrapper, episode_length: int | None = None):
        super().__init__(env)
        self.episode_length = int(env.episode_length if episode_length is None else episode_length)
        if self.episode_length < 1:
            raise ValueError(f"episode_length must be positive, got {self.episode_length}")

    def step(self, state: State, action: jax.Array) -> State:
        state = self.env.step(state, action)
        return state.replace(truncated=state.truncated | (state.steps >= self.episode_length))


class AutoReset(Wrapper):
    """Starts a new episode (fresh reset noise) after a terminal or truncated step.

    ``reward``, ``terminated``, ``truncated``, ``metrics`` and ``final_obs`` still describe
    the step that ended the episode; ``obs``, ``data`` and ``steps`` belong to the new one.
    """

    def step(self, state: State, action: jax.Array) -> State:
        state = self.env.step(state, action)
        key, reset_key = jax.random.split(state.key)
        fresh = self.env.reset(reset_key)
        done = state.terminated | state.truncated

        def pick(new: jax.Array, old: jax.Array) -> jax.Array:
            return jnp.where(done.reshape(done.shape + (1,) * (old.ndim - done.ndim)), new, old)

        if isinstance(state.data, mjx.Data):  # a Warp Data's fields shared by all worlds
            data = state.data.where(done, fresh.data)  # (its contacts) are not picked
        else:
            data = jax.tree.map(pick, fresh.data, state.data)
        return state.replace(
            data=data,
            obs=pick(fresh.obs, state.obs),
            steps=pick(fresh.steps, state.steps),
            key=key,
        )


class VmapEnv(Wrapper):
    """Runs ``num_envs`` independent copies: states and actions gain a leading axis.

    ``compact``: the states it returns hold only what the next step reads
    (``Env.compact``: 6-7 arrays per env instead of 84, less for a loop to carry and a
    smaller program to compile), and ``step`` expands them first (``Env.expand``). Only
    here: whoever holds the stack's states (the trainer, a checkpoint) sees a ``State``.
    ``step`` accepts any leading axis length (a population's envs stepped as one batch)."""

    def __init__(self, env: Env | Wrapper, num_envs: int, compact: bool = False):
        super().__init__(env)
        if num_envs < 1:
            raise ValueError(f"num_envs must be positive, got {num_envs}")
        self.num_envs = int(num_envs)
        self.compact = compact
        if isinstance(self.unwrapped, Env):
            self.unwrapped.reserve(self.num_envs)  # (Warp's contact budget)

    def reset(self, key: jax.Array) -> State:
        return self._compacted(jax.vmap(self.env.reset)(jax.random.split(key, self.num_envs)))

    def step(self, state: State, action: jax.Array) -> State:
        if self.compact:  # expanded under vmap: every field batched from the physics' start
            state = state.replace(data=jax.vmap(self.unwrapped.expand)(state.data))
        return self._compacted(jax.vmap(self.env.step)(state, action))

    def _compacted(self, state: State) -> State:
        if not self.compact:
            return state
        return state.replace(data=self.unwrapped.compact(state.data))


def desynchronize(state: State, key: jax.Array, episode_length: int) -> State:
    """A batch of fresh envs with their time-limit counters (``steps``) drawn uniformly
    from [0, episode_length), so that their first episodes truncate on different steps
    (the auto-reset starts every later episode at 0)."""
    steps = jax.random.randint(key, state.steps.shape, 0, episode_length, state.steps.dtype)
    return state.replace(steps=steps)


def wrap(
    env: Env, num_envs: int, episode_length: int | None = None, compact: bool = False
) -> VmapEnv:
    """The training stack: ``num_envs`` auto-resetting copies with a time limit
    (``compact``: carrying compact states, see ``VmapEnv``)."""
    return VmapEnv(AutoReset(TimeLimit(env, episode_length)), num_envs, compact)
