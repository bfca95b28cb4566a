"""The massively parallel recipe's options in the trainer: policy_delay skips the actor's
updates for real (a branch, not a select), AdamW's settings are per-member data, the
networks' matrix products run in bfloat16 with float32 losses, and checkpoints of these
states round-trip. The loss arithmetic (C51, actor_q) is in tests/test_losses.py.

One small config (a population of two, tiny networks, one train step per chunk) serves
every test here, so its programs compile once per worker.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mjxsac import presets
from mjxsac import train as train_cli
from mjxsac.checkpoint import state_shapes
from mjxsac.runlog import chunk_summaries
from mjxsac.sac import Trainer, injected

pytestmark = pytest.mark.xdist_group("recipe")

HIDDEN = (48, 40)  # widths no array of the simulator has: they mark the networks' products
RECIPE = dict(
    num_envs=8, batch_size=32, warmup_steps=32, buffer_size=1_000, hidden_sizes=HIDDEN,
    steps_per_chunk=1, updates_per_step=2, policy_delay=3, critic="c51", num_atoms=21,
    v_min=-10.0, v_max=110.0, actor_q="mean", optimizer="adamw", adam_b1=0.8, adam_b2=0.95,
    max_grad_norm=1.0, compute_dtype="bfloat16", vary=("weight_decay=0.001,0.01",),
)  # fmt: skip


def config(**extra):
    base = presets.config_for("InvertedPendulum", "sac-v2", "cpu")
    return dataclasses.replace(base, **{**RECIPE, **extra})


def walk(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)


def dot_count(jaxpr) -> int:
    return sum(eqn.primitive.name == "dot_general" for eqn in walk(jaxpr))


def test_policy_delay_is_a_real_branch():
    """Under the members' vmap the actor's turn is decided by an unbatched update count,
    so the updates keep a cond whose taken branch holds the actor's matrix products and
    whose other branch holds none (a batched predicate would turn into a select that
    computes the actor's update every time)."""

    def branches(trainer):
        """The updates (the true branch of train_step's cond on the warm-up) and, in
        them, the conds' branches as counts of matrix products."""
        jaxpr = trainer.trace_train_chunk(trainer.init()).jaxpr.jaxpr
        ready = max((e for e in walk(jaxpr) if e.primitive.name == "cond"),
                    key=lambda e: dot_count(e.params["branches"][1].jaxpr))  # fmt: skip
        updates = ready.params["branches"][1].jaxpr
        inner = [[dot_count(b.jaxpr) for b in e.params["branches"]]
                 for e in walk(updates) if e.primitive.name == "cond"]  # fmt: skip
        return dot_count(updates), inner

    total, inner = branches(Trainer(config()))
    assert len(inner) == 1 and inner[0][0] == 0 and inner[0][1] > 10, inner
    every_total, every_inner = branches(Trainer(config(policy_delay=1)))
    assert every_inner == [] and every_total == total, "the same products, none computed twice"


def test_actor_and_temperature_change_only_on_their_turns():
    """Two updates per train step, policy_delay 3: updates 3, 6, 9, 12 (1-based) update
    the actor and the temperature; the critics and targets change on every update."""
    trainer = Trainer(config())
    state = trainer.init()
    updates_per_step, actor_turns = [], []
    for _ in range(10):
        before = jax.tree.map(np.asarray, state)
        state, metrics = trainer.train_chunk(state)
        after = jax.tree.map(np.asarray, state)

        def changed(field, old=before, new=after):
            return [not np.array_equal(o[m], n[m]) for m in range(2)
                    for o, n in zip(jax.tree.leaves(getattr(old, field)),
                                    jax.tree.leaves(getattr(new, field)), strict=True)]  # fmt: skip

        actor = changed("actor")
        assert len(set(actor)) == 1, "every leaf of both members, or none"
        assert set(changed("log_alpha")) == set(actor)
        updated = int(after.updates[0] - before.updates[0])
        updates_per_step.append(updated)
        if updated:
            assert all(changed("critic")) and all(changed("target_critic"))
        actor_turns.append(int(actor[0]))
        turns = sum((n + 1) % 3 == 0 for n in range(before.updates[0], after.updates[0]))
        np.testing.assert_array_equal(metrics["actor_updates"], [[turns, turns]])
    # Updates start at the 4th step (the buffer then holds the batch): numbers 0-1, 2-3, ...
    assert updates_per_step == [0, 0, 0, 2, 2, 2, 2, 2, 2, 2]
    assert actor_turns == [0, 0, 0, 0, 1, 1, 0, 1, 1, 0]
    row = chunk_summaries(metrics)[0]
    assert "loss/critic_loss" in row and "loss/actor_loss" not in row, "no actor update here"


def test_bfloat16_matmuls_and_float32_losses():
    """The lowered chunk: every matrix product of the networks (an operand with a hidden
    width) has bfloat16 operands, and float32 under the default; the losses are float32."""

    def network_products(trainer):
        text = trainer.trace_train_chunk(trainer.init()).lower().as_text()
        found = []
        for line in text.splitlines():
            if "stablehlo.dot_general" not in line:
                continue
            operands = re.findall(r"tensor<([0-9x]+)x(\w+)>", line.split(" : ")[-1])[:2]
            if any(str(h) in dims.split("x") for h in HIDDEN for dims, _ in operands):
                found.append({dtype for _, dtype in operands})
        return found

    bf16 = Trainer(config())
    products = network_products(bf16)
    assert len(products) > 20 and all(p == {"bf16"} for p in products), products
    products = network_products(Trainer(config(compute_dtype="float32")))
    assert len(products) > 20 and all(p == {"f32"} for p in products), products
    metrics = jax.eval_shape(bf16.train_chunk, bf16.init())[1]
    for name in ("critic_loss", "q", "target_q", "actor_loss", "entropy", "alpha_loss"):
        assert metrics[name].dtype == jnp.float32, name
    state = state_shapes(bf16)
    assert {x.dtype for x in jax.tree.leaves((state.actor, state.critic, state.actor_opt,
                                             state.critic_opt))} == {jnp.dtype(jnp.float32)} | {
        jnp.dtype(jnp.int32)}  # fmt: skip


def member(tree, m: int):
    return jax.tree.map(lambda x: x[m], tree)


def test_adamw_settings_are_per_member_data():
    """AdamW's decay, Adam's betas and the clipping act as set: a zero-gradient step
    shrinks the weights by lr * weight_decay (each member its own decay), and two steps
    equal optax's own clipped AdamW with these settings. log(alpha) has no decay and no
    clipping."""
    trainer = Trainer(config())
    state = trainer.init()
    lr = 3e-4
    for m, decay in enumerate((0.001, 0.01)):
        params, opt_state = member(state.actor, m), member(state.actor_opt, m)
        zero = jax.tree.map(jnp.zeros_like, params)
        updates, _ = jax.jit(trainer.actor_opt.update)(zero, opt_state, params)
        new = optax.apply_updates(params, updates)
        for p, n in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True):
            np.testing.assert_allclose(n, p * (1 - lr * decay), rtol=1e-6, atol=1e-12)
        hp = injected(opt_state).hyperparams
        np.testing.assert_allclose([hp["b1"], hp["b2"], hp["weight_decay"]], [0.8, 0.95, decay])
    alpha_hp = member(state.alpha_opt, 1).hyperparams
    assert "weight_decay" not in alpha_hp and hasattr(state.alpha_opt, "hyperparams")
    np.testing.assert_allclose([alpha_hp["b1"], alpha_hp["b2"]], [0.8, 0.95])
    # Two steps against optax's clipped AdamW (a large, then a small gradient: the
    # clipping and the betas both change the second step).
    params, opt_state = member(state.critic, 1), member(state.critic_opt, 1)
    reference = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(lr, b1=0.8, b2=0.95, weight_decay=0.01))  # fmt: skip
    unclipped = optax.adamw(lr, b1=0.8, b2=0.95, weight_decay=0.01)
    ref_state, raw_state = reference.init(params), unclipped.init(params)
    ours, ref, raw = params, params, params

    @functools.partial(jax.jit, static_argnums=0)
    def step(optimizer_update, grads, opt_state, params):
        updates, opt_state = optimizer_update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for scale in (50.0, 0.01):
        grads = jax.tree.map(lambda p, s=scale: s * jnp.cos(p), params)
        ours, opt_state = step(trainer.critic_opt.update, grads, opt_state, ours)
        ref, ref_state = step(reference.update, grads, ref_state, ref)
        raw, raw_state = step(unclipped.update, grads, raw_state, raw)
    for o, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-8)
    assert max(float(jnp.abs(o - w).max()) for o, w in
               zip(jax.tree.leaves(ours), jax.tree.leaves(raw), strict=True)) > 1e-5  # fmt: skip


def test_varied_weight_decay_does_not_recompile_and_set_data_applies_it(
    compile_count, checkpoint_round_trip
):
    """``--vary weight_decay=...`` from the command line; other values (and betas) reuse
    the compiled chunk; ``set_data`` (a resume) applies changed values, and a checkpoint
    of these states (clipped optimizer chains) restores."""
    argv = ["--env", "InvertedPendulum", "--preset", "cpu", "--critic", "c51",
            "--optimizer", "adamw", "--vary", "weight_decay=0.001,0.01",
            "--policy-delay", "3", "--compute-dtype", "bfloat16", "--actor-q", "mean",
            "--max-grad-norm", "1.0"]  # fmt: skip
    parsed = train_cli.parse_args(argv)[0]
    assert [m["weight_decay"] for m in parsed.members()] == [0.001, 0.01]
    assert (parsed.critic, parsed.policy_delay, parsed.compute_dtype, parsed.actor_q,
            parsed.max_grad_norm) == ("c51", 3, "bfloat16", "mean", 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="needs optimizer adamw"):
        config(optimizer="adam").validate()
    first = Trainer(config())
    state, _ = first.train_chunk(first.init())
    other = Trainer(config(vary=("weight_decay=0.003,0.03",), adam_b2=0.9))
    assert other == first
    state = jax.block_until_ready(other.set_data(state))
    before = compile_count()
    state, _ = other.train_chunk(state)
    jax.block_until_ready(state)
    assert compile_count() == before, "other weight decays and betas: the same program"
    for opt in (state.actor_opt, state.critic_opt):
        hp = injected(opt).hyperparams
        np.testing.assert_allclose(hp["weight_decay"], [0.003, 0.03], rtol=1e-6)
        np.testing.assert_allclose(hp["b2"], [0.9, 0.9], rtol=1e-6)
    checkpoint_round_trip(state, other)


@pytest.mark.parametrize("algo", ["sac-v2", "sac-v1"])
def test_presets_hold_the_authors_and_the_recipes_settings(algo):
    """Every task's presets validate; ``paper`` is the authors' code's configuration
    (haarnoja/sac for v1, softlearning for v2), ``fast`` is the FastSAC recipe with a
    support sized to the task's returns (x the reward scale)."""
    import envs

    for env in envs.NAMES:
        for name in presets.PRESETS:
            presets.config_for(env, algo, name).validate()
        paper = presets.config_for(env, algo, "paper")
        assert (paper.log_std_clamp, paper.log_std_min, paper.log_std_max) == ("hard", -20, 2)
        if algo == "sac-v1":
            warmup = 10_000 if env in ("HalfCheetah", "Ant") else 1_000
            assert (paper.warmup_steps, paper.update_start) == (warmup, 1_000)
            assert paper.reward_scale == (20.0 if env == "Humanoid" else 5.0)
        else:
            assert (paper.warmup_steps, paper.update_start, paper.reward_scale) == (10_000,) * 2 + (
                1.0,
            )
        fast = presets.config_for(env, algo, "fast")
        low, high = presets.FAST_SUPPORT[env]
        assert (fast.v_min, fast.v_max) == (low * fast.reward_scale, high * fast.reward_scale)
        assert (fast.critic, fast.actor_q, fast.optimizer, fast.compute_dtype) == (
            "c51", "mean", "adamw", "bfloat16",
        )  # fmt: skip
        assert fast.desync_episodes and fast.warmup_steps == 0 and fast.policy_delay == 4
        cpu = presets.config_for(env, algo, "cpu")  # v1 gets twice the updates (presets.py)
        assert cpu.updates_per_step == (8 if algo == "sac-v1" else 4)
    assert presets.config_for("Walker2d", algo, "paper").total_steps == (
        1_000_000 if algo == "sac-v1" else 3_000_000
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(num_atoms=1), "num_atoms"),
        (dict(v_min=5.0, v_max=5.0), "v_min"),
        (dict(policy_delay=0), "policy_delay"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(adam_b2=1.0), "adam_b2"),
        (dict(adam_b1=-0.1), "adam_b1"),
        (dict(vary=("weight_decay=0.001,-0.01",)), "weight_decay must be >= 0"),
    ],
)
def test_bad_recipe_settings_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        config(**extra).validate()
