"""Running observation statistics (mean and variance), merged batch by batch.

The same statistics normalize observations when acting, when learning from replayed
transitions (stored raw) and in evaluation; they are saved with the policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

EPS = 1e-8
CLIP = 10.0
"""Normalized observations are clipped to [-CLIP, CLIP]: an entry that was nearly constant
so far (a contact force of a body that never touched the ground) would otherwise blow up."""


@struct.dataclass
class Normalizer:
    count: jax.Array
    mean: jax.Array
    m2: jax.Array
    """Sum of squared deviations from the mean (Chan et al.'s parallel update)."""
    enabled: bool = struct.field(pytree_node=False, default=True)

    @property
    def var(self) -> jax.Array:
        return self.m2 / jnp.maximum(self.count, 1.0)


def init(size: int, enabled: bool = True) -> Normalizer:
    return Normalizer(
        count=jnp.zeros((), jnp.float32),
        mean=jnp.zeros((size,), jnp.float32),
        m2=jnp.zeros((size,), jnp.float32),
        enabled=enabled,
    )


def update(stats: Normalizer, batch: jax.Array, axis_name: str | None = None) -> Normalizer:
    """Merge the statistics of ``batch`` (rows are observations). ``axis_name``: a mesh
    axis over which the batch is split in equal parts (data parallel); the parts'
    statistics are combined first, so every device merges the same whole batch."""
    if not stats.enabled:
        return stats
    n = jnp.asarray(batch.shape[0], jnp.float32)
    batch_mean = jnp.mean(batch, axis=0)
    batch_m2 = jnp.sum(jnp.square(batch - batch_mean), axis=0)
    if axis_name is not None:  # Chan et al.'s merge of equal parts
        part_mean = batch_mean
        batch_mean = jax.lax.pmean(part_mean, axis_name)
        batch_m2 = jax.lax.psum(batch_m2 + n * jnp.square(part_mean - batch_mean), axis_name)
        n = jax.lax.psum(n, axis_name)
    count = stats.count + n
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * n / count
    m2 = stats.m2 + batch_m2 + jnp.square(delta) * stats.count * n / count
    return stats.replace(count=count, mean=mean, m2=m2)


def normalize(stats: Normalizer, obs: jax.Array) -> jax.Array:
    """Standardize ``obs``; the identity while disabled or before any data."""
    if not stats.enabled:
        return obs
    std = jnp.sqrt(stats.var + EPS)
    return jnp.where(stats.count > 0, jnp.clip((obs - stats.mean) / std, -CLIP, CLIP), obs)
