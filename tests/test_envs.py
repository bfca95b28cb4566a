"""Environment contract: every task jits, vmaps, keeps its shapes and dtypes, stays finite
over a random rollout, and auto-resets while keeping the terminal observation."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

import envs
from envs.base import ASSETS, add_physics_arguments, physics_from_arguments
from mjxsac.config import Config

# Gymnasium v5 observation / action sizes, from its documentation.
SIZES = {
    "InvertedPendulum": (4, 1),
    "Hopper": (11, 3),
    "Walker2d": (17, 6),
    "HalfCheetah": (17, 6),
    "Ant": (105, 8),
    "Humanoid": (348, 17),
    "Swimmer": (8, 2),
}
DT = {
    "InvertedPendulum": 0.04,
    "Hopper": 0.008,
    "Walker2d": 0.008,
    "HalfCheetah": 0.05,
    "Ant": 0.05,
    "Humanoid": 0.015,
    "Swimmer": 0.04,
}


def test_names_and_unknown_task():
    assert set(envs.NAMES) == set(SIZES)
    with pytest.raises(ValueError, match="valid names: InvertedPendulum, Hopper"):
        envs.make("hopper")


def test_unknown_and_bad_options():
    with pytest.raises(ValueError, match=r"no option forward_weight.*ctrl_cost_weight"):
        envs.make("Hopper", forward_weight=2.0)
    with pytest.raises(ValueError, match="unknown integrator 'rk5'"):
        envs.make("Hopper", integrator="rk5")
    with pytest.raises(ValueError, match="iterations must be a positive integer or 'xml'"):
        envs.make("Hopper", iterations=0)
    with pytest.raises(ValueError, match="ls_iterations must be a positive integer or 'xml'"):
        envs.make("Hopper", ls_iterations="50")
    for bad in (-1e-9, float("nan"), float("inf"), "1e-8", True):
        with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
            envs.make("Hopper", tolerance=bad)


def test_options_reach_the_model():
    env = envs.make("Humanoid", integrator="euler", iterations=4, ls_iterations=8, tolerance=0)
    opt = env.mj_model.opt
    assert (opt.integrator, opt.iterations, opt.ls_iterations, opt.tolerance) == (0, 4, 8, 0)
    assert env.mjx_model.opt.tolerance == 0
    assert envs.make("Humanoid").mjx_model.opt.tolerance == 1e-8
    # Humanoid's XML asks for PGS, which MJX lacks: Newton stands in.
    assert envs.make("Humanoid").mj_model.opt.solver == 2
    assert envs.make("Hopper", ctrl_cost_weight=0.5).ctrl_cost_weight == 0.5


@pytest.mark.parametrize("name", envs.NAMES)
def test_solver_defaults_and_the_xml_settings(name):
    """Each task runs its own solver caps by default; --env-options restores the XML's,
    by name or by number, and a single explicit cap leaves the other at the task's."""
    xml = mujoco.MjModel.from_xml_path(str(ASSETS / envs.env_class(name).xml)).opt
    expected = (xml.iterations, xml.ls_iterations)  # 100 / 50; Humanoid's XML: 50 / 50
    defaults = envs.env_class(name).solver_defaults
    opt = envs.make(name).mj_model.opt
    assert (opt.iterations, opt.ls_iterations) == (
        defaults["iterations"],
        defaults["ls_iterations"],
    )
    assert (opt.iterations, opt.ls_iterations) != expected
    options = Config(env=name, env_options="iterations=xml,ls_iterations=xml").env_kwargs()
    env = envs.make(name, **options)
    assert (env.mj_model.opt.iterations, env.mj_model.opt.ls_iterations) == expected
    assert (env.physics.iterations, env.physics.ls_iterations) == expected


def test_explicit_caps_and_the_command_line():
    options = Config(env="Hopper", env_options="iterations=100,ls_iterations=50").env_kwargs()
    opt = envs.make("Hopper", **options).mj_model.opt
    assert (opt.iterations, opt.ls_iterations) == (100, 50)
    parser = argparse.ArgumentParser()
    add_physics_arguments(parser)
    args = parser.parse_args(["--iterations", "XML", "--ls-iterations", "9"])
    assert physics_from_arguments(args) == {"iterations": "xml", "ls_iterations": 9}
    opt = envs.make("Hopper", **physics_from_arguments(args)).mj_model.opt
    assert (opt.iterations, opt.ls_iterations) == (100, 9)
    opt = envs.make("Hopper", ls_iterations=7).mj_model.opt  # the other cap stays the task's
    assert opt.iterations == envs.env_class("Hopper").solver_defaults.get("iterations", 100)


@pytest.mark.parametrize("name", envs.NAMES)
def test_sizes_and_float32_shapes(name):
    """Sizes, dt and dtypes in the default float32 mode, single and batched under ``vmap``
    with the training wrappers, from tracing alone."""
    env = envs.make(name)
    obs_size, act_size = SIZES[name]
    assert (env.observation_size, env.action_size) == (obs_size, act_size)
    assert env.dt == pytest.approx(DT[name])
    assert env.episode_length == 1000
    assert env.action_low.shape == env.action_high.shape == (act_size,)
    assert np.all(env.action_low < env.action_high)
    batched = envs.wrap(env, num_envs=5)
    key = jax.random.key(0)
    for stack, lead in ((env, ()), (batched, (5,))):
        state = jax.eval_shape(stack.reset, key)
        action = jax.ShapeDtypeStruct((*lead, act_size), jnp.float32)
        stepped = jax.eval_shape(stack.step, state, action)
        for s in (state, stepped):
            assert s.obs.shape == s.final_obs.shape == (*lead, obs_size)
            assert s.reward.shape == s.terminated.shape == s.truncated.shape == lead
            assert s.obs.dtype == s.reward.dtype == jnp.float32
            assert s.terminated.dtype == s.truncated.dtype == jnp.bool_
            assert set(s.metrics) == set(env.metric_names)


def test_jit_rollout_and_auto_reset():
    """A jitted random rollout in float32 with a short time limit: finite, right shapes,
    episodes restart with fresh reset noise, and ``final_obs`` keeps the observation that
    ended each episode; InvertedPendulum, a batch of 3 envs under ``vmap``. (The wrappers'
    logic is checked without physics below, and every task's float32 step is traced by
    ``test_sizes_and_float32_shapes`` and stepped from compact states by the parity tests:
    compiling this rollout for the other six tasks cost 3-4 CPU-minutes of the suite.)
    A host loop over one jitted step: a scanned rollout compiles longer.

    Every step is also taken from the state's compact form (``Env.compact``, what the
    training loop carries) expanded again: the same compiled step must give the same bits;
    and the batched stack carrying compact states (``VmapEnv(compact=True)``) steps
    alike."""
    batch, horizon, limit = 3, 12, 5
    base = envs.make("InvertedPendulum")
    env = envs.VmapEnv(envs.AutoReset(envs.TimeLimit(base, episode_length=limit)), batch)
    # Device arrays like the step's: no second compile.
    round_trip = jax.jit(jax.vmap(lambda data: base.expand(base.compact(data))))
    lead = (batch,)
    step = jax.jit(env.step)
    state = jax.jit(env.reset)(jax.random.key(1))
    # The stack that carries compact states gives the same steps.
    compact_env = envs.VmapEnv(env.env, batch, compact=True)
    compact_step = jax.jit(compact_env.step)
    compact = jax.jit(compact_env.reset)(jax.random.key(1))
    rng = np.random.default_rng(0)
    traj, starts = [], [np.asarray(state.obs)]
    for _ in range(horizon):
        action = rng.uniform(env.action_low, env.action_high, (*lead, env.action_size))
        action = action.astype(np.float32)
        from_compact = step(state.replace(data=round_trip(state.data)), action)
        state = step(state, action)
        compact = compact_step(compact, action)
        assert compact.data.xpos is None
        for field in ("obs", "reward", "final_obs", "steps"):
            np.testing.assert_array_equal(getattr(compact, field), getattr(state, field))
        np.testing.assert_array_equal(compact.data.qvel, state.data.qvel)
        for got, want in zip(jax.tree.leaves(from_compact), jax.tree.leaves(state), strict=True):
            if not jnp.issubdtype(want.dtype, jax.dtypes.prng_key):
                np.testing.assert_array_equal(got, want)
        traj.append(jax.tree.map(np.asarray, state.replace(key=jax.random.key_data(state.key))))
    traj = jax.tree.map(lambda *xs: np.stack(xs), *traj)
    obs_size = env.observation_size
    assert starts[0].shape == (*lead, obs_size) and starts[0].dtype == np.float32
    assert traj.obs.shape == traj.final_obs.shape == (horizon, *lead, obs_size)
    assert traj.reward.shape == traj.terminated.shape == (horizon, *lead)
    assert traj.obs.dtype == traj.reward.dtype == np.float32
    for leaf in jax.tree.leaves((traj.obs, traj.final_obs, traj.reward, traj.metrics)):
        assert np.all(np.isfinite(leaf))
    # Different envs in the batch start differently (independent reset noise).
    assert not np.allclose(starts[0][0], starts[0][1])

    done = traj.terminated | traj.truncated
    assert done.any(), "the time limit must end episodes inside the rollout"
    assert np.all(traj.steps[done] == 0), "a finished episode restarts at step 0"
    assert np.all(traj.steps <= limit)
    np.testing.assert_array_equal(traj.obs[~done], traj.final_obs[~done])
    assert np.all(np.any(traj.obs[done] != traj.final_obs[done], axis=-1)), "final_obs kept"
    assert not np.any(traj.truncated & ~done)
    # Each new episode starts from fresh reset noise, not from a cached first state.
    restarts = traj.obs[done]
    assert len(restarts) < 2 or not np.allclose(restarts[0], restarts[1])


class Drift:
    """A physics-free stand-in with the Env interface, to test the wrappers' logic alone:
    the observation is a position that each action moves; past 1.0 the episode ends."""

    episode_length = 1000
    observation_size = action_size = 1

    def reset(self, key):
        obs = jax.random.uniform(key, (1,), minval=-0.1, maxval=0.1)
        zero = jnp.zeros(())
        return envs.State(
            data=obs, obs=obs, reward=zero, terminated=jnp.zeros((), bool),
            truncated=jnp.zeros((), bool), final_obs=obs, steps=jnp.zeros((), jnp.int32),
            key=key, metrics={"position": zero},
        )  # fmt: skip

    def step(self, state, action):
        obs = state.data + action
        return state.replace(
            data=obs, obs=obs, final_obs=obs, reward=obs[0], terminated=obs[0] > 1.0,
            truncated=jnp.zeros((), bool), steps=state.steps + 1, metrics={"position": obs[0]},
        )  # fmt: skip


def test_auto_reset_keeps_the_terminal_step():
    """The wrapped step's ``final_obs``, reward, flags and metrics are the bare step's; the
    new episode's observation, data and step count are a fresh reset's."""
    base = Drift()
    wrapped = envs.AutoReset(envs.TimeLimit(base, episode_length=3))
    state = base.reset(jax.random.key(3))
    _, reset_key = jax.random.split(state.key)
    fresh = base.reset(reset_key)
    # Truncation: the third step hits the time limit.
    at_limit = state.replace(steps=jnp.asarray(2, jnp.int32))
    bare, out = base.step(at_limit, jnp.ones(1) * 0.2), wrapped.step(at_limit, jnp.ones(1) * 0.2)
    np.testing.assert_array_equal(out.final_obs, bare.obs)
    assert float(out.reward) == float(bare.reward)
    assert float(out.metrics["position"]) == float(bare.metrics["position"])
    assert bool(out.truncated) and not bool(out.terminated)
    np.testing.assert_array_equal(out.obs, fresh.obs)
    np.testing.assert_array_equal(out.data, fresh.data)
    assert int(out.steps) == 0
    assert not np.array_equal(out.key, state.key), "each reset draws new randomness"
    # Termination before the limit.
    out = wrapped.step(state, jnp.ones(1) * 2.0)
    assert bool(out.terminated) and not bool(out.truncated)
    assert float(out.final_obs[0]) > 1.0
    np.testing.assert_array_equal(out.obs, fresh.obs)
    # Neither: nothing is reset and the episode goes on.
    out = wrapped.step(state, jnp.ones(1) * 0.2)
    np.testing.assert_array_equal(out.obs, out.final_obs)
    assert int(out.steps) == 1 and not bool(out.truncated | out.terminated)


def test_vmap_wrapper_batches_independent_envs():
    env = envs.VmapEnv(envs.AutoReset(envs.TimeLimit(Drift(), 2)), num_envs=4)
    state = env.reset(jax.random.key(0))
    assert state.obs.shape == (4, 1) and len(np.unique(np.asarray(state.obs))) == 4
    state = env.step(state, jnp.asarray([[0.0], [0.5], [2.0], [0.0]]))
    np.testing.assert_array_equal(np.asarray(state.terminated), [False, False, True, False])
    state = env.step(state, jnp.zeros((4, 1)))
    # envs 0, 1 and 3 hit the limit of 2 steps; env 2 restarted a step ago.
    np.testing.assert_array_equal(np.asarray(state.truncated), [True, True, False, True])
    np.testing.assert_array_equal(np.asarray(state.steps), [0, 0, 1, 0])
    with pytest.raises(ValueError, match="num_envs must be positive"):
        envs.VmapEnv(Drift(), 0)
    with pytest.raises(ValueError, match="episode_length must be positive"):
        envs.TimeLimit(Drift(), -1)


@pytest.mark.parametrize("name", envs.NAMES)
def test_reset_noise_follows_gymnasium(name):
    """qpos: uniform in +-scale around qpos0 on every task; qvel: uniform likewise, except
    HalfCheetah and Ant, which draw scale * standard normal (Gymnasium v5). Sampled by
    ``Env._sample_init``, which ``Env.reset`` calls for every task: drawing through the
    whole reset compiled each task's forward kinematics for nothing (Humanoid: 25 s)."""
    env = envs.make(name)
    qpos, qvel = jax.jit(jax.vmap(env._sample_init))(jax.random.split(jax.random.key(0), 4000))
    scale = env.reset_noise_scale
    dq = np.asarray(qpos) - np.asarray(env.mj_model.qpos0)
    dv = np.asarray(qvel)
    assert np.abs(dq).max() <= scale * (1 + 1e-5)
    np.testing.assert_allclose(dq.std(0), scale / np.sqrt(3), rtol=0.1)  # uniform's std
    if name in ("HalfCheetah", "Ant"):
        np.testing.assert_allclose(dv.std(0), scale, rtol=0.1)
        assert np.abs(dv).max() > 2 * scale
    else:
        assert np.abs(dv).max() <= scale * (1 + 1e-5)
        np.testing.assert_allclose(dv.std(0), scale / np.sqrt(3), rtol=0.1)


def test_brax_adapter_runs_our_task_under_brax_wrappers():
    """Brax's training wrappers (vmap, episode limit, auto-reset) drive our env through
    the adapter: same observations and rewards as our env with the action mapped from
    [-1, 1] onto the control range; termination becomes ``done``."""
    from brax.envs.wrappers import training as brax_training

    from envs.brax_adapter import BraxEnv

    env = envs.make("InvertedPendulum")
    # EvalWrapper (Brax's evaluator) adds a metric of its own, which must survive steps.
    brax_env = brax_training.EvalWrapper(brax_training.wrap(BraxEnv(env), episode_length=4))
    assert (brax_env.observation_size, brax_env.action_size) == (4, 1)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)  # Brax passes raw uint32 keys
    state = jax.jit(brax_env.reset)(keys)
    step = jax.jit(brax_env.step)
    ours = jax.vmap(env.reset)(keys)
    np.testing.assert_allclose(state.obs, ours.obs)
    ours_step = jax.jit(jax.vmap(env.step))
    for i, action in enumerate((0.5, -1.0, 1.0, 0.25)):
        actions = jnp.full((2, 1), action)
        state = step(state, actions)
        ours = ours_step(ours, envs.scale_action(env, actions))  # 3 * action on this task
        np.testing.assert_allclose(state.reward, ours.reward)
        at_limit = i + 1 == 4  # Brax's episode wrapper ends episodes at the limit
        expected = np.asarray(ours.terminated) | at_limit
        np.testing.assert_array_equal(state.done, expected.astype(np.float32))
        np.testing.assert_array_equal(state.info["truncation"], at_limit & ~ours.terminated)
        if not expected.any():  # before Brax's auto-reset replaces the observation
            np.testing.assert_allclose(state.obs, ours.obs, rtol=1e-6)
    assert "reward" in state.metrics and "reward_survive" in state.metrics
