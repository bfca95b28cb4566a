"""Our tasks behind Brax's ``Env`` interface, so Brax's own SAC and PPO trainers run on
exactly the same dynamics, observations and rewards (side-by-side benchmarks).

    from brax.training.agents.sac import train as brax_sac
    brax_sac.train(environment=envs.brax_adapter.BraxEnv(envs.make("HalfCheetah")), ...)

Brax's policies act in [-1, 1]; the adapter maps that box affinely onto the task's control
range, as our own trainer does. Termination becomes Brax's ``done``; Brax's training
wrappers add the time limit (``info['truncation']``) and the auto-reset themselves.
"""

from __future__ import annotations

import jax
from brax.envs.base import Env as _BraxEnv
from brax.envs.base import State as BraxState

from envs.base import Env, State, scale_action


class BraxEnv(_BraxEnv):
    """A ``brax.envs.Env`` whose ``pipeline_state`` is our whole :class:`State`."""

    def __init__(self, env: Env):
        self.env = env

    def reset(self, rng: jax.Array) -> BraxState:
        return self._wrap(self.env.reset(rng))

    def step(self, state: BraxState, action: jax.Array) -> BraxState:
        inner = self.env.step(state.pipeline_state, scale_action(self.env, action))
        return state.replace(
            pipeline_state=inner,
            obs=inner.obs,
            reward=inner.reward,
            done=inner.terminated.astype(inner.reward.dtype),
            metrics={**state.metrics, **inner.metrics},  # Brax's wrappers add their own
        )

    def _wrap(self, inner: State) -> BraxState:
        return BraxState(
            pipeline_state=inner,
            obs=inner.obs,
            reward=inner.reward,
            done=inner.terminated.astype(inner.reward.dtype),
            metrics=dict(inner.metrics),
        )

    @property
    def observation_size(self) -> int:
        return self.env.observation_size

    @property
    def action_size(self) -> int:
        return self.env.action_size

    @property
    def backend(self) -> str:
        return "mjx"

    @property
    def dt(self) -> float:
        return self.env.dt
