"""Replay buffer and observation normalizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mjxsac import buffer as replay
from mjxsac import normalizer as obs_norm
from mjxsac.losses import Transition


def rows(start: int, n: int, obs_size: int = 3, action_size: int = 2) -> Transition:
    """Rows whose every field encodes the row's serial number."""
    ids = jnp.arange(start, start + n, dtype=jnp.float32)
    return Transition(
        obs=jnp.repeat(ids[:, None], obs_size, 1),
        action=jnp.repeat(ids[:, None], action_size, 1) / 1000,
        reward=ids,
        next_obs=jnp.repeat(ids[:, None], obs_size, 1) + 0.5,
        terminated=(ids % 2) == 0,
    )


def test_shapes_and_dtypes():
    buf = replay.init(10, 3, 2)
    assert buf.capacity == 10
    assert buf.data.obs.shape == buf.data.next_obs.shape == (10, 3)
    assert buf.data.action.shape == (10, 2)
    assert buf.data.reward.shape == buf.data.terminated.shape == (10,)
    assert buf.data.terminated.dtype == jnp.bool_
    assert replay.row_bytes(3, 2) == 4 * (3 + 2 + 1 + 3) + 1
    batch = replay.sample(replay.insert(buf, rows(0, 4)), jax.random.key(0), 7)
    assert batch.obs.shape == (7, 3) and batch.reward.shape == (7,)


def test_wraparound_overwrites_the_oldest_rows():
    buf = replay.init(10, 3, 2)
    insert = jax.jit(replay.insert)
    for start in range(0, 24, 4):  # 6 inserts of 4 rows into 10 slots
        buf = insert(buf, rows(start, 4))
    assert int(buf.size) == 10
    assert int(buf.index) == 24 % 10
    # Slots hold serial numbers 20..23 at 0..3 and 14..19 at 4..9.
    np.testing.assert_array_equal(buf.data.reward, [20, 21, 22, 23, 14, 15, 16, 17, 18, 19])
    np.testing.assert_array_equal(buf.data.obs[:, 0], buf.data.reward)
    np.testing.assert_array_equal(buf.data.next_obs[:, 0], buf.data.reward + 0.5)
    np.testing.assert_array_equal(buf.data.terminated, buf.data.reward % 2 == 0)
    with pytest.raises(ValueError, match="cannot insert 11 rows"):
        replay.insert(buf, rows(0, 11))


def test_sampling_only_from_filled_rows():
    buf = replay.insert(replay.init(100, 3, 2), rows(1, 7))  # serials 1..7 in slots 0..6
    batch = jax.jit(replay.sample, static_argnums=2)(buf, jax.random.key(1), 5000)
    got = np.asarray(batch.reward)
    assert set(np.unique(got)) == set(range(1, 8)), "all filled rows, and only those"
    counts = np.bincount(got.astype(int))[1:]
    assert counts.min() > 5000 / 7 * 0.8, "uniform over filled rows"
    # Fields of a sampled row stay together.
    np.testing.assert_array_equal(batch.obs[:, 0], batch.reward)
    np.testing.assert_array_equal(batch.next_obs[:, 0], batch.reward + 0.5)


def test_normalizer_matches_numpy_over_batches():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(300, 4)).astype(np.float32)
    stats = obs_norm.init(4)
    for chunk in np.split(data, [10, 50, 51, 200]):
        stats = obs_norm.update(stats, jnp.asarray(chunk))
    assert float(stats.count) == 300
    np.testing.assert_allclose(stats.mean, data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.var, data.var(0), rtol=1e-4)
    z = obs_norm.normalize(stats, jnp.asarray(data))
    np.testing.assert_allclose(np.mean(z, 0), 0, atol=1e-4)
    np.testing.assert_allclose(np.std(z, 0), 1, rtol=1e-3)


def test_normalizer_edge_cases():
    stats = obs_norm.init(2)
    x = jnp.asarray([[5.0, -1.0]])
    np.testing.assert_array_equal(obs_norm.normalize(stats, x), x)  # no data yet: identity
    stats = obs_norm.update(stats, jnp.asarray([[1.0, 0.0], [1.0, 0.0]]))  # constant data
    assert np.all(np.abs(obs_norm.normalize(stats, x)) <= obs_norm.CLIP)
    off = obs_norm.update(obs_norm.init(2, enabled=False), x)
    np.testing.assert_array_equal(obs_norm.normalize(off, x), x)
    assert float(off.count) == 0
