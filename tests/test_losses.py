"""The SAC losses against a float64 NumPy reference on fixed small inputs.

The networks are replaced by small linear functions whose outputs NumPy computes too, so
every term of each loss (twin-Q minimum, entropy bonus, temperature, reward scale,
bootstrapping through truncation, stopping at termination) is checked arithmetically.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mjxsac import losses
from mjxsac.losses import Nets, Transition
from mjxsac.networks import sample_action

OBS, ACT, BATCH = 3, 2, 5
rng = np.random.default_rng(0)
W = {
    "q": rng.normal(size=(2, OBS + ACT)) * 0.5,
    "q_bias": np.array([0.3, -0.2]),
    "mean": rng.normal(size=(OBS, ACT)) * 0.5,
    "log_std": rng.normal(size=(OBS, ACT)) * 0.2,
    "v": rng.normal(size=OBS),
}


def critic(params, obs, action):
    x = jnp.concatenate([obs, action], axis=-1)
    return params["q"] @ x.T + params["q_bias"][:, None]


def actor(params, obs):
    return obs @ params["mean"], obs @ params["log_std"]


def value(params, obs):
    return obs @ params["v"]


NETS = Nets(actor=actor, critic=critic, value=value)


def np_critic(p, obs, action):
    return p["q"] @ np.concatenate([obs, action], axis=-1).T + p["q_bias"][:, None]


def np_sample(p, obs, eps):
    mean, log_std = obs @ p["mean"], obs @ p["log_std"]
    u = mean + np.exp(log_std) * eps
    log_gauss = -0.5 * ((u - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi)
    log_prob = np.sum(log_gauss - np.log(1.0 - np.tanh(u) ** 2), axis=-1)
    return np.tanh(u), log_prob


def params(scale=1.0):
    return {k: jnp.asarray(v * scale) for k, v in W.items()}


def np_params(scale=1.0):
    return {k: v * scale for k, v in W.items()}


BATCH_SEED = 1


@pytest.fixture
def batch():
    """The same transitions whichever tests ran before on this worker: drawn from their
    own generator (drawn from the module's, they depended on xdist's test order, and on
    some orders the categorical target of the truncated row sat clipped at the support's
    end, so moving its next_obs changed nothing)."""
    draw = np.random.default_rng(BATCH_SEED)
    obs = draw.normal(size=(BATCH, OBS))
    next_obs = draw.normal(size=(BATCH, OBS))
    return Transition(
        obs=jnp.asarray(obs),
        action=jnp.asarray(draw.uniform(-1, 1, size=(BATCH, ACT))),
        reward=jnp.asarray(draw.normal(size=BATCH)),
        next_obs=jnp.asarray(next_obs),
        # row 1 terminated; row 3 is a truncated transition: not terminated, and next_obs
        # holds the final observation of the ended episode.
        terminated=jnp.asarray([False, True, False, False, False]),
    )


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def eps_for(key, shape):
    return np.asarray(jax.random.normal(key, shape, jnp.float64))


def test_sample_action_matches_the_change_of_variables():
    key = jax.random.key(0)
    obs = rng.normal(size=(BATCH, OBS))
    mean, log_std = actor(params(), jnp.asarray(obs))
    action, log_prob = sample_action(mean, log_std, key)
    ref_action, ref_log_prob = np_sample(np_params(), obs, eps_for(key, (BATCH, ACT)))
    np.testing.assert_allclose(action, ref_action, rtol=1e-12)
    np.testing.assert_allclose(log_prob, ref_log_prob, rtol=1e-10)
    assert np.all(np.abs(action) < 1)


def test_sample_action_is_stable_far_in_the_tails():
    mean = jnp.asarray([[30.0, -30.0]])
    action, log_prob = sample_action(mean, jnp.zeros_like(mean), jax.random.key(1))
    assert np.all(np.isfinite(log_prob)) and np.all(np.abs(action) <= 1)


@pytest.mark.parametrize("reward_scale", [1.0, 5.0])
def test_critic_loss_v2(batch, reward_scale):
    key, gamma, log_alpha = jax.random.key(2), 0.9, np.log(0.3)
    online, target, pi = params(), params(0.8), params(1.1)
    loss, metrics = losses.critic_loss_v2(
        online, target, pi, jnp.asarray(log_alpha), batch, key,
        nets=NETS, gamma=gamma, reward_scale=reward_scale,
    )  # fmt: skip
    b = jax.tree.map(np.asarray, batch)
    next_a, next_logp = np_sample(np_params(1.1), b.next_obs, eps_for(key, (BATCH, ACT)))
    next_v = np_critic(np_params(0.8), b.next_obs, next_a).min(0) - 0.3 * next_logp
    y = reward_scale * b.reward + gamma * (1 - b.terminated) * next_v
    q = np_critic(np_params(), b.obs, b.action)
    expected = 0.5 * ((q - y) ** 2).mean(1).sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-10)
    np.testing.assert_allclose(metrics["target_q"], y.mean(), rtol=1e-10)


def test_critic_loss_v1(batch):
    gamma, scale = 0.99, 5.0
    loss, _ = losses.critic_loss_v1(
        params(), params(0.7), batch, nets=NETS, gamma=gamma, reward_scale=scale
    )
    b = jax.tree.map(np.asarray, batch)
    y = scale * b.reward + gamma * (1 - b.terminated) * (b.next_obs @ W["v"] * 0.7)
    q = np_critic(np_params(), b.obs, b.action)
    np.testing.assert_allclose(loss, 0.5 * ((q - y) ** 2).mean(1).sum(), rtol=1e-10)


@pytest.mark.parametrize("algo", ["v1", "v2"])
def test_critic_losses_take_a_discount_per_row(batch, algo):
    """n-step returns pass ``gamma ** k`` per row: the target discounts each row's bootstrap
    by its own factor, and equal factors give the scalar's loss."""
    key, log_alpha = jax.random.key(7), np.log(0.3)
    gammas = np.array([0.9, 0.81, 0.729, 0.9, 0.6561])

    def loss_with(gamma):
        if algo == "v1":
            return losses.critic_loss_v1(
                params(), params(0.7), batch, nets=NETS, gamma=gamma, reward_scale=2.0
            )[0]
        return losses.critic_loss_v2(
            params(), params(0.8), params(1.1), jnp.asarray(log_alpha), batch, key,
            nets=NETS, gamma=gamma, reward_scale=2.0,
        )[0]  # fmt: skip

    b = jax.tree.map(np.asarray, batch)
    if algo == "v1":
        next_v = b.next_obs @ W["v"] * 0.7
    else:
        next_a, next_logp = np_sample(np_params(1.1), b.next_obs, eps_for(key, (BATCH, ACT)))
        next_v = np_critic(np_params(0.8), b.next_obs, next_a).min(0) - 0.3 * next_logp
    y = 2.0 * b.reward + gammas * (1 - b.terminated) * next_v
    q = np_critic(np_params(), b.obs, b.action)
    expected = 0.5 * ((q - y) ** 2).mean(1).sum()
    np.testing.assert_allclose(loss_with(jnp.asarray(gammas)), expected, rtol=1e-10)
    assert float(loss_with(jnp.full(BATCH, 0.9))) == float(loss_with(0.9))


@pytest.mark.parametrize("algo", ["v1", "v2"])
def test_bootstrap_through_truncation_not_termination(batch, algo):
    """Changing next_obs of the terminated row leaves the loss unchanged; changing it for
    the truncated row (row 3) changes it: truncation bootstraps from the final obs."""

    def loss_with(next_obs):
        b = batch.replace(next_obs=next_obs)
        if algo == "v1":
            return losses.critic_loss_v1(
                params(), params(0.7), b, nets=NETS, gamma=0.99, reward_scale=1.0
            )[0]
        return losses.critic_loss_v2(
            params(), params(0.8), params(), jnp.asarray(0.0), b, jax.random.key(3),
            nets=NETS, gamma=0.99, reward_scale=1.0,
        )[0]  # fmt: skip

    base = loss_with(batch.next_obs)
    assert float(loss_with(batch.next_obs.at[1].add(3.0))) == pytest.approx(float(base), 1e-12)
    assert abs(float(loss_with(batch.next_obs.at[3].add(3.0))) - float(base)) > 1e-3


def test_critic_gradient_stops_at_the_target(batch):
    """Only the online Qs receive gradient: the target is a constant."""
    grads, _ = jax.grad(losses.critic_loss_v2, argnums=(0, 1, 2), has_aux=True)(
        params(), params(0.8), params(1.1), jnp.asarray(0.0), batch, jax.random.key(4),
        nets=NETS, gamma=0.99, reward_scale=1.0,
    )  # fmt: skip
    assert float(jnp.abs(grads[0]["q"]).sum()) > 0
    assert float(jnp.abs(grads[1]["q"]).sum()) == 0
    assert float(jnp.abs(grads[2]["mean"]).sum()) == 0


def test_value_loss_v1(batch):
    key, alpha = jax.random.key(5), 1.0
    loss, _ = losses.value_loss_v1(
        params(0.5), params(1.2), params(), batch.obs, key, nets=NETS, alpha=alpha
    )
    obs = np.asarray(batch.obs)
    a, logp = np_sample(np_params(1.2), obs, eps_for(key, (BATCH, ACT)))
    target = np_critic(np_params(), obs, a).min(0) - alpha * logp
    v = obs @ W["v"] * 0.5
    np.testing.assert_allclose(loss, 0.5 * ((v - target) ** 2).mean(), rtol=1e-10)


def test_actor_loss(batch):
    key, log_alpha = jax.random.key(6), np.log(0.2)
    loss, metrics = losses.actor_loss(
        params(), params(0.9), jnp.asarray(log_alpha), batch.obs, key, nets=NETS
    )
    obs = np.asarray(batch.obs)
    a, logp = np_sample(np_params(), obs, eps_for(key, (BATCH, ACT)))
    expected = (0.2 * logp - np_critic(np_params(0.9), obs, a).min(0)).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-10)
    np.testing.assert_allclose(metrics["entropy"], -logp.mean(), rtol=1e-10)
    # The temperature is a constant for the actor: no gradient flows into log_alpha.
    g = jax.grad(lambda la: losses.actor_loss(params(), params(0.9), la, batch.obs, key,
                                              nets=NETS)[0])(jnp.asarray(log_alpha))  # fmt: skip
    assert float(g) == 0.0


def test_alpha_loss_moves_alpha_toward_the_target_entropy():
    log_prob = jnp.asarray([1.0, 2.0, 0.5])  # entropy estimate: -mean = -1.17
    loss, metrics = losses.alpha_loss(jnp.asarray(np.log(0.5)), log_prob, target_entropy=-2.0)
    np.testing.assert_allclose(loss, -np.log(0.5) * (np.asarray(log_prob) - 2.0).mean())
    np.testing.assert_allclose(metrics["alpha"], 0.5)
    # Entropy -1.17 is above the target -2: gradient descent must shrink alpha.
    g = jax.grad(lambda la: losses.alpha_loss(la, log_prob, target_entropy=-2.0)[0])(0.0)
    assert float(g) > 0
    # Entropy below the target: alpha must grow.
    g = jax.grad(lambda la: losses.alpha_loss(la, log_prob, target_entropy=0.0)[0])(0.0)
    assert float(g) < 0


def test_gradient_step_and_polyak():
    def quadratic(p, target):
        return jnp.sum((p["x"] - target) ** 2), {"loss": jnp.sum((p["x"] - target) ** 2)}

    opt = optax.sgd(0.25)
    p = {"x": jnp.asarray([1.0, -2.0])}
    new, _, metrics = losses.gradient_step(quadratic, p, opt.init(p), opt, jnp.asarray(3.0))
    # x - 0.25 * 2 * (x - 3)
    np.testing.assert_allclose(new["x"], [2.0, 0.5])
    np.testing.assert_allclose(metrics["loss"], 4.0 + 25.0)
    out = losses.polyak({"w": jnp.asarray(1.0)}, {"w": jnp.asarray(3.0)}, 0.25)
    np.testing.assert_allclose(out["w"], 1.5)


def test_log_std_clamps():
    """'smooth' maps an output of 0 to the interval's midpoint and stays inside; 'hard' is
    the authors' clip: an output of 0 is log std 0, extremes stop at the bounds."""
    from mjxsac.networks import Actor

    obs = jnp.array([[0.0, 0.0], [1e4, -1e4], [-1e4, 1e4]])
    for clamp, at_zero in (("smooth", -9.0), ("hard", 0.0)):
        actor = Actor((8,), 3, log_std_min=-20.0, log_std_max=2.0, log_std_clamp=clamp)
        params = actor.init(jax.random.key(0), obs)
        _, log_std = actor.apply(params, obs)
        np.testing.assert_allclose(log_std[0], at_zero, atol=1e-6)  # zero input, zero bias
        assert jnp.all(log_std >= -20.0) and jnp.all(log_std <= 2.0)
        if clamp == "hard":  # huge outputs stop at the bounds
            assert jnp.all((log_std[1:] == 2.0) | (log_std[1:] == -20.0))


# ---- the categorical (C51) critic --------------------------------------------------------

SUPPORT = losses.Support(v_min=-2.0, v_max=2.0, num_atoms=5)  # atoms -2, -1, 0, 1, 2
ATOMS = np.linspace(-2.0, 2.0, 5)
W_C51 = rng.normal(size=(2, 5, OBS + ACT)) * 0.7


def categorical_critic(params, obs, action):
    x = jnp.concatenate([obs, action], axis=-1)
    return jnp.einsum("cnd,bd->cbn", params["qc"], x)


def c51_params(scale=1.0):
    return {**params(scale), "qc": jnp.asarray(W_C51 * scale)}


def np_c51_params(scale=1.0):
    return {**np_params(scale), "qc": W_C51 * scale}


C51 = Nets(actor=actor, critic=categorical_critic, value=value, support=SUPPORT)


def np_logits(p, obs, action):
    return np.einsum("cnd,bd->cbn", p["qc"], np.concatenate([obs, action], axis=-1))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_project(values, probs, v_min, v_max, n):
    """C51's projection written the classic way: floor and ceil of the atom position."""
    delta = (v_max - v_min) / (n - 1)
    out = np.zeros((values.shape[0], n))
    for b in range(values.shape[0]):
        for x, p in zip(values[b], probs[b], strict=True):
            pos = (min(max(x, v_min), v_max) - v_min) / delta
            lo, hi = int(np.floor(pos)), int(np.ceil(pos))
            if lo == hi:
                out[b, lo] += p
            else:
                out[b, lo] += p * (hi - pos)
                out[b, hi] += p * (pos - lo)
    return out


def test_projection_onto_the_support():
    """On an atom, between atoms, at and beyond both ends; the mass is conserved."""
    values = np.array([[0.0, 0.25, -1.5, 1.999], [-2.0, 2.0, -3.5, 7.0], [0.5, 0.5, 0.5, 0.5]])
    probs = np_softmax(rng.normal(size=values.shape))
    got = np.asarray(losses.project(jnp.asarray(values), jnp.asarray(probs), SUPPORT))
    ref = np_project(values, probs, -2.0, 2.0, 5)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-12)
    # Beyond the ends: all of that mass on the end atoms.
    np.testing.assert_allclose(
        got[1], [probs[1, 0] + probs[1, 2], 0, 0, 0, probs[1, 1] + probs[1, 3]]
    )
    np.testing.assert_allclose(got[2], [0, 0, 0.5, 0.5, 0])


def np_c51_target_v2(batch, key, gamma, reward_scale, log_alpha, target_scale=0.8, pi_scale=1.1):
    b = jax.tree.map(np.asarray, batch)
    next_a, next_logp = np_sample(np_params(pi_scale), b.next_obs, eps_for(key, (BATCH, ACT)))
    probs = np_softmax(np_logits(np_c51_params(target_scale), b.next_obs, next_a))
    lower = np.argmin((probs * ATOMS).sum(-1), axis=0)
    next_probs = probs[lower, np.arange(BATCH)]
    soft = ATOMS[None, :] - np.exp(log_alpha) * next_logp[:, None]
    shifted = reward_scale * b.reward[:, None] + (gamma * (1 - b.terminated))[:, None] * soft
    return np_project(shifted, next_probs, -2.0, 2.0, 5), shifted, next_probs


@pytest.mark.parametrize("gamma", [0.9, np.array([0.9, 0.81, 0.729, 0.99, 0.5])])
@pytest.mark.parametrize("reward_scale", [1.0, 3.0])
def test_categorical_critic_loss_v2(batch, gamma, reward_scale):
    """Against the NumPy reference, with a scalar or a per-row gamma (n-step returns),
    with the terminated row (1) collapsing to the reward and the truncated row (3)
    bootstrapping; rewards x3 push targets beyond the support's ends."""
    key, log_alpha = jax.random.key(7), np.log(0.3)
    loss, metrics = losses.categorical_critic_loss_v2(
        c51_params(), c51_params(0.8), params(1.1), jnp.asarray(log_alpha), batch, key,
        nets=C51, gamma=jnp.asarray(gamma), reward_scale=reward_scale,
    )  # fmt: skip
    target, shifted, next_probs = np_c51_target_v2(batch, key, gamma, reward_scale, log_alpha)
    b = jax.tree.map(np.asarray, batch)
    np.testing.assert_allclose(target[1], np_project(
        np.full((1, 1), reward_scale * b.reward[1]), np.ones((1, 1)), -2.0, 2.0, 5)[0])  # fmt: skip
    logits = np_logits(np_c51_params(), b.obs, b.action)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = (-(target * log_p).sum(-1)).mean(-1).sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-10)
    np.testing.assert_allclose(metrics["target_q"], (target * ATOMS).sum(-1).mean(), rtol=1e-10)
    q = (np_softmax(logits) * ATOMS).sum(-1)
    np.testing.assert_allclose(metrics["q"], q.mean(), rtol=1e-10)
    outside = ((shifted < -2) | (shifted > 2)) * next_probs
    np.testing.assert_allclose(metrics["target_clipped"], outside.sum(-1).mean(), rtol=1e-10)
    if reward_scale == 3.0:
        assert float(metrics["target_clipped"]) > 0


def test_categorical_critic_loss_v1_projects_a_point_mass(batch):
    gamma, scale = np.array([0.9, 0.9, 0.5, 0.99, 0.9]), 2.0
    loss, metrics = losses.categorical_critic_loss_v1(
        c51_params(), params(0.7), batch, nets=C51, gamma=jnp.asarray(gamma), reward_scale=scale
    )
    b = jax.tree.map(np.asarray, batch)
    y = scale * b.reward + gamma * (1 - b.terminated) * (b.next_obs @ W["v"] * 0.7)
    target = np_project(y[:, None], np.ones((BATCH, 1)), -2.0, 2.0, 5)
    logits = np_logits(np_c51_params(), b.obs, b.action)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss, (-(target * log_p).sum(-1)).mean(-1).sum(), rtol=1e-10)
    np.testing.assert_allclose(metrics["target_q"], np.clip(y, -2, 2).mean(), rtol=1e-10)


@pytest.mark.parametrize("algo", ["v1", "v2"])
def test_categorical_target_ignores_next_obs_after_termination(batch, algo):
    def loss_with(next_obs):
        b = batch.replace(next_obs=next_obs)
        if algo == "v1":
            return losses.categorical_critic_loss_v1(
                c51_params(), params(0.7), b, nets=C51, gamma=0.99, reward_scale=1.0
            )[0]
        return losses.categorical_critic_loss_v2(
            c51_params(), c51_params(0.8), params(), jnp.asarray(0.0), b, jax.random.key(3),
            nets=C51, gamma=0.99, reward_scale=1.0,
        )[0]  # fmt: skip

    base = loss_with(batch.next_obs)
    assert float(loss_with(batch.next_obs.at[1].add(3.0))) == pytest.approx(float(base), 1e-12)
    # The truncated row bootstraps (the narrow support clips much of the change).
    assert abs(float(loss_with(batch.next_obs.at[3].add(3.0))) - float(base)) > 1e-5


def test_categorical_gradient_flows_only_into_the_online_critics(batch):
    grads = jax.grad(losses.categorical_critic_loss_v2, argnums=(0, 1, 2, 3), has_aux=True)(
        c51_params(), c51_params(0.8), params(1.1), jnp.asarray(np.log(0.3)), batch,
        jax.random.key(4), nets=C51, gamma=0.99, reward_scale=1.0,
    )[0]  # fmt: skip
    assert float(jnp.abs(grads[0]["qc"]).sum()) > 0
    assert float(jnp.abs(grads[1]["qc"]).sum()) == 0, "the target critics"
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads[2])), "the actor"
    assert float(grads[3]) == 0, "the temperature"


@pytest.mark.parametrize("actor_q", ["min", "mean"])
@pytest.mark.parametrize("kind", ["mse", "c51"])
def test_actor_loss_combines_the_critics(batch, actor_q, kind):
    """min (the papers) or mean (FastSAC) of the critics' estimates; a categorical
    critic's estimate is its expected value."""
    key, log_alpha = jax.random.key(6), np.log(0.2)
    nets, p = (NETS, params(0.9)) if kind == "mse" else (C51, c51_params(0.9))
    loss, _ = losses.actor_loss(
        params(), p, jnp.asarray(log_alpha), batch.obs, key, nets=nets, actor_q=actor_q
    )
    obs = np.asarray(batch.obs)
    a, logp = np_sample(np_params(), obs, eps_for(key, (BATCH, ACT)))
    if kind == "mse":
        q = np_critic(np_params(0.9), obs, a)
    else:
        q = (np_softmax(np_logits(np_c51_params(0.9), obs, a)) * ATOMS).sum(-1)
    combined = q.min(0) if actor_q == "min" else q.mean(0)
    assert np.abs(q[0] - q[1]).max() > 0.1, "the critics disagree: min and mean differ"
    np.testing.assert_allclose(loss, (0.2 * logp - combined).mean(), rtol=1e-10)


def test_value_loss_v1_regresses_onto_the_categorical_critics_expected_value(batch):
    """SAC v1 with C51: V stays scalar, its target the min of the expected values."""
    key = jax.random.key(5)
    loss, _ = losses.value_loss_v1(
        params(0.5), params(1.2), c51_params(), batch.obs, key, nets=C51, alpha=1.0
    )
    obs = np.asarray(batch.obs)
    a, logp = np_sample(np_params(1.2), obs, eps_for(key, (BATCH, ACT)))
    q = (np_softmax(np_logits(np_c51_params(), obs, a)) * ATOMS).sum(-1)
    v = obs @ W["v"] * 0.5
    np.testing.assert_allclose(loss, 0.5 * ((v - (q.min(0) - logp)) ** 2).mean(), rtol=1e-10)
