"""Runs users can keep: checkpoints and exact resume, safe failure, rendering, wandb,
sweeps. All on InvertedPendulum with one shared config (one xdist worker), so the programs
compiled for the first run serve the others: the fields that differ between these runs
never reach the compiled code."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
import yaml

import envs
from mjxsac import render
from mjxsac import train as train_cli
from mjxsac.checkpoint import CheckpointError, Checkpoints
from mjxsac.config import FORMAT_VERSION, Config
from mjxsac.runlog import RunDir, RunDirError
from mjxsac.sac import Trainer, env_steps

pytestmark = pytest.mark.xdist_group("runs")

# The `cpu` preset with 2,000 env steps per chunk and a short warm-up.
BASE = ["--env", "InvertedPendulum", "--preset", "cpu", "--warmup-steps", "1000"]
SWEEPS = Path(__file__).parent.parent / "launch" / "sweeps"


def run_cli(run_dir: Path, *extra: str) -> None:
    train_cli.main([*BASE, "--run-dir", str(run_dir), *extra])


def final_state(run_dir: Path):
    ckpt = Checkpoints(run_dir / "checkpoints", read_only=True)
    trainer = Trainer(ckpt.config())
    return jax.tree.map(np.asarray, ckpt.restore(trainer))


def metrics_without_times(run_dir: Path) -> list[dict]:
    rows = RunDir(run_dir).read_metrics()
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """An uninterrupted run of 3 chunks, checkpointing every chunk with the buffer."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    run_cli(run_dir, "--total-steps", "6000", "--checkpoint-every", "1", "--save-buffer")
    return run_dir


def test_checkpoint_contents(trained):
    ckpt = Checkpoints(trained / "checkpoints", read_only=True)
    assert ckpt.steps() == [2000, 4000, 6000]
    last_eval = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])[
        "eval/return_mean"
    ]
    assert ckpt.meta() == {
        "env_steps": 6000,
        "has_buffer": True,
        "env_devices": 1,
        "eval_return": last_eval,
        "eval_returns": [last_eval],
    }
    assert ckpt.config().to_saved() == json.loads((trained / "config.json").read_text())
    state = final_state(trained)
    assert env_steps(state) == 6000 and int(state.buffer.size[0]) == 6000
    assert np.isfinite(state.log_alpha)


def test_resume_with_buffer_continues_exactly(trained, tmp_path):
    """Stopped after 2 chunks and resumed for 1 more: the same parameters, optimizer
    states, buffer, env states, keys and metrics as the uninterrupted run."""
    run_dir = tmp_path / "interrupted"
    run_cli(run_dir, "--total-steps", "4000", "--checkpoint-every", "1", "--save-buffer")
    train_cli.main(["--resume", str(run_dir), "--total-steps", "6000"])
    a, b = final_state(trained), final_state(run_dir)
    same = jax.tree.map(np.array_equal, a, b)
    assert all(jax.tree.leaves(same)), "resumed state differs from the uninterrupted one"
    assert metrics_without_times(run_dir) == metrics_without_times(trained)


def test_a_checkpoint_of_another_format_version_is_refused(trained, tmp_path):
    """A run whose checkpoints were written in another format version is refused in one
    line naming both versions; none of its checkpoints is skipped as damaged or moved."""
    run_dir = copy_run(trained, tmp_path / "older")
    for step_dir in (run_dir / "checkpoints").iterdir():
        path = step_dir / "config" / "metadata"
        path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 0}))
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--resume", str(run_dir)])
    message = str(exit_info.value.code)
    assert "format version 0" in message and f"format version {FORMAT_VERSION}" in message
    assert "\n" not in message.strip() and not (run_dir / "checkpoints-unusable").exists()


def test_resume_refuses_another_task_or_algorithm(trained, capsys):
    for flag, value in (("--env", "Hopper"), ("--algo", "sac-v1"), ("--num-envs", "8")):
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main(["--resume", str(trained), flag, value])
        assert "different run" in str(exit_info.value.code)
        assert flag.lstrip("-").replace("-", "_") in str(exit_info.value.code)
    with pytest.raises(SystemExit, match="no checkpoint"):
        train_cli.main(["--resume", str(trained.parent / "missing")])


def test_checkpoint_of_another_run_does_not_restore(trained, tmp_path):
    hopper = Trainer(train_cli.parse_args(["--env", "Hopper", "--preset", "cpu"])[0])
    with pytest.raises(CheckpointError, match="different run"):
        Checkpoints(trained / "checkpoints", read_only=True).restore(hopper)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "stopped"
    metrics = run_dir / "metrics.jsonl"

    def stop_after_first_chunk():
        while not metrics.exists() or not metrics.read_text():
            time.sleep(0.05)
        # As GNU timeout and batch schedulers send it: to the process and to its group,
        # one request in two signals.
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_after_first_chunk, daemon=True).start()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(run_dir, "--total-steps", "10000", "--checkpoint-every", "100")
    assert exit_info.value.code == 128 + signal.SIGTERM
    ckpt = Checkpoints(run_dir / "checkpoints", read_only=True)
    stopped_at = ckpt.latest()
    assert stopped_at in (2000, 4000), "saved at the end of the chunk the signal fell in"
    assert not ckpt.meta()["has_buffer"]
    # Resuming without a saved buffer: the run refills it, then learns on to the end.
    train_cli.main(["--resume", str(run_dir), "--total-steps", str(stopped_at + 2000)])
    rows = RunDir(run_dir).read_metrics()
    assert [r["env_steps"] for r in rows] == list(range(2000, stopped_at + 2001, 2000))


def test_non_finite_values_stop_the_run_and_keep_the_last_checkpoint(trained, tmp_path):
    run_dir = tmp_path / "nan"
    ckpt = Checkpoints(trained / "checkpoints", read_only=True)
    trainer = Trainer(ckpt.config())
    good = ckpt.restore(trainer, 4000)
    poisoned = good.replace(critic=jax.tree.map(lambda x: x * np.nan, good.critic))
    with pytest.raises(train_cli.NonFiniteError, match=r"non-finite \S+.* at env step"):
        train_cli.train(trainer, RunDir(run_dir), poisoned)
    assert (
        not (run_dir / "checkpoints").exists()
        or not Checkpoints(run_dir / "checkpoints", read_only=True).steps()
    ), "nothing is saved from a non-finite state"


def test_check_finite_names_the_quantity_and_step():
    cfg = train_cli.Config(num_envs=4, steps_per_chunk=10)
    metrics = {"critic_loss": np.array([1.0, 2.0, np.inf, np.nan] + [0.0] * 6)}
    state = Trainer(cfg).init()
    metrics = {k: v[:, None] for k, v in metrics.items()}  # (train step, member)
    with pytest.raises(train_cli.NonFiniteError) as info:
        train_cli.check_finite(metrics, state, chunk=2, c=cfg, saved=40)
    # chunk 2 starts at env step 80; the third train step ends at 80 + 3 * 4.
    assert "non-finite critic_loss at env step 92" in str(info.value)
    assert "checkpoint 40 is intact" in str(info.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--env", "Hopperr"], "unknown env"),
        (["--num-envs", "-4"], "num_envs must be a positive integer"),
        (
            ["--batch-size", "5000", "--buffer-size", "1000", "--warmup-steps", "0"],
            "batch_size (5000) exceeds",
        ),
        (["--buffer-size", str(10**12)], "the replay buffer needs"),
        (["--env-options", "iterations=0"], "iterations must be a positive integer"),
        (["--preset", "fastest"], "unknown preset"),
        (["--env-options", "reset_noise_scale=abc"], "reset_noise_scale must be a number"),
    ],
)
def test_bad_configs_are_refused_before_compiling(argv, message, compile_count, tmp_path):
    Trainer(train_cli.parse_args(BASE)[0])  # building the env compiles eager ops once
    before = compile_count()
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*argv, "--run-dir", str(tmp_path / "bad")])
    assert message in str(exit_info.value.code)
    assert compile_count() == before
    assert not (tmp_path / "bad").exists(), "nothing written for a refused config"


def test_render_writes_a_moving_video(trained, tmp_path, capsys):
    out = tmp_path / "pendulum.mp4"
    render.main([str(trained), "--out", str(out), "--max-steps", "120", "--gif",
                 "--width", "160", "--height", "120", "--episodes", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "episode 0: return" in printed and "episode 1: return" in printed
    frames = np.asarray(imageio.mimread(out, memtest=False)).astype(np.float32)
    assert frames.shape[1:] == (120, 160, 3) and len(frames) >= 2 * 20
    assert frames.std() > 5, "frames are not blank"
    moving = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3)) > 0.01
    assert moving.mean() > 0.5, "the pendulum moves in most frames"
    assert out.with_suffix(".gif").stat().st_size > 1000


def test_policy_saved_alone_renders_and_refuses_to_resume(trained, tmp_path, capsys):
    """The GPU check's phase e (``launch/gpu_check.py``): a policy saved alone (actor and
    normalizer, no TrainState) is a small run directory that mjxsac-render loads; a resume
    names why it cannot use it."""
    from launch.gpu_check import save_policy

    ckpt = Checkpoints(trained / "checkpoints", read_only=True)
    config = ckpt.config()
    trainer = Trainer(config)
    step, policy = ckpt.restore_policy(trainer)
    saved = save_policy(tmp_path / "policy", jax.device_get(policy), config, step, [7.0])
    assert saved["loads_back"] and saved["env_steps"] == step == 6000
    assert saved["bytes"] < 2**20 and saved["under_16_mib"]
    assert Checkpoints(tmp_path / "policy" / "checkpoints", read_only=True).meta() == {
        "env_steps": 6000, "has_buffer": False, "policy_only": True, "eval_return": 7.0,
        "eval_returns": [7.0]}  # fmt: skip
    out = tmp_path / "v.mp4"
    render.main([str(tmp_path / "policy"), "--out", str(out), "--max-steps", "5",
                 "--width", "64", "--height", "48"])  # fmt: skip
    assert "at env step 6,000" in capsys.readouterr().out and out.stat().st_size > 0
    with pytest.raises(CheckpointError, match="none of the checkpoints"):
        Checkpoints(tmp_path / "policy" / "checkpoints", read_only=True).restore(trainer)
    assert "it holds the policy alone" in capsys.readouterr().err


def test_render_refuses_a_path_without_checkpoints(tmp_path):
    with pytest.raises(SystemExit, match="neither a run directory nor a checkpoint"):
        render.main([str(tmp_path)])


def test_wandb_offline_logs_metrics_config_and_video(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "wandb-run"
    run_cli(run_dir, "--total-steps", "2000", "--wandb", "--wandb-project", "mjxsac-test")
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    # The offline transaction log (protobuf records) holds the config and every metric
    # the run logged; `wandb sync` uploads exactly this file.
    log = next(offline[0].glob("run-*.wandb")).read_bytes()
    for key in (b"critic_layer_norm", b"InvertedPendulum", b"eval/return_mean",
                b"loss/critic_loss", b"train/reward"):  # fmt: skip
        assert key in log, key
    assert list((offline[0] / "files" / "media" / "videos").glob("*.mp4")), "final video"
    assert (run_dir / "final.mp4").stat().st_size > 1000
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "learning_curve.png").exists()


def sample(spec: dict, rng: np.random.Generator):
    """Draw one value the way wandb's sweep controller does, for the kinds we use."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][rng.integers(len(spec["values"]))]
    kind = spec["distribution"]
    if kind == "log_uniform_values":
        return float(np.exp(rng.uniform(np.log(spec["min"]), np.log(spec["max"]))))
    if kind == "int_uniform":
        return int(rng.integers(spec["min"], spec["max"] + 1))
    if kind == "uniform":
        return float(rng.uniform(spec["min"], spec["max"]))
    raise AssertionError(f"sampler does not know {kind!r}: extend it with the sweep")


SWEEP_CASES = [pytest.param(t, [], id=t) for t in envs.NAMES]
SWEEP_CASES.append(pytest.param("Hopper", ["--seeds", "0-3"], id="Hopper-seeds"))


@pytest.mark.parametrize("task, extra", SWEEP_CASES)
def test_sweep_runs_as_the_wandb_agent_starts_it(task, extra, tmp_path, monkeypatch, capfd):
    """Load the sweep, sample it, and let wandb's own agent code build and start the
    command (values on the command line and in WANDB_SWEEP_PARAM_PATH); the run's
    config must hold the sampled values. ``--dry-run`` stops before training and prints
    the resolved config, writing nothing."""
    from wandb.wandb_agent import Agent

    sweep = yaml.safe_load((SWEEPS / f"{task}.yaml").read_text())
    assert sweep["metric"] == {"name": "eval/return_mean", "goal": "maximize"}
    rng = np.random.default_rng(envs.NAMES.index(task))
    params = {k: sample(v, rng) for k, v in sweep["parameters"].items()}
    assert params["env"] == task
    # Both boolean paths: True reaches the program as a bare flag; False is left off the
    # command line by ${args_no_boolean_flags} and must arrive through run.config.
    params["critic_layer_norm"] = params["preset"] == "cpu"
    command = list(sweep["command"])
    for arg in ["--dry-run", *extra]:  # e.g. several seeds of the sampled setting
        command.insert(command.index("${args_no_boolean_flags}"), arg)
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                       "WANDB_SWEEP_ID": "test", "WANDB_RUN_ID": "", "WANDB_SWEEP_PARAM_PATH": "",
                       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                       "JAX_PLATFORMS": "cpu"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    agent = Agent(api=None, queue=None, sweep_id="test")
    agent._sweep_command = command
    run_id = f"run{task.lower()}"
    args = {k: {"value": v} for k, v in params.items()}
    agent._command_run({"run_id": run_id, "program": sweep["program"], "args": args})
    assert agent._run_processes[run_id].wait(timeout=300) == 0
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"
    out = capfd.readouterr().out
    saved = json.loads(out[out.index("{\n") : out.index("\n}\n") + 2])
    for key, value in params.items():
        assert saved[key] == value, key
    assert saved["wandb"] is True
    if extra:
        assert saved["seeds"] == "0-3" and Config.from_dict(saved).population_size == 4


# ---- runs that never lose data -------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file() and p.name != ".lock"}  # fmt: skip


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def test_new_run_refuses_a_directory_that_holds_a_run(trained):
    before = snapshot(trained)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(trained, "--total-steps", "2000")
    message = str(exit_info.value.code)
    assert "already holds a run" in message and f"--resume {trained}" in message
    assert "fresh --run-dir" in message
    assert snapshot(trained) == before, "the old run's files are untouched"


HOLD_LOCK = """
import sys, time
from mjxsac.runlog import RunDir, RunDirError
runs = [RunDir(path) for path in sys.argv[1:]]
for run in runs:
    run.claim(resume=True)
print("locked", flush=True)
time.sleep(120)
"""


def test_two_processes_cannot_share_a_run_directory(trained, tmp_path):
    """Another process holds a run (a resume) and an empty directory (a new run): both
    are refused, naming the process; once it has died, its stale lock is reported."""
    import subprocess

    held, fresh = copy_run(trained, tmp_path / "held"), tmp_path / "fresh"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(held), str(fresh)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (["--resume", str(held)], [*BASE, "--run-dir", str(fresh)]):
            with pytest.raises(SystemExit) as exit_info:
                train_cli.main(argv)
            assert f"in use by process {holder.pid} on" in str(exit_info.value.code)
    finally:
        holder.kill()  # SIGKILL: the holder cannot clean up its lock file
        holder.wait()
    assert not (fresh / "config.json").exists() and not (fresh / "checkpoints").exists()
    run = RunDir(held)
    notice = run.claim(resume=True)
    assert notice and f"process {holder.pid}" in notice and "stale lock" in notice
    run.release()
    assert RunDir(held).claim(resume=True) is None, "a released lock is free, not stale"


def test_best_checkpoint_survives_resumes(trained, tmp_path):
    """Each 'process' opens the checkpoints anew, as a resumed run does; with one latest
    checkpoint kept, the best by eval return must stay through two resumes."""
    ckpt = Checkpoints(trained / "checkpoints", read_only=True)
    config = ckpt.config()
    state = ckpt.restore(Trainer(config), 2000).replace(buffer=None)
    returns = {1000: 5.0, 2000: 900.0, 3000: 7.0, 4000: 1.0, 5000: 3.0, 6000: None}
    steps = iter(sorted(returns))
    for _process in range(3):  # the first run, then two resumes
        manager = Checkpoints(tmp_path / "checkpoints", keep=1)
        for _ in range(2):
            step = next(steps)
            scores = None if returns[step] is None else [returns[step]]
            manager.save(state.replace(env_steps=np.full(1, step, np.int32)), config, False, scores)
        manager.close()
    assert Checkpoints(tmp_path / "checkpoints", read_only=True).steps() == [2000, 6000]


def damage(step_dir: Path, kind: str) -> None:
    if kind == "truncated data file":
        data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)  # fmt: skip
        data.write_bytes(data.read_bytes()[:1000])
    elif kind == "missing manifest":
        (step_dir / "state" / "manifest.ocdbt").unlink()
    elif kind == "emptied config":
        (step_dir / "config" / "metadata").write_text("{}")


@pytest.mark.parametrize("kind", ["truncated data file", "missing manifest", "emptied config"])
def test_damaged_latest_checkpoint_is_skipped_with_a_notice(trained, tmp_path, kind, capsys):
    run_dir = copy_run(trained, tmp_path / "damaged")
    damage(run_dir / "checkpoints" / "6000", kind)
    ckpt = Checkpoints(run_dir / "checkpoints", read_only=True)
    state = ckpt.restore(Trainer(ckpt.config()))
    assert env_steps(state) == 4000
    err = capsys.readouterr().err
    assert f"skipping checkpoint {run_dir / 'checkpoints' / '6000'}" in err
    assert "Traceback" not in err
    assert (run_dir / "checkpoints" / "6000").exists(), "reading deletes nothing"


def test_resume_falls_back_past_a_damaged_checkpoint(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path / "fallback")
    damage(run_dir / "checkpoints" / "6000", "truncated data file")
    train_cli.main(["--resume", str(run_dir), "--total-steps", "6000"])
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "checkpoints-unusable" in err
    assert (run_dir / "checkpoints-unusable" / "6000" / "state").is_dir(), "set aside, kept"
    ckpt = Checkpoints(run_dir / "checkpoints", read_only=True)
    assert ckpt.steps() == [2000, 4000, 6000]
    assert env_steps(ckpt.restore(Trainer(ckpt.config()))) == 6000, "saved anew"
    assert [r["env_steps"] for r in RunDir(run_dir).read_metrics()] == [2000, 4000, 6000]


def test_partial_metrics_line_does_not_block_resume(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path / "partial")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"chunk": 3, "env_st')  # a process killed in the middle of a write
    assert len(RunDir(run_dir).read_metrics()) == 3
    train_cli.main(["--resume", str(run_dir), "--total-steps", "6000"])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["env_steps"] for line in lines] == [2000, 4000, 6000]
    (run_dir / "metrics.jsonl").write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(RunDirError, match="line 2 is not JSON"):
        RunDir(run_dir).read_metrics()


def test_resume_refuses_a_preset(trained):
    before = snapshot(trained)
    for argv in (["--preset", "paper"], ["--preset=paper"]):
        with pytest.raises(SystemExit, match="--preset cannot be combined with --resume"):
            train_cli.main(["--resume", str(trained), *argv])
    assert snapshot(trained) == before


def one_line(exit_info, capsys, prog: str = "mjxsac-train") -> str:
    message = str(exit_info.value.code)
    assert message.startswith(f"{prog}: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--env-options", "reset_noise_scale=abc"], "reset_noise_scale must be a number"),
        (["--env", "Hopper", "--env-options", "ctrl_cost_weight=abc"],
         "Hopper option ctrl_cost_weight must be a number, got 'abc'"),
        (["--env", "Hopper", "--env-options", "terminate_when_unhealthy=1"],
         "terminate_when_unhealthy must be true or false"),
    ],
)  # fmt: skip
def test_task_options_of_the_wrong_type_are_one_line_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*argv, "--run-dir", str(tmp_path / "bad")])
    assert message in one_line(exit_info, capsys)


def test_unwritable_run_directory_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(blocker / "run", "--total-steps", "2000")
    message = one_line(exit_info, capsys)
    assert "creating the run directory" in message and "Not a directory" in message


def test_disk_full_stops_the_run_and_keeps_the_last_checkpoint(trained, tmp_path, capsys):
    """A real full disk: a 4 MiB tmpfs holds the first checkpoint (3.5 MB) but not the
    second. Needs permission to mount (root, as in CI here)."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here; test_write_failure_... covers the path")
    try:
        run_dir = mount / "run"
        with pytest.raises(SystemExit) as exit_info:
            run_cli(run_dir, "--total-steps", "10000", "--checkpoint-every", "1")
        message = one_line(exit_info, capsys)
        assert "No space left on device" in message and "free some space" in message
        assert f"--resume {run_dir}" in message
        ckpt = Checkpoints(run_dir / "checkpoints", read_only=True)
        assert ckpt.steps() == [2000]
        assert env_steps(ckpt.restore(Trainer(ckpt.config()))) == 2000
        rows = RunDir(run_dir).read_metrics()
        assert len(rows) <= 3, "stopped at the first chunk boundary after the failed save"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_write_failure_stops_the_run_at_once(tmp_path, capsys, monkeypatch):
    """The same path by a fault injected at the metrics write (works without mounting)."""
    import errno

    written = []

    def append(self, row):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))
        written.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    monkeypatch.setattr(RunDir, "append_metrics", append)
    run_dir = tmp_path / "enospc"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(run_dir, "--total-steps", "10000", "--checkpoint-every", "1")
    message = one_line(exit_info, capsys)
    assert "writing metrics.jsonl failed (No space left on device" in message
    assert len(written) == 1, "no chunk trained after the failure"
    assert Checkpoints(run_dir / "checkpoints", read_only=True).steps() == [2000]


def test_render_into_an_unwritable_place_fails_before_the_rollout(trained, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        render.main([str(trained), "--out", str(blocker / "v.mp4")])
    message = one_line(exit_info, capsys, "mjxsac-render")
    assert "writing the video" in message and "parents are directories" in message
    assert "episode 0" not in capsys.readouterr().out, "no rollout before the check"
    assert time.monotonic() - start < 30


def test_render_without_osmesa_is_a_one_line_error(trained, tmp_path):
    import ctypes.util
    import subprocess

    if ctypes.util.find_library("OSMesa"):
        pytest.skip("libOSMesa is installed here")
    env = {**os.environ, "MUJOCO_GL": "osmesa", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "mjxsac.render", str(trained), "--out", str(tmp_path / "v.mp4")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr
    assert lines[-1].startswith("mjxsac-render: no headless OpenGL with MUJOCO_GL=osmesa")
    assert "libosmesa6" in lines[-1] and "MUJOCO_GL=egl" in lines[-1]


def test_second_signal_during_compilation_stops_at_once(tmp_path):
    """The first request says what will happen; the second, sent while the first chunk is
    still compiling, ends the process within seconds, without a traceback. The first is a
    SIGHUP (a dropped ssh session) sent as ``timeout`` and batch schedulers send a signal,
    to the process and to its group: one request in two signals, so the run goes on."""
    import subprocess

    run_dir = tmp_path / "signals"
    # Another config than the other tests' (batch size): this process must compile.
    argv = [*BASE, "--batch-size", "128", "--total-steps", "4000", "--run-dir", str(run_dir)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mjxsac.train", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        for line in proc.stdout:  # printed right before the first chunk compiles
            if line.startswith("run directory"):
                break
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGHUP)
        os.killpg(proc.pid, signal.SIGHUP)
        first_line = proc.stderr.readline()
        while "no accelerator" in first_line or not first_line.strip():
            first_line = proc.stderr.readline()
        assert "SIGHUP received: finishing the running chunk" in first_line
        time.sleep(1.5)
        assert proc.poll() is None, "one request, delivered twice, does not stop at once"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        stopped_after = time.monotonic() - sent
        rest = proc.stderr.read()
    finally:
        proc.kill()
    assert code == 130
    assert stopped_after < 3.0, stopped_after
    assert "second signal (SIGINT)" in rest and "Traceback" not in rest
    assert "no checkpoint was saved yet" in rest and "--resume" not in rest
    assert not (run_dir / "metrics.jsonl").exists(), "stopped during the first compilation"


# ---- a resume applies what it is asked, or changes nothing ---------------------------------


def test_resume_dry_run_and_refusals_change_nothing(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path / "asked")
    before = snapshot(run_dir)
    train_cli.main(["--resume", str(run_dir), "--dry-run", "--critic-lr", "1e-4"])
    captured = capsys.readouterr()
    assert "the resume changes critic_lr 0.0003 -> 0.0001" in captured.err
    assert "nothing written" in captured.out
    for argv, message in [
        (["--total-steps", "4000"], "total_steps 4,000 is below the 6,000 env steps"),
        (["--run-dir", str(tmp_path / "elsewhere")], "--run-dir cannot be combined"),
        (["--dry-run", "--total-steps", "2000"], "is below the 6,000 env steps"),
        (["--dry-run", "--buffer-size", str(10**12)], "different run"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main(["--resume", str(run_dir), *argv])
        assert message in one_line(exit_info, capsys), argv
    assert snapshot(run_dir) == before, "nothing changed"
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: {**c, "env": "Hopper"}, "does not match the checkpoint (env: 'Hopper' there"),
        (lambda c: "{broken", "is not the run's config"),
        (lambda c: {k: v for k, v in c.items() if k != "num_envs"}, "is not the run's config"),
    ],
    ids=["another env", "broken JSON", "a field removed"],
)
def test_resume_refuses_a_hand_edited_config_json(trained, tmp_path, edit, message, capsys):
    run_dir = copy_run(trained, tmp_path / "edited")
    config = json.loads((run_dir / "config.json").read_text())
    edited = edit(config)
    (run_dir / "config.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    before = snapshot(run_dir)
    for argv in (["--dry-run"], []):
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main(["--resume", str(run_dir), *argv])
        assert message in one_line(exit_info, capsys)
    assert snapshot(run_dir) == before, "nothing changed"


def test_resume_names_a_hand_edit_it_would_overwrite(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path / "edited")
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "eval_every": 7}))
    train_cli.main(["--resume", str(run_dir), "--dry-run"])
    err = capsys.readouterr().err
    assert "holds eval_every 7, which the checkpoint does not" in err
    assert "give --eval-every 7 to change it" in err


def test_an_unreadable_checkpoint_stops_the_resume_and_changes_nothing(trained, tmp_path):
    """A permission error is not damage: no rollback, nothing set aside, no metrics rows
    dropped; one line names the file. Run as another process without the right to read
    the file (for root: without the capabilities that override file modes)."""
    import shutil
    import subprocess

    run_dir = copy_run(trained, tmp_path / "unreadable")
    data = max((p for p in (run_dir / "checkpoints" / "6000" / "state").rglob("*")
                if p.is_file()), key=lambda p: p.stat().st_size)  # fmt: skip
    before = snapshot(run_dir)
    data.chmod(0)
    command = [sys.executable, "-m", "mjxsac.train", "--resume", str(run_dir)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root reads any file, and setpriv is missing to drop that right")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        data.chmod(0o644)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mjxsac-train: cannot read {data} (Permission denied)"), done.stderr
    assert "Traceback" not in done.stderr and "skipping" not in done.stderr
    assert snapshot(run_dir) == before, "nothing rolled back, moved or rewritten"
    assert not (run_dir / "checkpoints-unusable").exists()
