"""The replay buffer: one fixed-size device array per field, written circularly.

No flattening, no rolling: ``insert`` writes rows at ``(index + arange(n)) % capacity``
and ``sample`` draws uniformly from the rows written so far. The whole buffer is a pytree
inside the ``TrainState`` and is donated to each compiled chunk.

Each train step inserts one row per env, in env order, so the buffer is also each env's
transitions in time order: the row after row ``p`` in env time is ``(p + num_envs) %
capacity``. ``sample_n_step`` reads n-step windows along that stride (docs/DESIGN.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from mjxsac.losses import Transition


@struct.dataclass
class ReplayBuffer:
    data: Transition
    """Each field has a leading axis of length ``capacity``."""
    index: jax.Array
    """Row the next insert writes first."""
    size: jax.Array
    """Rows holding data (grows to ``capacity``, then stays)."""
    done: jax.Array | None = None
    """n-step returns only: per row, whether its step ended the episode (terminated or
    truncated), so that an n-step window stops there."""

    @property
    def capacity(self) -> int:
        return self.data.reward.shape[0]


def transition_spec(obs_size: int, action_size: int) -> Transition:
    """Shapes and dtypes of one row."""
    f32 = jnp.float32
    return Transition(
        obs=jax.ShapeDtypeStruct((obs_size,), f32),
        action=jax.ShapeDtypeStruct((action_size,), f32),
        reward=jax.ShapeDtypeStruct((), f32),
        next_obs=jax.ShapeDtypeStruct((obs_size,), f32),
        terminated=jax.ShapeDtypeStruct((), jnp.bool_),
    )


def row_bytes(obs_size: int, action_size: int, with_done: bool = False) -> int:
    """Device bytes per stored transition (with the episode-end flag of n-step returns)."""
    spec = transition_spec(obs_size, action_size)
    fields = sum(x.dtype.itemsize * math.prod(x.shape) for x in jax.tree.leaves(spec))
    return fields + (jnp.dtype(jnp.bool_).itemsize if with_done else 0)


def init(capacity: int, obs_size: int, action_size: int, with_done: bool = False) -> ReplayBuffer:
    """An empty buffer; ``with_done``: with the episode ends (n-step returns)."""
    spec = transition_spec(obs_size, action_size)
    data = jax.tree.map(lambda s: jnp.zeros((capacity, *s.shape), s.dtype), spec)
    # Distinct arrays: the buffer is donated, and one array cannot be donated twice.
    index, size = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    if with_done:
        done = jnp.zeros((capacity,), jnp.bool_)
        return ReplayBuffer(data=data, index=index, size=size, done=done)
    return ReplayBuffer(data=data, index=index, size=size)


def insert(buffer: ReplayBuffer, rows: Transition, done: jax.Array | None = None) -> ReplayBuffer:
    """Append a batch of rows (leading axis n <= capacity), overwriting the oldest.
    ``done`` (n,), whether each row's step ended its episode, is required exactly when the
    buffer stores it."""
    n = rows.reward.shape[0]
    capacity = buffer.capacity
    if n > capacity:
        raise ValueError(f"cannot insert {n} rows into a buffer of {capacity}")
    if (done is None) != (buffer.done is None):
        raise ValueError("pass done exactly when the buffer stores it (n-step returns)")
    idx = (buffer.index + jnp.arange(n)) % capacity
    data = jax.tree.map(lambda column, new: column.at[idx].set(new), buffer.data, rows)
    ends = {} if done is None else {"done": buffer.done.at[idx].set(done)}
    return buffer.replace(
        data=data,
        index=(buffer.index + n) % capacity,
        size=jnp.minimum(buffer.size + n, capacity),
        **ends,
    )


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Transition:
    """``batch_size`` rows drawn uniformly (with replacement) from the filled rows."""
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree.map(lambda column: column[idx], buffer.data)


def sample_n_step(
    buffer: ReplayBuffer,
    key: jax.Array,
    batch_size: int,
    n: int,
    stride: int,
    gamma: jax.Array,
) -> tuple[Transition, jax.Array]:
    """``batch_size`` n-step windows (see ``windows``) whose first rows are drawn as
    ``sample`` draws rows: with the same key, the same rows."""
    start = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return windows(buffer, start, n, stride, gamma)


def windows(
    buffer: ReplayBuffer, start: jax.Array, n: int, stride: int, gamma: jax.Array
) -> tuple[Transition, jax.Array]:
    """The n-step windows that begin at rows ``start``, and their lengths k.

    ``stride`` is the number of rows one insert writes (``num_envs``): the window of row
    ``p`` is rows ``p, p + stride, ...`` (mod capacity), the same env's next steps. A
    window holds k <= n rows: it ends after the first row whose step ended the episode
    (``done``), and at the newest row written, so it never runs past the write index into
    older rows. ``reward`` is ``sum_{i<k} gamma^i r_i``; ``next_obs`` and ``terminated``
    are the last row's (for a truncation, the final observation: the target bootstraps);
    the target discounts the bootstrap by ``gamma ** k``. Costs 2n gathers of a scalar per
    window plus one per field, whatever the capacity.
    """
    if buffer.done is None:
        raise ValueError("n-step windows need a buffer that stores done (with_done=True)")
    capacity = buffer.capacity
    newer = (buffer.index - 1 - start) % capacity  # rows written after the first one
    reward = jnp.zeros(start.shape, buffer.data.reward.dtype)
    discount = jnp.ones_like(reward)
    last, k = start, jnp.ones(start.shape, jnp.int32)
    ended = jnp.zeros(start.shape, jnp.bool_)
    for i in range(n):
        row = (start + i * stride) % capacity
        inside = ~ended & (i * stride <= newer)
        reward = reward + jnp.where(inside, discount * buffer.data.reward[row], 0.0)
        discount = discount * gamma
        last = jnp.where(inside, row, last)
        k = jnp.where(inside, i + 1, k)
        ended = ended | ~inside | buffer.done[row]
    batch = Transition(
        obs=buffer.data.obs[start],
        action=buffer.data.action[start],
        reward=reward,
        next_obs=buffer.data.next_obs[last],
        terminated=buffer.data.terminated[last],
    )
    return batch, k
