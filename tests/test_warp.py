"""MuJoCo Warp as the physics backend (``--env-options impl=warp``): its refusal without the
extra, float32 parity with Gymnasium for every task, the contact budget and its overflow
counter, and training end to end (population, checkpoints, exact resume, render).

Warp compiles its kernels once per machine (about 15 s on the CPU, cached under
``~/.cache/warp``): the tests share one xdist worker, so that one process compiles them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import base
from envs.base import PhysicsOptions
from envs.parity import one_step_parity, record_one_step
from mjxsac import render
from mjxsac import train as train_cli
from mjxsac.runlog import RunDir
from tests.test_runs import final_state, metrics_without_times

pytestmark = pytest.mark.xdist_group("warp")

# Float32 one-step parity against Gymnasium (float64, C MuJoCo), 100 random-action steps:
# the largest observation difference over the largest |entry| of Gymnasium's observation.
# Measured (python -m launch.fidelity --float32, 200 steps; docs/ENVIRONMENTS.md): 1.9e-6
# (InvertedPendulum) to 2.5e-5 (HalfCheetah), and 6e-5 for Humanoid against Gymnasium's PGS.
# 2e-4 leaves float32's rounding on another CPU a margin of 3x or more.
RELATIVE_OBS = 2e-4
# Humanoid's reference is C MuJoCo with Newton (as in test_parity: Gymnasium's XML asks for
# PGS, which neither MJX backend has).
REFERENCE = {"Humanoid": PhysicsOptions(solver="newton")}


def test_impl_warp_without_the_extra_is_refused_naming_the_install(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown impl 'cuda'; valid: jax, warp"):
        envs.make("Hopper", impl="cuda")
    monkeypatch.setattr(base.mjx_warp, "WARP_INSTALLED", False)
    with pytest.raises(ValueError, match=r"not installed: pip install -e '\.\[warp\]'"):
        envs.make("Hopper", impl="warp")
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--env-options", "impl=warp", "--run-dir", str(tmp_path / "r")])
    message = str(exit_info.value.code)
    assert "pip install -e '.[warp]'" in message and "\n" not in message.strip()
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("task", envs.NAMES)
def test_warp_matches_gymnasium_in_float32(task):
    """Every task but Ant within float32 rounding of C MuJoCo; Ant with the contact error
    that the JAX impl's corrections fix (they cannot run under Warp), in its measured band.
    Terminations agree everywhere."""
    record = record_one_step(task, 100, seed=0, physics=REFERENCE.get(task))
    env = envs.make(task, impl="warp")
    assert env.physics.faithful is False and env.impl == "warp"
    diffs = one_step_parity(env, record)
    assert not diffs["terminated"].any()
    scale = np.abs(np.stack([r.obs for r in record])).max(axis=1)
    relative = diffs["obs"].max(axis=1) / scale
    if task != "Ant":
        assert relative.max() < RELATIVE_OBS, relative.max()
        return
    # Ant keeps the contact-tangent error: measured over 200 steps, relative 0.27 at most,
    # on 42% of the steps above 1e-3 (the same figures as plain mjx.step's, and 3.8e-4, on
    # no step, for the corrected JAX impl's).
    assert 0.05 < relative.max() < 1.0, relative.max()
    assert 0.2 < (diffs["obs"].max(axis=1) > 1e-3).mean() < 0.7


def test_contact_budget_covers_the_batch_and_overflow_is_counted():
    """``reserve`` sizes the contact budget for every world of a call; a batch larger than
    the budget drops contacts, and the step says so (``physics_overflow``)."""
    env = envs.make("Hopper", impl="warp")
    per_world = env._data0._impl.naconmax
    worlds = 32
    # Lying on the floor: every world has its contacts.
    qpos = np.array(env.mj_model.qpos0)
    qpos[1] = -1.0
    keys = jax.random.split(jax.random.key(0), worlds)
    actions = jnp.zeros((worlds, env.action_size))

    def states():  # full Data, made from the env's template as it is now
        return jax.vmap(lambda k: env.reset_to(jnp.asarray(qpos), env.init_qvel, k))(keys)

    short = jax.jit(jax.vmap(env.step))(states(), actions)  # the budget of one world
    assert float(short.metrics[envs.OVERFLOW].sum()) > 0
    env.reserve(worlds)
    assert env._data0._impl.naconmax == worlds * per_world
    full = jax.jit(jax.vmap(env.step))(states(), actions)
    assert float(full.metrics[envs.OVERFLOW].sum()) == 0
    one = jax.jit(env.step)(env.reset_to(jnp.asarray(qpos), env.init_qvel, keys[0]), actions[0])
    np.testing.assert_array_equal(np.asarray(full.obs[0]), np.asarray(one.obs))
    assert "physics_overflow" not in env.metric_names


# Short chunks and episodes: on a CPU Warp costs ~18 ms per batched physics step.
BASE = ["--env", "InvertedPendulum", "--preset", "cpu", "--warmup-steps", "200",
        "--steps-per-chunk", "25", "--episode-length", "25", "--env-options", "impl=warp",
        "--seeds", "0-1", "--checkpoint-every", "1", "--save-buffer"]  # fmt: skip


def test_warp_population_trains_resumes_exactly_and_renders(tmp_path, capsys):
    """Two seeds under Warp, in one program: the uninterrupted run and one stopped after
    a chunk and resumed end in the same state; no step overflowed; the policy renders."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train_cli.main([*BASE, "--run-dir", str(full), "--total-steps", "800"])
    train_cli.main([*BASE, "--run-dir", str(stopped), "--total-steps", "400"])
    train_cli.main(["--resume", str(stopped), "--total-steps", "800"])
    a, b = final_state(full), final_state(stopped)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b))), "resume differs"
    # (the stopped run also evaluated at its last chunk, the first)
    rows_full, rows_stopped = metrics_without_times(full), metrics_without_times(stopped)
    assert rows_stopped[-1] == rows_full[-1] and rows_full[0]["updates"] > 0
    assert {k: v for k, v in rows_stopped[0].items() if k in rows_full[0]} == rows_full[0]
    for member in (0, 1):
        rows = RunDir(full).read_metrics(member)
        assert [r["train/physics_overflows"] for r in rows] == [0.0, 0.0]
        assert np.isfinite(rows[-1]["eval/return_mean"])
    out = tmp_path / "warp.mp4"
    render.main([str(full), "--out", str(out), "--max-steps", "20",
                 "--width", "64", "--height", "48"])  # fmt: skip
    assert out.stat().st_size > 0
    assert f"wrote {out} (21 frames" in capsys.readouterr().out


def test_a_budget_overflow_in_training_is_counted_and_printed(monkeypatch, tmp_path, capsys):
    """Never silent: with Warp's contact budget forced to one contact for all worlds,
    Hopper's first chunk overflows; the run log counts the steps and the console says so."""
    monkeypatch.setattr(base, "_warp_budget", lambda model: (0, 64))
    run_dir = tmp_path / "overflow"
    train_cli.main(["--env", "Hopper", "--preset", "cpu", "--env-options", "impl=warp",
                    "--num-envs", "4", "--eval-envs", "2", "--steps-per-chunk", "5",
                    "--episode-length", "5", "--warmup-steps", "20", "--total-steps", "20",
                    "--updates-per-step", "0",
                    "--run-dir", str(run_dir)])  # fmt: skip
    (row,) = RunDir(run_dir).read_metrics()
    assert row["train/physics_overflows"] > 0
    out = capsys.readouterr().out
    assert "env steps of chunk 1 overflowed MuJoCo Warp's contact or constraint budget" in out
