"""The replay buffer: one fixed-size device array per field, written circularly.

No flattening, no rolling: ``insert`` writes rows at ``(index + arange(n)) % capacity``
and ``sample`` draws uniformly from the rows written so far. The whole buffer is a pytree
inside the ``TrainState`` and is donated to each compiled chunk.
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


def row_bytes(obs_size: int, action_size: int) -> int:
    """Device bytes per stored transition."""
    spec = transition_spec(obs_size, action_size)
    return sum(x.dtype.itemsize * math.prod(x.shape) for x in jax.tree.leaves(spec))


def init(capacity: int, obs_size: int, action_size: int) -> ReplayBuffer:
    spec = transition_spec(obs_size, action_size)
    data = jax.tree.map(lambda s: jnp.zeros((capacity, *s.shape), s.dtype), spec)
    # Two distinct arrays: the buffer is donated, and one array cannot be donated twice.
    return ReplayBuffer(data=data, index=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def insert(buffer: ReplayBuffer, rows: Transition) -> ReplayBuffer:
    """Append a batch of rows (leading axis n <= capacity), overwriting the oldest."""
    n = rows.reward.shape[0]
    capacity = buffer.capacity
    if n > capacity:
        raise ValueError(f"cannot insert {n} rows into a buffer of {capacity}")
    idx = (buffer.index + jnp.arange(n)) % capacity
    data = jax.tree.map(lambda column, new: column.at[idx].set(new), buffer.data, rows)
    return ReplayBuffer(
        data=data,
        index=(buffer.index + n) % capacity,
        size=jnp.minimum(buffer.size + n, capacity),
    )


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Transition:
    """``batch_size`` rows drawn uniformly (with replacement) from the filled rows."""
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree.map(lambda column: column[idx], buffer.data)
