"""Flax networks: the tanh-squashed Gaussian actor, twin Q critics, the V network of v1.

Actions live in the box [-1, 1]^|A| here; the trainer maps them onto each task's control
range. Entropies and log-probabilities are therefore measured in that box, as in the
papers' code (softlearning normalizes the action space the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "relu": nn.relu,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
}


class MLP(nn.Module):
    """Hidden layers with an activation (and optionally LayerNorm), then a linear head.

    ``dtype`` is the dtype of the matrix products (inputs and kernels are cast to it);
    parameters stay float32, LayerNorm computes in float32, and the output is float32."""

    hidden_sizes: Sequence[int]
    out_size: int
    activation: str = "relu"
    layer_norm: bool = False
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for width in self.hidden_sizes:
            x = nn.Dense(width, dtype=self.dtype)(x)
            if self.layer_norm:
                x = nn.LayerNorm(dtype=jnp.float32)(x)
            x = act(x)
        return nn.Dense(self.out_size, dtype=self.dtype)(x).astype(jnp.float32)


class Actor(nn.Module):
    """Outputs the mean and the clamped log standard deviation of the pre-tanh Gaussian."""

    hidden_sizes: Sequence[int]
    action_size: int
    activation: str = "relu"
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    log_std_clamp: str = "smooth"
    dtype: str = "float32"

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = MLP(self.hidden_sizes, 2 * self.action_size, self.activation, dtype=self.dtype)(obs)
        mean, log_std = jnp.split(out, 2, axis=-1)
        if self.log_std_clamp == "hard":  # the authors' clip; no gradient outside
            return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)
        # A smooth clamp: gradients never vanish at the bounds, unlike clip.
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (
            jnp.tanh(log_std) + 1.0
        )
        return mean, log_std


class DoubleQ(nn.Module):
    """Two independent Q networks evaluated in one call: output shape (2, ...batch), or
    (2, ...batch, num_atoms) logits of categorical critics when ``num_atoms`` > 1."""

    hidden_sizes: Sequence[int]
    activation: str = "relu"
    layer_norm: bool = False
    num_critics: int = 2
    num_atoms: int = 1
    dtype: str = "float32"

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        ensemble = nn.vmap(
            MLP,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.num_critics,
        )
        q = ensemble(
            self.hidden_sizes, self.num_atoms, self.activation, self.layer_norm, self.dtype
        )(jnp.concatenate([obs, action], axis=-1))
        return q[..., 0] if self.num_atoms == 1 else q


class Value(nn.Module):
    """The state-value network V(s) of SAC v1."""

    hidden_sizes: Sequence[int]
    activation: str = "relu"
    layer_norm: bool = False
    dtype: str = "float32"

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return MLP(self.hidden_sizes, 1, self.activation, self.layer_norm, self.dtype)(obs)[..., 0]


def sample_action(
    mean: jax.Array, log_std: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Reparameterized sample ``a = tanh(mean + std * eps)`` and its log-probability,
    including the change-of-variables correction ``-sum log(1 - tanh(u)^2)``."""
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    u = mean + jnp.exp(log_std) * eps
    gaussian = -0.5 * (eps**2 + jnp.log(2.0 * jnp.pi)) - log_std
    # log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2u)), stable for large |u|.
    squash = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.tanh(u), jnp.sum(gaussian - squash, axis=-1)


def deterministic_action(mean: jax.Array) -> jax.Array:
    """The evaluation action: the squashed mean."""
    return jnp.tanh(mean)
