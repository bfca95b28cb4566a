"""The fused training loop on InvertedPendulum (CPU): no recompilation, seeding, the CLI's
run directory, and learning: SAC v1 solves the task within a small budget (v2's learning
test runs on a population, tests/test_population.py).

Tests of one algorithm share a worker (xdist group) and a config, so the programs compiled
for one test serve the others (trainers with equal configs share jit's cache).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from envs.base import STEP_INPUTS
from mjxsac import presets
from mjxsac import train as train_cli
from mjxsac.checkpoint import state_shapes
from mjxsac.config import Config
from mjxsac.runlog import RunDir, chunk_summaries
from mjxsac.sac import Trainer, env_steps, run_keys, seed_key

# The `cpu` preset, shortened: 16 envs, 4 updates per step, 2,000 env steps per chunk.
OVERRIDES = {"total_steps": 12_000, "warmup_steps": 1_000, "eval_every": 1}
SOLVED = 900.0


def config(algo: str, **extra) -> Config:
    base = presets.config_for("InvertedPendulum", algo, "cpu")
    return dataclasses.replace(base, **OVERRIDES, **extra)


def cli_args(algo: str, run_dir, seed: int = 0) -> list[str]:
    args = ["--env", "InvertedPendulum", "--algo", algo, "--preset", "cpu", "--seed", str(seed)]
    for key, value in OVERRIDES.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return [*args, "--run-dir", str(run_dir)]


@pytest.mark.xdist_group("sac-v2")
def test_second_chunk_does_not_compile_and_seeds_decide(compile_count):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        trainer = Trainer(config("sac-v2", seed=seed))
        state, _ = trainer.train_chunk(trainer.init())
        before = compile_count()
        state, _ = trainer.train_chunk(state)
        jax.block_until_ready(state)
        assert compile_count() == before, "a second chunk (or another seed) must not compile"
        runs[name] = jax.tree.map(np.asarray, state.actor)
        assert env_steps(state) == 2 * trainer.config.env_steps_per_chunk
    same = jax.tree.map(np.array_equal, runs["a"], runs["b"])
    assert all(jax.tree.leaves(same)), "same seed, same device: same parameters"
    differ = jax.tree.map(lambda x, y: not np.allclose(x, y), runs["a"], runs["c"])
    assert all(jax.tree.leaves(differ)), "different seeds: different parameters"


def test_trainers_with_equal_configs_share_compiled_programs(tmp_path):
    a = Trainer(config("sac-v2", run_dir=str(tmp_path / "a")))
    b = Trainer(config("sac-v2", run_dir=str(tmp_path / "b")))
    assert a == b and hash(a) == hash(b)
    assert a == Trainer(config("sac-v2", gamma=0.98, seed=3)), "data fields: same program"
    assert a != Trainer(config("sac-v2", batch_size=128))
    assert a != Trainer(config("sac-v2", seeds="0-1")), "the population's size is a shape"


@pytest.mark.xdist_group("sac-v2")
def test_a_run_from_the_command_line_writes_its_directory(tmp_path, capsys):
    """The command's run directory: config, metrics, evaluations, the curve, the progress
    line. (That v2 learns is asserted over a population of seeds, tests/test_population.py:
    one seed's curve is no test.)"""
    algo, run_dir = "sac-v2", tmp_path / "run"
    train_cli.main([*cli_args(algo, run_dir), "--total-steps", "4000"])
    saved = json.loads((run_dir / "config.json").read_text())
    want = dataclasses.replace(config(algo, run_dir=str(run_dir)), total_steps=4000)
    assert saved == want.to_saved()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["chunk"] for r in rows] == [0, 1]
    assert rows[-1]["env_steps"] == 4_000
    assert all(np.isfinite(r["eval/return_mean"]) for r in rows)
    assert (run_dir / "learning_curve.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "env-steps/s" in out and "updates/s" in out and "ETA" in out
    assert f"next: mjxsac-eval {run_dir} [--gymnasium], mjxsac-render {run_dir}" in out


@pytest.mark.xdist_group("sac-v1")
def test_sac_v1_learns_inverted_pendulum(tmp_path):
    """SAC v1 with the `cpu` preset as users get it (8 updates per step, 2,000 warm-up
    steps). Measured over 16 seeds (docs/BENCHMARKS.md, "SAC v1 on InvertedPendulum"): 13
    had passed 900 by 10,000 env steps (and by 12,000), so all three of three seeds miss
    with probability about (3/16)^3 = 0.7%; a learner with a broken critic target or
    temperature update solves with none."""
    run_dir = tmp_path / "v1"
    args = ["--env", "InvertedPendulum", "--algo", "sac-v1", "--preset", "cpu",
            "--seeds", "0-2", "--total-steps", "10000", "--eval-every", "1"]  # fmt: skip
    train_cli.main([*args, "--run-dir", str(run_dir)])
    curves = [[r["eval/return_mean"] for r in RunDir(run_dir).read_metrics(k)] for k in range(3)]
    assert all(len(c) == 5 for c in curves)
    assert max(max(c) for c in curves) >= SOLVED, curves


# The massively parallel recipe's options (issue 11), all of them at once. The support is
# symmetric about 0: an untrained C51 critic predicts its midpoint, and InvertedPendulum's
# Q lies in [0, 100] (docs/DESIGN.md).
RECIPE = ["--critic", "c51", "--v-min", "-100", "--v-max", "100", "--policy-delay", "2",
          "--optimizer", "adamw", "--compute-dtype", "bfloat16", "--actor-q", "mean",
          "--n-step", "3"]  # fmt: skip
RECIPE_STEPS = 16_000


@pytest.mark.xdist_group("sac-v2-recipe")
def test_the_parallel_recipe_learns_inverted_pendulum(tmp_path):
    """SAC v2 with the recipe's options solves the task, in more steps than plain SAC v2
    (the actor updates half as often, and the C51 critic starts from a flat distribution
    that bootstrapping narrows only slowly). Measured over 16 seeds with the `cpu` preset's
    2,000 warm-up steps (docs/BENCHMARKS.md, "Learning tests"): 14 had passed 900 by
    14,000 env steps and 15 by 16,000, so both of two seeds miss with probability about
    (1/16)^2 = 0.4%. With a support whose midpoint is 50 ([-10, 110], [-50, 150]) some
    seeds had not learned at all after 16,000-20,000 (2026-11-24)."""
    run_dir = tmp_path / "recipe"
    args = ["--env", "InvertedPendulum", "--preset", "cpu", "--seeds", "0-1",
            "--total-steps", str(RECIPE_STEPS), "--eval-every", "1", *RECIPE]  # fmt: skip
    train_cli.main([*args, "--run-dir", str(run_dir)])
    curves = [[r["eval/return_mean"] for r in RunDir(run_dir).read_metrics(k)] for k in range(2)]
    assert all(len(c) == RECIPE_STEPS // 2000 for c in curves)
    assert max(max(c) for c in curves) >= SOLVED, curves
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["critic"], saved["compute_dtype"], saved["policy_delay"], saved["n_step"]) == (
        "c51", "bfloat16", 2, 3)  # fmt: skip


def test_env_states_are_carried_compact():
    """The TrainState holds only what the next step reads of each env's ``Data``
    (Ant also keeps the torso's position for its velocity reward)."""
    trainer = Trainer(Config(env="Ant", num_envs=2, eval_envs=2, buffer_size=1_000,
                             batch_size=16, warmup_steps=100, hidden_sizes=(8,)))  # fmt: skip
    want = set(STEP_INPUTS) | {"xpos"}
    data = state_shapes(trainer).env_state.data
    assert {f.name for f in dataclasses.fields(data) if getattr(data, f.name) is not None} == want


def test_updates_off_collects_data_only():
    """``updates_per_step=0`` (the pipeline-overhead benchmark) steps and stores, no update."""
    trainer = Trainer(config("sac-v2", updates_per_step=0))
    state, metrics = trainer.train_chunk(trainer.init())
    steps = trainer.config.env_steps_per_chunk
    assert env_steps(state) == steps and int(state.buffer.size[0]) == steps
    assert int(state.updates[0]) == 0
    assert not any(k.startswith("loss/") for k in chunk_summaries(metrics)[0])


def descendants(key, generations: int = 3, width: int = 6) -> set[tuple[int, ...]]:
    """Keys derived from ``key``: ``split(k, n)[i]`` equals ``fold_in(k, i)`` (threefry,
    partitionable), so this covers every split and fold-in with small indices."""
    out, frontier = set(), [key]
    for _ in range(generations):
        frontier = [jax.random.fold_in(k, i) for k in frontier for i in range(width)]
        out |= {tuple(np.asarray(k).tolist()) for k in frontier}
    return out


def test_evaluation_keys_are_their_own_branch():
    """No evaluation key is a key the training side derives (parameter init, env resets,
    each step's splits). The earlier scheme, evaluation folded from the training root,
    gave chunks 0 and 1 the critics' initialization keys: the check catches it."""
    train_key, eval_key = run_keys(0)
    evaluation = [jax.random.fold_in(eval_key, chunk) for chunk in range(50)]
    assert not {tuple(np.asarray(k).tolist()) for k in evaluation} & descendants(train_key)
    root = seed_key(0)
    legacy = [jax.random.fold_in(jax.random.fold_in(root, 1), chunk) for chunk in range(2)]
    assert {tuple(np.asarray(k).tolist()) for k in legacy} <= descendants(root)


@pytest.mark.xdist_group("sac-v2")
def test_evaluation_compiled_in_the_background_gives_the_same_returns(tmp_path, monkeypatch):
    """Where overlap helps (forced here, whatever the cores), the loop compiles evaluation
    in a worker thread during the first chunk; its returns equal jit's evaluation. (The
    same run checks the progress line's updates/s: the updates the chunk made, half of
    the configured rate here since the first half of the chunk is warm-up.)"""
    import io

    from mjxsac import ahead
    from mjxsac.runlog import Progress, RunDir

    rates = []

    class Recorded(Progress):
        def update(self, steps, steps_per_s, updates_per_s, *rest, **kw):
            rates.append(updates_per_s)
            super().update(steps, steps_per_s, updates_per_s, *rest, **kw)

    made = []
    original = ahead.Ahead
    monkeypatch.setattr(ahead, "helps", lambda: True)
    monkeypatch.setattr(ahead, "Ahead", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    c = dataclasses.replace(config("sac-v2"), total_steps=2_000, run_dir=str(tmp_path / "run"))
    trainer = Trainer(c)
    progress = Recorded(c.total_steps, "test", io.StringIO())
    state = train_cli.train(trainer, RunDir(c.run_dir), progress=progress)
    assert len(made) == 1 and made[0].result() is not None
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < row["updates"] < c.updates_per_step * c.steps_per_chunk  # warm-up made none
    assert rates == [pytest.approx(row["updates"] / row["chunk_s"], rel=0.01)]
    returns, _ = trainer.evaluate(state, 0)
    # computed as the loop does (a float32 mean over one member's episodes)
    assert row["eval/return_mean"] == float(np.asarray(returns)[0].mean())
