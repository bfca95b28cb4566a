"""Replay and episodes: n-step windows against a plain-Python reference, desynchronized
time limits, and the start of updates (``learning_starts``).

The n-step buffer is the ordinary circular buffer: each train step writes one row per env
in env order, so an env's next step is ``num_envs`` rows further on (mod capacity). The
reference below knows nothing of that layout: it walks each env's list of steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import scale_action
from mjxsac import buffer as replay
from mjxsac.checkpoint import Checkpoints
from mjxsac.config import FORMAT_VERSION, Config, FormatVersionError
from mjxsac.losses import Transition
from mjxsac.runlog import chunk_summaries
from mjxsac.sac import Trainer, env_steps

OBS, ACT = 2, 1
GAMMA = 0.9
# Episode ends of each env, per step: T terminated, R truncated (bootstraps from the final
# observation), '.' none. The step after an end is the first of a new episode (auto-reset).
ENDS = ["..T....T..R..", "....R...R....", ".T.T.........", "............."]
STEPS, ENVS = len(ENDS[0]), len(ENDS)


def step_rows(t: int) -> tuple[Transition, jax.Array]:
    """The rows of train step ``t``, one per env; every field encodes (t, env)."""
    e = np.arange(ENVS)
    serial = (100 * t + e).astype(np.float32)
    ends = np.array([ENDS[env][t] for env in e])
    rows = Transition(
        obs=jnp.asarray(np.stack([serial, -serial], 1)),
        action=jnp.asarray(serial[:, None] / 1000),
        reward=jnp.asarray(1.0 + t + 0.1 * e, jnp.float32),
        next_obs=jnp.asarray(np.stack([serial + 0.5, -serial - 0.5], 1)),
        terminated=jnp.asarray(ends == "T"),
    )
    return rows, jnp.asarray(ends != ".")


def reference(t: int, env: int, n: int, newest: int) -> tuple[float, float, bool, int]:
    """The n-step window of env ``env`` from step ``t`` (steps up to ``newest`` written):
    reward sum, the serial of the observation it bootstraps from, terminated, k."""
    total, k = 0.0, 0
    for i in range(n):
        s = t + i
        if s > newest:
            break
        total += GAMMA**i * (1.0 + s + 0.1 * env)
        k = i + 1
        if ENDS[env][s] != ".":
            break
    last = t + k - 1
    return total, 100 * last + env + 0.5, ENDS[env][last] == "T", k


def filled(capacity: int, steps: int) -> replay.ReplayBuffer:
    buf = replay.init(capacity, OBS, ACT, with_done=True)
    insert = jax.jit(replay.insert)
    for t in range(steps):
        buf = insert(buf, *step_rows(t))
    return buf


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize(
    ("capacity", "steps"),
    [(60, STEPS), (24, STEPS), (22, STEPS), (60, 9)],
    ids=["roomy", "wrapped", "wrapped-mid-step", "not-full"],
)
def test_every_window_matches_the_reference(n, capacity, steps):
    """Every stored row's window: its reward sum, bootstrap observation, terminated flag
    and k. Windows cross terminations, truncations and auto-resets only as the reference
    does, stop at the newest step, and never run past the write index into the oldest
    rows (with 22 slots and 4 envs, a step's rows straddle the wrap)."""
    buf = filled(capacity, steps)
    rows = jnp.arange(int(buf.size))
    batch, k = jax.jit(replay.windows, static_argnums=(2, 3))(buf, rows, n, ENVS, GAMMA)
    serial = np.asarray(batch.obs[:, 0]).astype(int)
    seen = set()
    for j, (t, env) in enumerate(zip(serial // 100, serial % 100, strict=True)):
        seen.add((t, env))
        total, bootstrap, terminated, length = reference(t, env, n, steps - 1)
        assert int(k[j]) == length, (t, env)
        assert float(batch.reward[j]) == pytest.approx(total, rel=1e-6), (t, env)
        assert float(batch.next_obs[j, 0]) == bootstrap, (t, env)
        assert bool(batch.terminated[j]) == terminated, (t, env)
    # The buffer holds exactly the newest rows (whole steps, and a step cut by the wrap).
    first = steps * ENVS - int(buf.size)
    assert seen == {divmod(s, ENVS) for s in range(first, steps * ENVS)}


def test_windows_stop_at_the_write_index_not_at_stale_rows():
    """After a wrap the rows at and past the write index are the oldest: a window of the
    newest step that went on there would read old steps as if they came next. The newest
    step's windows hold their one row, whatever n."""
    buf = filled(24, STEPS)  # 13 steps of 4 rows in 24 slots: index 52 % 24 = 4
    newest = (int(buf.index) - ENVS + jnp.arange(ENVS)) % buf.capacity
    batch, k = replay.windows(buf, newest, 5, ENVS, GAMMA)
    np.testing.assert_array_equal(k, 1)
    np.testing.assert_array_equal(batch.next_obs[:, 0], 100 * (STEPS - 1) + np.arange(4) + 0.5)


def test_one_step_windows_are_todays_batch():
    """n = 1: the same rows as ``sample`` with the same key, bit for bit, and k = 1."""
    buf = filled(22, STEPS)
    key = jax.random.key(3)
    plain = replay.sample(buf, key, 64)
    batch, k = replay.sample_n_step(buf, key, 64, 1, ENVS, jnp.float32(GAMMA))
    np.testing.assert_array_equal(k, 1)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(batch), strict=True):
        np.testing.assert_array_equal(a, b)


def test_n_step_buffer_layout_and_refusals():
    assert replay.row_bytes(3, 2, with_done=True) == replay.row_bytes(3, 2) + 1
    assert replay.init(4, OBS, ACT).done is None
    buf = replay.init(10, OBS, ACT, with_done=True)
    rows, done = step_rows(0)
    with pytest.raises(ValueError, match="pass done"):
        replay.insert(buf, rows)
    with pytest.raises(ValueError, match="pass done"):
        replay.insert(replay.init(10, OBS, ACT), rows, done)
    with pytest.raises(ValueError, match="stores done"):
        replay.windows(replay.init(10, OBS, ACT), jnp.zeros(1, jnp.int32), 3, ENVS, GAMMA)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"learning_starts": 100, "batch_size": 256}, "learning_starts"),
        ({"learning_starts": 2_000, "buffer_size": 1_000, "warmup_steps": 0}, "learning_starts"),
        ({"n_step": 0}, "n_step"),
        ({"desync_episodes": 1}, "desync_episodes"),
    ],
)
def test_bad_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Config(**fields).validate()


def test_update_start():
    assert Config(warmup_steps=1_000, batch_size=256).update_start == 1_000
    assert Config(warmup_steps=0, batch_size=256).update_start == 256
    assert Config(warmup_steps=10_000, learning_starts=1_000).update_start == 1_000


def test_saved_configs_carry_their_format_version():
    saved = Config().to_saved()
    assert saved["format_version"] == FORMAT_VERSION and Config.from_saved(saved) == Config()
    for version in (None, 0, FORMAT_VERSION + 1):
        other = {k: v for k, v in saved.items() if k != "format_version"}
        other |= {} if version is None else {"format_version": version}
        with pytest.raises(FormatVersionError, match=rf"reads format version {FORMAT_VERSION}"):
            Config.from_saved(other)
    del saved["n_step"]  # a config that lost a field is damaged, not older
    with pytest.raises(ValueError, match="lacks 1 fields"):
        Config.from_saved(saved)


def truncations(trainer: Trainer, steps: int):
    """A function of a TrainState: its members' envs' truncation flags over ``steps``
    steps with zero actions, (member, step, env)."""
    members, num_envs = trainer.population_size, trainer.config.num_envs
    action = scale_action(trainer.env, jnp.zeros((members, num_envs, trainer.action_size)))

    def step(s, _):
        s = trainer.step_envs(trainer.train_env, s, action)
        return s, s.truncated

    def run(state):
        return jnp.swapaxes(jax.lax.scan(step, state.env_state, None, length=steps)[1], 0, 1)

    return jax.jit(run)


def test_desynchronized_episodes_truncate_on_many_steps():
    """64 Swimmer envs (no terminations) with a time limit of 50: desynchronized, the
    first truncations spread over many steps and every later episode runs the full 50;
    synchronized (all counters 0, as without the option), all 64 truncate on steps 50 and
    100. The two members' counters differ."""
    config = Config(env="Swimmer", num_envs=64, episode_length=50, seeds="0-1",
                    hidden_sizes=(8,), buffer_size=2_000, batch_size=64,
                    desync_episodes=True)  # fmt: skip
    trainer = Trainer(config)
    rollout = truncations(trainer, 120)
    state = trainer.init()
    counters = np.asarray(state.env_state.steps)
    assert counters.shape == (2, 64) and counters.min() >= 0 and counters.max() < 50
    assert not np.array_equal(counters[0], counters[1]), "each member draws its own"
    truncated = np.asarray(rollout(state))
    for m in range(2):
        steps_of = [np.flatnonzero(truncated[m, :, e]) + 1 for e in range(64)]
        first = np.array([s[0] for s in steps_of])
        np.testing.assert_array_equal(first, 50 - counters[m])
        assert len(set(first)) > 25, "spread over many steps, not one"
        for s in steps_of:
            np.testing.assert_array_equal(np.diff(s), 50)
    zero = state.replace(env_state=state.env_state.replace(steps=jnp.zeros_like(counters)))
    truncated = np.asarray(rollout(zero))
    assert set(np.flatnonzero(truncated.any(axis=(0, 2))) + 1) == {50, 100}
    assert truncated[:, [49, 99]].all()


def test_n_step_population_trains_from_learning_starts(tmp_path, compile_count):
    """Two members with 3-step returns: updates start at the first train step whose buffer
    holds ``learning_starts`` (200: step 13, 208 transitions), while random actions last
    until ``warmup_steps`` (600: step 38); the losses are finite, a second chunk does not
    compile, and a checkpoint restores the buffer (episode ends included) or an empty one."""
    config = Config(env="InvertedPendulum", num_envs=16, seeds="0-1", n_step=3,
                    learning_starts=200, warmup_steps=600, batch_size=64, buffer_size=4_000,
                    hidden_sizes=(32, 32), updates_per_step=1, steps_per_chunk=24,
                    desync_episodes=True)  # fmt: skip
    trainer = Trainer(config)
    state, first = trainer.train_chunk(trainer.init())
    before = compile_count()
    state, second = trainer.train_chunk(state)
    jax.block_until_ready(state)
    assert compile_count() == before
    updated = np.concatenate([first["updated"], second["updated"]])  # (train step, member)
    np.testing.assert_array_equal(updated, np.repeat(np.arange(48)[:, None] >= 12, 2, 1))
    np.testing.assert_array_equal(state.updates, [36, 36])
    for summary in chunk_summaries(second):
        losses = [v for k, v in summary.items() if k.startswith("loss/")]
        assert losses and np.all(np.isfinite(losses)), summary
    assert bool(state.buffer.done.any()), "the episodes' ends are stored"

    ckpt = Checkpoints(tmp_path / "checkpoints", async_save=False)
    ckpt.save(state, config, True)
    restored = ckpt.restore(trainer)
    for a, b in zip(jax.tree.leaves(state.buffer), jax.tree.leaves(restored.buffer), strict=True):
        np.testing.assert_array_equal(a, b)
    later = dataclasses.replace(state, env_steps=state.env_steps + 1)
    ckpt.save(later, config, False)
    empty = ckpt.restore(trainer).buffer
    assert env_steps(later) == ckpt.latest()
    assert empty.done.shape == (2, 4_000) and not empty.done.any() and not empty.size.any()
    ckpt.close()
