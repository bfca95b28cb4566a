"""Parity against Gymnasium's own v5 environments (C MuJoCo), in float64.

Gymnasium is the reference no one here wrote. Our physics step corrects MJX where it
departs from C MuJoCo (``envs/physics.py``), so every task but Humanoid matches to
rounding; Humanoid's XML asks for the PGS solver, which MJX lacks, so it is checked tightly
against C MuJoCo with Newton and within the measured PGS-vs-Newton gap against Gymnasium
(``docs/ENVIRONMENTS.md`` has the numbers).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import envs
from envs.base import PhysicsOptions, healthy_between
from envs.parity import compiled, gym_env, one_step_parity, record_one_step, trajectory_parity

TERMINATING = ("Hopper", "Walker2d", "Ant", "Humanoid")
# Trajectory parity: (steps checked, tolerance). Each simulator runs on its own, so
# one-step rounding errors (1e-15) grow where the dynamics are chaotic: HalfCheetah's
# grow about tenfold every 5-10 steps (1e-12 at step 20, 1e-3 to 1e-1 at step 100),
# Ant's reach 3e-8 by step 100; two Gymnasium runs whose initial velocities differ by
# 1e-13 separate just as fast (test_half_cheetah_is_chaotic_in_gymnasium_too).
TRAJECTORY = {"HalfCheetah": (20, 1e-8), "Ant": (100, 1e-6)}
# Held-out states (seed, step of a uniform-random-action record) where the solver needs
# more than 4 iterations: at caps 4 / 4 their relative observation errors were 9e-3 to
# 8e-2. The default caps must keep them within the criterion that chose the caps
# (relative observation error 1e-6; python -m launch.fidelity --long, docs/ENVIRONMENTS.md).
HARD_STATES = {
    "Walker2d": ((1007, 1491), (1004, 109), (1003, 894), (1002, 209), (1006, 1489)),
    "HalfCheetah": ((1007, 350), (1007, 456), (1009, 1757)),
}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def check_one_step(env, record, tol_obs, tol_reward, hard=()):
    """``record`` within the absolute tolerances; the ``hard`` states (stepped in the same
    batch: one compiled program) within the caps' relative criterion, 1e-6."""
    diffs = one_step_parity(env, [*record, *hard])
    n = len(record)
    assert diffs["obs"][:n].max() < tol_obs
    assert diffs["reward"][:n].max() < tol_reward
    for key in env.metric_names:
        assert diffs[key][:n].max() < tol_reward, key
    assert not diffs["terminated"].any()
    if hard:
        scale = np.abs(np.stack([r.obs for r in hard])).max(axis=1)
        relative = diffs["obs"][n:].max(axis=1) / scale
        assert relative.max() < 1e-6, relative


def check_trajectories(env, name, steps, tol, physics=None):
    for seed in range(3):
        traj = trajectory_parity(env, name, steps=steps, seed=seed, physics=physics)
        per_step = traj["obs"].max(axis=1)
        assert per_step[0] < 1e-13, "reset observations agree"
        assert per_step.max() < tol, (seed, per_step)
        assert traj["reward"].max() < tol
    check_compact_steps(env)


def check_compact_steps(env, steps=12):
    """Every step taken from the state's compact form (``Env.compact``, what the training
    loop carries) expanded again gives the same bits as the step from the full state: the
    step reads nothing but ``STEP_INPUTS`` and the task's ``before_fields``. The same
    compiled step as the trajectories' (x64), so this costs no compilation."""
    reset_to, step = compiled(env)
    round_trip = jax.jit(lambda data: env.expand(env.compact(data)))
    state = reset_to(np.asarray(env.init_qpos), np.asarray(env.init_qvel))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        action = rng.uniform(env.action_low, env.action_high).astype(np.float64)
        from_compact = step(state.replace(data=round_trip(state.data)), action)
        state = step(state, action)
        for got, want in zip(jax.tree.leaves(from_compact), jax.tree.leaves(state), strict=True):
            if not jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", [n for n in envs.NAMES if n != "Humanoid"])
def test_parity_with_gymnasium(name, x64):
    """Same XML, same options: our step matches C MuJoCo to rounding, step for step."""
    env = envs.make(name)
    record = record_one_step(name, steps=200, seed=0)
    if name in TERMINATING:
        assert any(r.terminated for r in record), "the record must contain terminations"
    hard = [record_one_step(name, step + 1, seed)[-1] for seed, step in HARD_STATES.get(name, ())]
    check_one_step(env, record, tol_obs=1e-9, tol_reward=1e-9, hard=hard)
    steps, tol = TRAJECTORY.get(name, (100, 1e-8))
    check_trajectories(env, name, steps, tol)


def test_parity_humanoid(x64):
    env = envs.make("Humanoid")
    newton = PhysicsOptions(solver="newton")
    # Against C MuJoCo running the same solver: rounding only. (100 steps hold 4
    # terminations; each step of the record is one call of the float64 step.)
    record = record_one_step("Humanoid", steps=100, seed=0, physics=newton)
    assert any(r.terminated for r in record)
    check_one_step(env, record, tol_obs=1e-9, tol_reward=1e-9)
    check_trajectories(env, "Humanoid", 100, 1e-8, physics=newton)
    # Against Gymnasium's own Humanoid-v5 (PGS): the solvers converge to slightly
    # different contact forces. Measured over 200 steps: cfrc_ext entries (newtons) up to
    # 3.3e-3, qvel up to 1.4e-5, reward up to 4.8e-6, no termination mismatch (the test
    # checks the first 100).
    record = record_one_step("Humanoid", steps=100, seed=0)
    check_one_step(env, record, tol_obs=2e-2, tol_reward=1e-4)


def test_half_cheetah_is_chaotic_in_gymnasium_too():
    """Why HalfCheetah's trajectory parity holds for 20 steps only: C MuJoCo itself
    separates two runs whose initial velocities differ by 1e-13 just as fast."""
    runs = []
    for eps in (0.0, 1e-13):
        gym = gym_env("HalfCheetah")
        gym.reset(seed=0)
        gym.set_state(gym.data.qpos.copy(), gym.data.qvel.copy() + eps)
        rng = np.random.default_rng(0)
        runs.append(np.asarray([gym.step(rng.uniform(-1, 1, 6))[0] for _ in range(100)]))
    gap = np.abs(runs[0] - runs[1]).max(axis=1)
    assert gap[:10].max() < 1e-9
    assert gap[-1] > 1e-6


@pytest.mark.parametrize("name", TERMINATING)
def test_termination_matches_gymnasium(name, x64):
    """Health checks at and around the boundaries of Gymnasium's healthy ranges."""
    env = envs.make(name)
    gym = gym_env(name)
    nv = env.mj_model.nv
    z_index = {"Hopper": 1, "Walker2d": 1, "Ant": 2, "Humanoid": 2}[name]
    low_z, high_z = env.healthy_z_range

    def state(z=1.25, angle=None, qvel=None):
        qpos = np.array(env.mj_model.qpos0, np.float64)
        qpos[z_index] = z
        if angle is not None:
            qpos[2] = angle
        return qpos, np.zeros(nv) if qvel is None else qvel

    candidates = [
        state(z)
        for z in (low_z - 1e-3, low_z, low_z + 1e-3, 1.25, high_z - 1e-3, high_z, high_z + 1e-3)
        if np.isfinite(z)
    ]
    if name in ("Hopper", "Walker2d"):
        low_a, high_a = env.healthy_angle_range
        candidates += [state(angle=a) for a in (low_a - 1e-3, low_a, high_a, high_a + 1e-3, 0)]
    if name == "Hopper":  # every other state entry must stay inside (-100, 100)
        for v in (99.0, 100.0, 150.0):
            candidates.append(state(qvel=np.eye(nv)[4] * v))
    if name == "Ant":  # a non-finite state is unhealthy
        qvel = np.zeros(nv)
        qvel[3] = np.inf
        candidates.append(state(z=0.5, qvel=qvel))
    outcomes = set()
    for qpos, qvel in candidates:
        gym.data.qpos[:], gym.data.qvel[:] = qpos, qvel
        expected = not gym.is_healthy
        data = env._data0.replace(qpos=qpos, qvel=qvel)
        _, terminated, _ = env._reward(data, data, np.zeros(env.action_size))
        assert bool(terminated) == expected, (qpos, qvel)
        outcomes.add(expected)
    assert outcomes == {True, False}


def test_healthy_between_bounds():
    x = np.array([0.0, 1.0, 2.0])
    np.testing.assert_array_equal(healthy_between(x, 0.0, 2.0), [False, True, False])
    np.testing.assert_array_equal(healthy_between(x, 0.0, 2.0, inclusive=True), [True] * 3)


def test_the_caps_check_chooses_the_cheapest_cap_that_passes(tmp_path, x64):
    """``launch.fidelity --long``: the ladder's rule, and a short end-to-end run."""
    from launch import fidelity

    def row(caps, source, above, as_xml=0):
        return {"task": "T", "caps": caps, "caps_option": caps, "source": source,
                "above_1e-6": above, "above_1e-6_as_xml": as_xml}  # fmt: skip

    rows = [row("4 / 4", "random", 3), row("4 / 4", "policy", 0),
            row("8 / 4", "random", 2, as_xml=2), row("8 / 4", "policy", 0)]  # fmt: skip
    assert fidelity.choose(rows) == {"T": "8 / 4"}  # misses the XML's caps share still pass
    rows[2]["above_1e-6_as_xml"] = 1
    assert fidelity.choose(rows) == {"T": None}
    out = tmp_path / "long.json"
    argv = ["--long", "--tasks", "InvertedPendulum", "--seeds", "1000", "--steps", "30"]
    (result,) = fidelity.main([*argv, "--caps", "4/4", "--out", str(out)])
    assert (result["caps"], result["steps"], result["above_1e-6"]) == ("4 / 4", 30, 0)
    assert result["relative_max"] < 1e-12 and result["is_default"]
    assert fidelity.json.loads(out.read_text())["rows"] == [result]


@pytest.mark.parametrize("name", envs.NAMES)
def test_our_models_are_gymnasiums_without_deprecation_warnings(name, capfd):
    """Our XMLs compile without MuJoCo's deprecation warnings (HalfCheetah's
    ``settotalmass`` became a geom density) into Gymnasium's models: same masses,
    inertias and inertial frames to float rounding."""
    capfd.readouterr()
    ours = envs.make(name).mj_model
    assert "deprecated" not in "".join(capfd.readouterr()).lower()
    theirs = gym_env(name).model
    for field in ("body_mass", "body_inertia", "body_ipos", "body_iquat", "body_subtreemass"):
        a, b = getattr(ours, field), getattr(theirs, field)
        assert np.abs(a - b).max() <= 1e-15 * np.abs(b).max(), field
