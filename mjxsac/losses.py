"""SAC losses: one pure function each, returning ``(loss, metrics)``.

The losses are generic in the function approximators: ``nets`` carries the apply
functions (see :class:`Nets`), so tests can check the arithmetic against a NumPy
reference with functions whose outputs are known. Conventions:

* ``critic(params, obs, action)`` returns the two Q estimates stacked, shape (2, batch),
  or for categorical (C51) critics their logits over ``Nets.support``, (2, batch, atoms);
  ``q_values`` gives the Q estimates (expected values) of either kind;
* ``actor(params, obs)`` returns ``(mean, log_std)`` of the pre-tanh Gaussian;
* ``value(params, obs)`` returns V(s), shape (batch,) (SAC v1 only);
* targets bootstrap with ``1 - terminated`` from ``next_obs``, which for a truncated
  transition is the stored final observation, so truncation bootstraps;
* ``gamma`` may be a scalar or one discount per row, shape (batch,).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mjxsac.networks import sample_action

Params = Any
Metrics = dict[str, jax.Array]


@struct.dataclass
class Transition:
    """A batch of transitions (one row each); the replay buffer stores these fields."""

    obs: jax.Array
    action: jax.Array
    """In the policy's [-1, 1] box."""
    reward: jax.Array
    next_obs: jax.Array
    """The observation the step produced, before any auto-reset (``State.final_obs``)."""
    terminated: jax.Array


@dataclasses.dataclass(frozen=True)
class Support:
    """The support of categorical critics: ``num_atoms`` values evenly spaced from
    ``v_min`` to ``v_max``."""

    v_min: float
    v_max: float
    num_atoms: int

    def atoms(self) -> jax.Array:
        return jnp.linspace(self.v_min, self.v_max, self.num_atoms)


@struct.dataclass
class Nets:
    """The apply functions of the networks (static: not part of the pytree)."""

    actor: Callable = struct.field(pytree_node=False)
    critic: Callable = struct.field(pytree_node=False)
    value: Callable | None = struct.field(pytree_node=False, default=None)
    support: Support | None = struct.field(pytree_node=False, default=None)
    """Set for categorical (C51) critics: ``critic`` then returns logits over it."""


def q_values(nets: Nets, critic_params: Params, obs: jax.Array, action: jax.Array) -> jax.Array:
    """The critics' Q estimates, (2, batch): a categorical critic's expected value."""
    out = nets.critic(critic_params, obs, action)
    if nets.support is None:
        return out
    return jnp.sum(jax.nn.softmax(out, axis=-1) * nets.support.atoms(), axis=-1)


def combine_critics(q: jax.Array, how: str) -> jax.Array:
    """The critics' estimates (2, batch) reduced to one: their ``min`` or ``mean``."""
    if how == "min":
        return jnp.min(q, axis=0)
    if how == "mean":
        return jnp.mean(q, axis=0)
    raise ValueError(f"unknown way to combine critics {how!r}; valid: min, mean")


def critic_loss_v2(
    critic_params: Params,
    target_critic_params: Params,
    actor_params: Params,
    log_alpha: jax.Array,
    batch: Transition,
    key: jax.Array,
    *,
    nets: Nets,
    gamma: float,
    reward_scale: float,
) -> tuple[jax.Array, Metrics]:
    """Soft Bellman residual with the minimum of the two target Qs and the entropy term."""
    mean, log_std = nets.actor(actor_params, batch.next_obs)
    next_action, next_log_prob = sample_action(mean, log_std, key)
    next_q = jnp.min(nets.critic(target_critic_params, batch.next_obs, next_action), axis=0)
    next_v = next_q - jnp.exp(log_alpha) * next_log_prob
    return _bellman_loss(critic_params, batch, next_v, nets, gamma, reward_scale)


def critic_loss_v1(
    critic_params: Params,
    target_value_params: Params,
    batch: Transition,
    *,
    nets: Nets,
    gamma: float,
    reward_scale: float,
) -> tuple[jax.Array, Metrics]:
    """Q regression onto ``reward_scale * r + gamma * (1 - terminated) * V_target(s')``."""
    next_v = nets.value(target_value_params, batch.next_obs)
    return _bellman_loss(critic_params, batch, next_v, nets, gamma, reward_scale)


def _bellman_loss(critic_params, batch, next_v, nets, gamma, reward_scale):
    not_done = 1.0 - batch.terminated.astype(next_v.dtype)
    target = jax.lax.stop_gradient(reward_scale * batch.reward + gamma * not_done * next_v)
    q = nets.critic(critic_params, batch.obs, batch.action)
    loss = 0.5 * jnp.sum(jnp.mean(jnp.square(q - target), axis=-1))
    return loss, {"critic_loss": loss, "q": jnp.mean(q), "target_q": jnp.mean(target)}


def categorical_critic_loss_v2(
    critic_params: Params,
    target_critic_params: Params,
    actor_params: Params,
    log_alpha: jax.Array,
    batch: Transition,
    key: jax.Array,
    *,
    nets: Nets,
    gamma: float | jax.Array,
    reward_scale: float,
) -> tuple[jax.Array, Metrics]:
    """C51 form of ``critic_loss_v2``: cross-entropy of each online critic against one
    target distribution per transition. Of the two target critics' distributions at
    (s', a' ~ pi) the one with the lower expected value is taken (clipped double Q on
    distributions); its atoms z become the soft values ``z - alpha * log pi(a'|s')``,
    are shifted to ``reward_scale * r + gamma * (1 - terminated) * (z - alpha log pi)``
    and projected onto the support."""
    mean, log_std = nets.actor(actor_params, batch.next_obs)
    next_action, next_log_prob = sample_action(mean, log_std, key)
    logits = nets.critic(target_critic_params, batch.next_obs, next_action)
    probs = jax.nn.softmax(logits, axis=-1)  # (2, batch, atoms)
    atoms = nets.support.atoms()
    lower = jnp.argmin(jnp.sum(probs * atoms, axis=-1), axis=0)  # (batch,)
    next_probs = jnp.take_along_axis(probs, lower[None, :, None], axis=0)[0]
    soft_atoms = atoms - jnp.exp(log_alpha) * next_log_prob[:, None]
    return _categorical_loss(critic_params, batch, soft_atoms, next_probs, nets, gamma,
                             reward_scale)  # fmt: skip


def categorical_critic_loss_v1(
    critic_params: Params,
    target_value_params: Params,
    batch: Transition,
    *,
    nets: Nets,
    gamma: float | jax.Array,
    reward_scale: float,
) -> tuple[jax.Array, Metrics]:
    """C51 form of ``critic_loss_v1``: V stays a scalar network, so the target is the
    point mass at ``reward_scale * r + gamma * (1 - terminated) * V_target(s')``,
    projected onto the support (split between its two nearest atoms)."""
    next_v = nets.value(target_value_params, batch.next_obs)
    return _categorical_loss(critic_params, batch, next_v[:, None], jnp.ones_like(next_v)[:, None],
                             nets, gamma, reward_scale)  # fmt: skip


def _categorical_loss(critic_params, batch, next_atoms, next_probs, nets, gamma, reward_scale):
    support = nets.support
    not_done = 1.0 - batch.terminated.astype(next_atoms.dtype)
    discount = (gamma * not_done)[:, None]
    shifted = reward_scale * batch.reward[:, None] + discount * next_atoms
    target = jax.lax.stop_gradient(project(shifted, next_probs, support))
    logits = nets.critic(critic_params, batch.obs, batch.action)  # (2, batch, atoms)
    cross_entropy = -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    loss = jnp.sum(jnp.mean(cross_entropy, axis=-1))
    atoms = support.atoms()
    q = jnp.sum(jax.nn.softmax(logits, axis=-1) * atoms, axis=-1)
    outside = (shifted < support.v_min) | (shifted > support.v_max)
    return loss, {
        "critic_loss": loss,
        "q": jnp.mean(q),
        "target_q": jnp.mean(jnp.sum(target * atoms, axis=-1)),
        "target_clipped": jax.lax.stop_gradient(jnp.mean(jnp.sum(next_probs * outside, axis=-1))),
    }


def project(values: jax.Array, probs: jax.Array, support: Support) -> jax.Array:
    """The categorical projection of C51: masses ``probs`` (batch, k) at ``values``
    (batch, k) onto the support's atoms, (batch, atoms). Each mass is split between the
    two atoms around its value in proportion to closeness (all of it to an atom it sits
    on); values beyond the ends go to the end atoms. A scatter-add, O(batch * k): the
    dense form (every mass against every atom) ran 4x slower in the CPU train chunk."""
    n = support.num_atoms
    delta = (support.v_max - support.v_min) / (n - 1)
    position = (jnp.clip(values, support.v_min, support.v_max) - support.v_min) / delta
    lower = jnp.clip(jnp.floor(position), 0, n - 2)
    upper_share = position - lower  # in [0, 1]; 1 only at the top atom
    rows = jnp.broadcast_to(jnp.arange(values.shape[0])[:, None], values.shape)
    lower = lower.astype(jnp.int32)
    out = jnp.zeros((values.shape[0], n), probs.dtype)
    out = out.at[rows, lower].add(probs * (1.0 - upper_share))
    return out.at[rows, lower + 1].add(probs * upper_share)


def value_loss_v1(
    value_params: Params,
    actor_params: Params,
    critic_params: Params,
    obs: jax.Array,
    key: jax.Array,
    *,
    nets: Nets,
    alpha: float,
) -> tuple[jax.Array, Metrics]:
    """V regression onto ``min_i Q_i(s, a) - alpha * log pi(a|s)``, a ~ pi (SAC v1)."""
    mean, log_std = nets.actor(actor_params, obs)
    action, log_prob = sample_action(mean, log_std, key)
    q = jnp.min(q_values(nets, critic_params, obs, action), axis=0)
    target = jax.lax.stop_gradient(q - alpha * log_prob)
    v = nets.value(value_params, obs)
    loss = 0.5 * jnp.mean(jnp.square(v - target))
    return loss, {"value_loss": loss, "v": jnp.mean(v)}


def actor_loss(
    actor_params: Params,
    critic_params: Params,
    log_alpha: jax.Array,
    obs: jax.Array,
    key: jax.Array,
    *,
    nets: Nets,
    actor_q: str = "min",
) -> tuple[jax.Array, Metrics]:
    """``E[alpha * log pi(a|s) - Q(s, a)]`` with reparameterized a ~ pi, Q the ``min``
    (the papers) or the ``mean`` (FastSAC) of the critics' estimates."""
    mean, log_std = nets.actor(actor_params, obs)
    action, log_prob = sample_action(mean, log_std, key)
    q = combine_critics(q_values(nets, critic_params, obs, action), actor_q)
    loss = jnp.mean(jax.lax.stop_gradient(jnp.exp(log_alpha)) * log_prob - q)
    return loss, {"actor_loss": loss, "entropy": -jnp.mean(log_prob), "log_prob": log_prob}


def alpha_loss(
    log_alpha: jax.Array, log_prob: jax.Array, *, target_entropy: float
) -> tuple[jax.Array, Metrics]:
    """Temperature loss ``-E[log_alpha * (log pi + target_entropy)]`` (SAC v2): alpha
    grows when the policy's entropy falls below the target and shrinks above it."""
    loss = -jnp.mean(log_alpha * jax.lax.stop_gradient(log_prob + target_entropy))
    return loss, {"alpha_loss": loss, "alpha": jnp.exp(log_alpha)}


# Metrics of the actor and temperature updates: with policy_delay > 1 averaged over the
# updates that made them.
ACTOR_METRICS = frozenset({"actor_loss", "entropy", "alpha_loss", "alpha"})


def gradient_step(
    loss_fn: Callable[..., tuple[jax.Array, Metrics]],
    params: Params,
    opt_state: optax.OptState,
    optimizer: optax.GradientTransformation,
    *args: Any,
    mean_over: str | None = None,
    **kwargs: Any,
) -> tuple[Params, optax.OptState, Metrics]:
    """The one generic update: differentiate ``loss_fn`` in its first argument, apply the
    optimizer, return the new parameters, optimizer state and the loss's metrics.
    ``mean_over``: a mesh axis over which the batch is split in equal parts (data
    parallel): the gradient is averaged over it first, so every device takes the same
    step, the gradient of the whole batch's mean loss."""
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, *args, **kwargs)
    if mean_over is not None:
        grads = jax.lax.pmean(grads, mean_over)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics


def polyak(target: Params, online: Params, tau: float) -> Params:
    """``target <- (1 - tau) * target + tau * online``."""
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)
