"""Populations: many seeds and settings trained in one compiled program.

A member of a population is the ordinary run of its seed and values (same initial
parameters; after a chunk, the same up to float32 rounding), varied values are data (no
recompilation), and a population learns, checkpoints, resumes exactly, resumes with a new
learning rate and renders a member, all from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import imageio.v2 as imageio
import jax
import numpy as np
import pytest

from mjxsac import evaluate, export, policy, presets, render
from mjxsac import train as train_cli
from mjxsac.checkpoint import Checkpoints
from mjxsac.config import Config
from mjxsac.runlog import RunDir
from mjxsac.sac import Trainer, env_steps

pytestmark = pytest.mark.xdist_group("population")

# The `cpu` preset with a short warm-up: 2,000 env steps per chunk.
SHORT = {"warmup_steps": 1_000, "total_steps": 2_000}
CLI = ["--env", "InvertedPendulum", "--preset", "cpu", "--warmup-steps", "1000"]
SOLVED = 900.0
# A member and the single run of its seed and values agree to float32 rounding (batched
# against unbatched matrix products): measured 5e-7 in the critic after a chunk of 70
# train steps (1,000 warm-up env steps, then 28 updates), while members of another seed
# differ by ~2. Over longer chunks the closed loop amplifies rounding (a
# pendulum that falls one step earlier changes the data): after 125 train steps the
# parameters differed by 0.02, so the comparison uses the short chunk.
ROUNDING = 1e-5


def config(**extra):
    base = presets.config_for("InvertedPendulum", "sac-v2", "cpu")
    return dataclasses.replace(base, **SHORT, **extra)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(a), leaves(b), strict=True))


def test_a_member_is_the_single_run_of_its_seed_and_values(compile_count):
    population = Trainer(config(seeds="1,4", vary=("critic_lr=1e-4,3e-4",), steps_per_chunk=70))
    assert [(m.seed, m.critic_lr) for m in population.members] == [
        (1, 1e-4), (4, 1e-4), (1, 3e-4), (4, 3e-4)
    ]  # fmt: skip
    assert Config.from_dict(population.run_config.to_dict()) == population.run_config
    pop_state = population.init()
    member = 2
    single = Trainer(config(seed=1, critic_lr=3e-4, steps_per_chunk=70))
    one_state = single.init()
    pick = jax.tree.map(lambda x: x[member], pop_state)
    assert max_difference(pick.actor, jax.tree.map(lambda x: x[0], one_state.actor)) == 0.0
    assert max_difference(pick.critic, jax.tree.map(lambda x: x[0], one_state.critic)) == 0.0
    pop_state, _ = population.train_chunk(pop_state)
    one_state, _ = single.train_chunk(one_state)
    after = {
        name: max_difference(
            jax.tree.map(lambda x: x[member], getattr(pop_state, name)),
            jax.tree.map(lambda x: x[0], getattr(one_state, name)),
        )
        for name in ("actor", "critic", "log_alpha")
    }
    assert max(after.values()) < ROUNDING, after
    lr = np.asarray(pop_state.critic_opt.hyperparams["learning_rate"])
    np.testing.assert_allclose(lr, [1e-4, 1e-4, 3e-4, 3e-4], rtol=1e-6)
    # Members of another value (0: the same seed, a third of the rate: measured 7e-3) or
    # another seed (3: measured ~2) differ far beyond rounding.
    for other, factor in ((0, 100), (3, 1e4)):
        gap = max_difference(
            jax.tree.map(lambda x, o=other: x[o], pop_state.critic),
            jax.tree.map(lambda x: x[member], pop_state.critic),
        )
        assert gap > factor * ROUNDING, (other, gap)


def test_varied_values_and_seeds_do_not_recompile(compile_count):
    first = Trainer(config(vary=("gamma=0.9,0.99",)))
    state, _ = first.train_chunk(first.init())
    jax.block_until_ready(first.evaluate(state, 0))
    before = compile_count()
    state, _ = first.train_chunk(state)
    jax.block_until_ready(state)
    assert compile_count() == before, "a second chunk compiles nothing"
    other = Trainer(config(seed=5, vary=("gamma=0.95,0.97",), critic_lr=1e-3, tau=0.01))
    assert other == first, "data fields are not part of the program"
    state, _ = other.train_chunk(other.init())
    jax.block_until_ready(other.evaluate(state, 0))
    assert compile_count() == before, "other seeds and values reuse the compiled programs"
    np.testing.assert_allclose(np.asarray(state.hparams["gamma"]), [0.95, 0.97])


# The population run: the `cpu` preset as users get it (2,000 warm-up steps), to
# LEARN_STEPS. Measured (docs/BENCHMARKS.md, "Learning tests"): of 16 seeds of this
# configuration, 14 had reached 1,000 by 12,000 env steps and all 16 by 14,000; the test
# asks 3 of 4 members to pass 900 by 16,000, so it fails only if a member in four misses
# a budget two evaluations beyond the one every measured seed met.
LEARN_STEPS = 16_000


@pytest.fixture(scope="session")  # not "module": xdist may interleave other modules
def population_run(tmp_path_factory) -> Path:
    """``--seeds 0-3`` on InvertedPendulum, ``LEARN_STEPS`` env steps, a checkpoint (with
    the buffers) every chunk."""
    run_dir = tmp_path_factory.mktemp("population") / "run"
    train_cli.main(["--env", "InvertedPendulum", "--preset", "cpu", "--seeds", "0-3",
                    "--total-steps", str(LEARN_STEPS), "--eval-every", "1",
                    "--checkpoint-every", "1", "--keep-checkpoints", "2", "--save-buffer",
                    "--run-dir", str(run_dir)])  # fmt: skip
    return run_dir


def solved_members(curves: list[list[float]]) -> int:
    """Members whose best evaluation reached ``SOLVED``."""
    return sum(max(c) >= SOLVED for c in curves)


def test_every_member_of_a_population_learns(population_run, capsys):
    members = json.loads((population_run / "population.json").read_text())
    assert [(m["index"], m["seed"]) for m in members] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    curves = [
        [r["eval/return_mean"] for r in RunDir(population_run).read_metrics(k)] for k in range(4)
    ]
    assert all(len(c) == LEARN_STEPS // 2000 for c in curves), curves
    assert solved_members(curves) >= 3, curves
    summary = RunDir(population_run).read_metrics()
    assert [r["env_steps"] for r in summary] == list(range(2000, LEARN_STEPS + 1, 2000))
    assert {"eval/return_best", "eval/return_median", "eval/return_worst"} <= set(summary[-1])
    assert (population_run / "learning_curve.png").stat().st_size > 10_000


def final_state(run_dir: Path):
    ckpt = Checkpoints(run_dir / "checkpoints", read_only=True)
    return jax.tree.map(np.asarray, ckpt.restore(Trainer(ckpt.config())))


def resumed_copy(run_dir: Path, target: Path) -> Path:
    """A copy of the run stopped one chunk before its end: the final checkpoint moved out."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns(".lock"))
    shutil.move(target / "checkpoints" / str(LEARN_STEPS), target / "later")
    return target


def test_population_resumes_exactly(population_run, tmp_path):
    run_dir = resumed_copy(population_run, tmp_path / "resumed")
    train_cli.main(["--resume", str(run_dir), "--total-steps", str(LEARN_STEPS)])
    a, b = final_state(population_run), final_state(run_dir)
    assert env_steps(b) == LEARN_STEPS
    same = jax.tree.map(np.array_equal, a, b)
    assert all(jax.tree.leaves(same)), "resumed population differs from the uninterrupted one"


def test_resume_with_a_lower_learning_rate(population_run, tmp_path):
    run_dir = resumed_copy(population_run, tmp_path / "lower-lr")
    train_cli.main(
        ["--resume", str(run_dir), "--total-steps", str(LEARN_STEPS), "--critic-lr", "1e-4"]
    )
    state = final_state(run_dir)
    np.testing.assert_allclose(state.critic_opt.hyperparams["learning_rate"], [1e-4] * 4)
    np.testing.assert_allclose(state.actor_opt.hyperparams["learning_rate"], [3e-4] * 4)
    assert json.loads((run_dir / "config.json").read_text())["critic_lr"] == 1e-4
    rows = RunDir(run_dir).read_metrics()
    assert [r["env_steps"] for r in rows] == list(range(2000, LEARN_STEPS + 1, 2000)), "continued"
    uninterrupted = final_state(population_run)
    assert max_difference(state.critic, uninterrupted.critic) > 0, "the new rate took effect"


def test_render_a_member_and_by_default_the_best(population_run, tmp_path, capsys):
    out = tmp_path / "member.mp4"
    render.main([str(population_run), "--member", "2", "--out", str(out), "--max-steps", "30",
                 "--width", "64", "--height", "48"])  # fmt: skip
    assert "member 2" in capsys.readouterr().out
    assert len(imageio.mimread(out, memtest=False)) >= 2
    meta = Checkpoints(population_run / "checkpoints", read_only=True).meta()
    best = int(np.argmax(meta["eval_returns"]))
    render.main([str(population_run), "--out", str(tmp_path / "best.mp4"), "--max-steps", "5",
                 "--width", "64", "--height", "48"])  # fmt: skip
    assert f"member {best}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"members 0\.\.3"):
        render.main([str(population_run), "--member", "7", "--out", str(tmp_path / "x.mp4")])


def test_eval_scores_the_best_member_in_mjx_and_in_gymnasium(population_run, tmp_path, capsys):
    """Both near 1,000: the best member (the default) balances the pendulum in MJX and in
    Gymnasium's own InvertedPendulum-v5 (C MuJoCo, float64)."""
    mjx = evaluate.evaluate_run(population_run, episodes=3, out=tmp_path / "mjx.json")
    video = tmp_path / "gym.mp4"
    evaluate.main([str(population_run), "--gymnasium", "--episodes", "3",
                   "--video", str(video), "--width", "64", "--height", "48",
                   "--out", str(tmp_path / "gym.json")])  # fmt: skip
    gym = json.loads((tmp_path / "gym.json").read_text())
    out = capsys.readouterr().out
    assert "3 deterministic episodes in Gymnasium's InvertedPendulum-v5" in out
    assert mjx["member"] == gym["member"]
    assert json.loads((tmp_path / "mjx.json").read_text()) == mjx
    assert mjx["return_mean"] >= SOLVED and gym["return_mean"] >= SOLVED, (mjx, gym)
    assert len(gym["returns"]) == len(gym["lengths"]) == 3
    assert len(imageio.mimread(video, memtest=False)) == sum(gym["lengths"]) + 3
    member = evaluate.evaluate_run(population_run, member=2, episodes=1, seed=5,
                                   out=tmp_path / "m2.json")  # fmt: skip
    assert member["member"] == 2 and member["seed"] == 5
    with pytest.raises(SystemExit, match=r"members 0\.\.3"):
        evaluate.main([str(population_run), "--member", "4"])


def test_export_a_member_as_onnx_and_npz(population_run, tmp_path):
    """The written model, run by onnxruntime on new observations, gives the JAX policy's
    actions; its input takes any batch."""
    import onnxruntime

    written = export.export_run(population_run, member=1, onnx_path=tmp_path / "p.onnx",
                                npz_path=tmp_path / "p.npz")  # fmt: skip
    assert written["member"] == 1 and written["max_abs_diff"] < export.TOLERANCE
    loaded = policy.load(population_run, member=1)
    obs = np.asarray(policy.observations(loaded.trainer, loaded.policy, 4, 50, jax.random.key(7)))
    want = np.asarray(policy.act(loaded.trainer, loaded.policy, obs))
    session = onnxruntime.InferenceSession(tmp_path / "p.onnx", providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert (given.name, given.shape) == ("obs", ["batch", 4])
    for rows in (obs, obs[:3]):
        got = session.run(["action"], {"obs": rows})[0]
        assert np.max(np.abs(got - want[: len(rows)])) < export.TOLERANCE
    weights = np.load(tmp_path / "p.npz")
    assert weights["kernel_0"].shape == (4, 256) and weights["kernel_2"].shape == (256, 1)
    assert float(weights["obs_clip"]) == 10.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vary", "batch_size=128,256"], "a shape of the program"),
        (["--vary", "critic_lr=1e-4,abc"], "values must be numbers"),
        (["--seeds", "3-1"], "is empty"),
        (["--seeds", "0-1", "--vary", "gamma=0.9,1.5"], "gamma must be in (0, 1]"),
        (["--seeds", "0-999", "--buffer-size", str(10**9)], "members' replay buffers need"),
    ],
)
def test_bad_populations_are_refused_before_compiling(argv, message, compile_count, tmp_path):
    Trainer(config())  # building the env runs (and compiles) eager ops once per process
    before = compile_count()
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*CLI, *argv, "--run-dir", str(tmp_path / "bad")])
    assert message in str(exit_info.value.code)
    assert compile_count() == before


def test_wandb_logs_each_member_as_a_run_of_its_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    run_dir = tmp_path / "pop-wandb"
    # The programs of test_varied_values_and_seeds_do_not_recompile: nothing new compiles.
    train_cli.main([*CLI, "--vary", "gamma=0.9,0.99", "--total-steps", "2000", "--wandb",
                    "--wandb-project", "mjxsac-test", "--run-dir", str(run_dir)])  # fmt: skip
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2, "one wandb run per member"
    logs = [next(d.glob("run-*.wandb")).read_bytes() for d in offline]
    for log in logs:
        assert b"pop-wandb" in log, "grouped under the population's name"
        assert b"eval/return_mean" in log and b"loss/critic_loss" in log
    assert any(b"0.9" in log for log in logs) and any(b"0.99" in log for log in logs)
    # The run's checkpoint serves one more check: a resume cannot give the varied field a
    # new value (every member keeps its own), and the refusal changes nothing.
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(SystemExit, match=r"the population varies gamma \(each member's own: "):
        train_cli.main(["--resume", str(run_dir), "--gamma", "0.95"])
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
