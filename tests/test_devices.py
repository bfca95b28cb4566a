"""Runs over several devices, on the CPU: XLA presents one CPU as N devices
(``--xla_force_host_platform_device_count``), a count fixed when a process starts, so the
multi-device work runs in child processes (``python -m tests.test_devices CHECK``) that
print their measurements as JSON; the tests assert on them here, in this one-device
process, which also plays the laptop that renders a policy trained on four devices.

Bit for bit is not what two device counts can promise: splitting the members (or envs)
changes the batch each device's program computes, and XLA's CPU kernels then round
differently in the last bit (one physics step of the same env differs by 2e-6 in
``qacc_warmstart``; training amplifies it). So the 1-device/2-device comparison is at one
chunk with its first updates, within a bound of rounding; resuming on the same devices is
exact.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("devices")

ROOT = Path(__file__).parent.parent
SOLVED = 900.0
LEARN_STEPS = 14_000
SMALL = {"env": "InvertedPendulum", "num_envs": 4, "eval_envs": 2, "batch_size": 32,
         "buffer_size": 1_000, "hidden_sizes": (32, 32), "steps_per_chunk": 26,
         "warmup_steps": 100, "updates_per_step": 1}  # fmt: skip
"""26 train steps of 4 envs: updates start at env step 100, the last two steps update."""


def child(devices: int, *argv: str, home: Path | None = None) -> dict:
    """``python -m tests.test_devices *argv`` on ``devices`` CPU devices; its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "MJXSAC_COMPILE_CACHE"}
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env |= {"JAX_PLATFORMS": "cpu", "PYTHONPATH": path,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}  # fmt: skip
    if home is not None:
        env |= {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    argv = [sys.executable, "-m", "tests.test_devices", *argv]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


# ---- the checks, run in the child processes ---------------------------------------------------


def max_diff(a, b, relative: bool = False) -> float:
    """The largest difference between two trees' leaves (relative to the first's largest
    entry, leaf by leaf, if ``relative``)."""
    import jax
    import numpy as np

    def diff(x, y) -> float:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = np.abs(x).max() + 1e-12 if relative else 1.0
        return float(np.abs(x - y).max() / scale) if x.size else 0.0

    return max(jax.tree.leaves(jax.tree.map(diff, a, b)))


def check_members_and_data_parallel() -> dict:
    """On 4 devices: a population of 4 on 1 and on 2 devices (members spread); one data
    parallel update's gradient against the whole batch's on one device; the refusals."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from mjxsac import normalizer as obs_norm
    from mjxsac.config import Config
    from mjxsac.losses import Transition, critic_loss_v1, gradient_step
    from mjxsac.sac import ENV, Trainer, run_devices

    out: dict = {}
    config = Config(**SMALL, seeds="0-3").validate()
    one, two = Trainer(config, jax.devices()[:1]), Trainer(config, jax.devices()[:2])
    a, b = one.init(), two.init()
    out["init_equal"] = max_diff(a, b) == 0.0
    kernel = b.actor["params"]["MLP_0"]["Dense_0"]["kernel"]
    out["shards"] = [list(s.data.shape) for s in kernel.addressable_shards]
    compiled = two.trace_train_chunk(b).lower().compile().as_text()
    out["member_collectives"] = [op for op in ("all-reduce", "all-gather") if op in compiled]
    data_parallel = Trainer(Config(**SMALL).validate(), jax.devices()[:2])
    state = data_parallel.init()
    compiled = data_parallel.trace_train_chunk(state).lower().compile().as_text()
    out["data_parallel_collectives"] = [op for op in ("all-reduce", "all-gather") if op in compiled]
    (a, _), (b, _) = one.train_chunk(a), two.train_chunk(b)
    out["updates"] = [int(np.asarray(a.updates)[0]), int(np.asarray(b.updates)[0])]
    out["params_rel_diff"] = max_diff((a.actor, a.critic), (b.actor, b.critic), relative=True)
    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event) if "backend_compile" in event else None
    )
    jax.block_until_ready(two.train_chunk(b))  # the state it returned, placed as it was
    out["second_chunk_compiles"] = len(compiles)

    # Data parallel: one update's averaged gradient against the whole batch's.
    v1 = Trainer(Config(**SMALL, algo="sac-v1").validate())
    rng = np.random.default_rng(0)
    rows = 64
    batch = Transition(
        obs=jnp.asarray(rng.normal(size=(rows, v1.obs_size)), jnp.float32),
        action=jnp.asarray(rng.uniform(-1, 1, (rows, v1.action_size)), jnp.float32),
        reward=jnp.asarray(rng.normal(size=rows), jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(rows, v1.obs_size)), jnp.float32),
        terminated=jnp.asarray(rng.uniform(size=rows) < 0.2),
    )
    state = jax.tree.map(lambda x: np.asarray(x[0]), v1.init())  # off the 1-device mesh
    args = (state.critic, state.critic_opt, v1.critic_opt, state.target_value)

    def step(batch, mean_over=None):
        return gradient_step(critic_loss_v1, *args, batch, nets=v1.nets, gamma=0.99,
                             reward_scale=5.0, mean_over=mean_over)  # fmt: skip

    mesh = Mesh(np.array(jax.devices()[:2]), (ENV,))
    split = jax.shard_map(lambda b: step(b, ENV), mesh=mesh, in_specs=P(ENV), out_specs=P(),
                          check_vma=False)  # fmt: skip
    whole, parts = jax.jit(step)(batch), jax.jit(split)(batch)
    out["gradient_diff"] = max_diff(whole[:2], parts[:2])
    out["moved"] = max_diff(whole[0], state.critic)
    stats = obs_norm.init(v1.obs_size)
    merged = jax.shard_map(lambda o: obs_norm.update(stats, o, ENV), mesh=mesh, in_specs=P(ENV),
                           out_specs=P(), check_vma=False)(batch.obs)  # fmt: skip
    alone = obs_norm.update(stats, batch.obs)
    out["normalizer_diff"] = max_diff(alone, merged)

    from launch import bench_population  # the GPU check's step on every device
    from mjxsac import train

    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        train.main(["--seeds", "0-1", "--devices", "4", "--dry-run", "--compile-cache", "off",
                    "--run-dir", str(Path(tempfile.mkdtemp()) / "run")])  # fmt: skip
    out["dry_run"] = said.getvalue().splitlines()[-1]

    bench = bench_population.measure(Config(**SMALL).validate(), 1, 1, devices=2)
    out["bench"] = {"placement": bench["placement"], "chunk_s": bench["chunk_s"]}

    refusals = {}
    for name, make in {
        "population": lambda: Trainer(Config(**SMALL, seeds="0-2"), jax.devices()[:2]),
        "envs": lambda: Trainer(Config(**{**SMALL, "num_envs": 3}), jax.devices()[:2]),
        "devices": lambda: run_devices(8),
    }.items():
        try:
            make()
            refusals[name] = None
        except ValueError as e:
            refusals[name] = str(e)
    out["refusals"] = refusals
    return out


def check_run(run_dir: str) -> dict:
    """The command on 4 devices (2 members x 2 devices each), the compilation cache off;
    then a copy resumed from its second-to-last checkpoint on the same devices, and one on
    2 devices (refused: the replay rows are split over 2 devices per member)."""
    import jax
    import numpy as np

    from mjxsac import train
    from mjxsac.checkpoint import Checkpoints
    from mjxsac.sac import Trainer

    run = Path(run_dir)
    train.main(["--env", "InvertedPendulum", "--preset", "cpu", "--seeds", "0-1",
                "--devices", "4", "--total-steps", str(LEARN_STEPS), "--eval-every", "1",
                "--checkpoint-every", "1", "--keep-checkpoints", "2", "--save-buffer",
                "--run-dir", str(run), "--compile-cache", "off"])  # fmt: skip
    copy = run.parent / "resumed"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    shutil.move(copy / "checkpoints" / str(LEARN_STEPS), copy / "later")
    train.main(["--resume", str(copy), "--devices", "4", "--compile-cache", "off"])

    def final(path: Path):
        ckpt = Checkpoints(path / "checkpoints", read_only=True)
        return jax.tree.map(np.asarray, ckpt.restore(Trainer(ckpt.config(), jax.devices())))

    same = jax.tree.map(np.array_equal, final(run), final(copy))
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            train.main(["--resume", str(copy), "--devices", "2", "--total-steps", "18000"])
        refused = None
    except SystemExit as e:  # the one-line error is the exit's message
        refused = said.getvalue() + str(e.code)
    return {"resumed_equal": all(jax.tree.leaves(same)), "refused": refused}


# ---- the tests, in this one-device process ---------------------------------------------------


@pytest.fixture(scope="session")
def four_devices() -> dict:
    return child(4, "checks")


def test_members_spread_over_devices_compute_each_member_as_on_one(four_devices):
    r = four_devices
    assert r["init_equal"], "a fresh population is the same on 1 and 2 devices"
    assert r["shards"] == [[2, 4, 32], [2, 4, 32]], "2 members' parameters on each device"
    assert r["member_collectives"] == [], "members spread over devices never communicate"
    assert r["updates"] == [2, 2]
    assert r["second_chunk_compiles"] == 0, "a chunk returns the shardings it was given"
    # Measured 0 to 1e-6; members crossed, or a member's batch from another, differ by ~1.
    assert r["params_rel_diff"] < 1e-4, r


def test_data_parallel_update_is_the_whole_batch_update(four_devices):
    r = four_devices
    # Each device keeps its own replay rows: the chunk averages gradients (all-reduce)
    # and never gathers (the buffer, or anything else).
    assert r["data_parallel_collectives"] == ["all-reduce"], r
    assert r["moved"] > 1e-4, "the update moved the critic"
    assert r["gradient_diff"] < 1e-6, r  # the parameters after one Adam step, both ways
    assert r["normalizer_diff"] < 1e-4, r  # sums of squares of 64 rows, float32


def test_dry_run_shows_the_placement_and_each_devices_memory(four_devices):
    line = four_devices["dry_run"]
    assert "4 devices: 2 members x 2 devices per member (data parallel)" in line, line
    assert "on each of the 4 devices the replay buffer needs" in line, line


def test_the_gpu_checks_population_step_runs_data_parallel(four_devices):
    bench = four_devices["bench"]
    assert bench["placement"] == "2 devices, data parallel" and bench["chunk_s"] > 0


def test_sizes_that_do_not_split_are_refused_in_one_line(four_devices):
    refusals = four_devices["refusals"]
    population = "a population of 3 members does not split over 2 devices: use --devices 1"
    assert refusals["population"] == population, refusals
    assert "num_envs 3 is not a multiple of 2: use --devices 1" in (refusals["envs"] or "")
    assert refusals["devices"] == "--devices 8: this machine has 4 cpu devices"
    assert all("\n" not in (text or "") for text in refusals.values())


@pytest.mark.xdist_group("devices-run")  # its own child: free to run on another worker
def test_a_run_over_four_devices_learns_resumes_and_renders_on_one(tmp_path):
    """2 members x 2 devices each (members and data parallel at once), the `cpu` preset as
    users get it. Measured over 16 seeds in this layout (docs/BENCHMARKS.md, "Learning
    tests"): 15 had passed 900 by 14,000 env steps (and by 16,000), so both of two seeds
    miss with
    probability about (1/16)^2 = 0.4%. The checkpoint, written on 4 devices, gives its
    policy to this 1-device process (render); its full state, whose replay rows are split
    over 2 devices per member, is refused here with the command that resumes it."""
    from mjxsac import render
    from mjxsac.checkpoint import Checkpoints, IncompatibleCheckpoint
    from mjxsac.runlog import RunDir
    from mjxsac.sac import Trainer

    home, run_dir = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    r = child(4, "run", str(run_dir), home=home)
    curves = [[row["eval/return_mean"] for row in RunDir(run_dir).read_metrics(k)] for k in (0, 1)]
    assert all(len(c) == LEARN_STEPS // 2000 for c in curves), curves
    assert max(max(c) for c in curves) >= SOLVED, curves
    assert r["resumed_equal"], "a resume on the same devices continues exactly"
    assert "split over 2 device(s) per member" in (r["refused"] or "")
    assert "--devices 4" in r["refused"]
    assert not [p for p in home.rglob("*-cache") if p.is_file()], "--compile-cache off"

    ckpt = Checkpoints(run_dir / "checkpoints", read_only=True)
    with pytest.raises(IncompatibleCheckpoint, match="resume with --devices 4"):
        ckpt.restore(Trainer(ckpt.config()))
    out = tmp_path / "v.mp4"
    render.main([str(run_dir), "--out", str(out), "--max-steps", "20", "--width", "64",
                 "--height", "48"])  # fmt: skip
    assert out.stat().st_size > 0


# ---- several processes (hosts), here two on localhost with gloo collectives --------------

HOSTS = ["--env", "InvertedPendulum", "--preset", "cpu", "--hidden-sizes", "32", "32",
         "--warmup-steps", "500", "--eval-envs", "2", "--checkpoint-every", "1",
         "--save-buffer"]  # fmt: skip


def two_processes(run_dir: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """The command as two processes of one run (one CPU device each), joined through a
    coordinator on a free local port; both must succeed."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    program = "import sys; from mjxsac import train; train.main(sys.argv[1:])"
    coordinator = ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = []
    for i in range(2):
        argv = [sys.executable, "-c", program, *extra, "--run-dir", str(run_dir), *coordinator,
                "--process-id", str(i)]  # fmt: skip
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))  # fmt: skip
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


def said(process: subprocess.CompletedProcess) -> list[str]:
    """The lines a process printed, less gloo's report of its connections."""
    return [line for line in process.stdout.splitlines() if not line.startswith("[Gloo]")]


@pytest.mark.xdist_group("devices-hosts")
def test_two_processes_train_as_one_run_write_once_and_resume(tmp_path):
    """One member data parallel over the two processes' devices (its gradients averaged
    across processes every update): process 0 alone writes metrics and prints; both write
    their shards of each checkpoint; the pair resumes; one process alone is refused."""
    from mjxsac.checkpoint import Checkpoints, IncompatibleCheckpoint
    from mjxsac.runlog import RunDir
    from mjxsac.sac import Trainer

    run_dir, cache = tmp_path / "hosts", ["--compile-cache", str(tmp_path / "cache")]
    first = two_processes(run_dir, *HOSTS, *cache, "--total-steps", "2000")
    assert "2 devices, data parallel" in first[0].stdout
    assert said(first[1]) == [], "process 1 prints nothing (gloo's own line aside)"
    # (the resumed pair loads its programs from the first pair's compilation cache)
    resumed = two_processes(run_dir, "--resume", str(run_dir), *cache, "--total-steps", "4000")
    assert "resuming" in resumed[0].stdout and said(resumed[1]) == []
    rows = RunDir(run_dir).read_metrics()
    assert [r["env_steps"] for r in rows] == [2000, 4000], "one writer, no duplicates"
    assert rows[-1]["updates"] > 0 and np.isfinite(rows[-1]["eval/return_mean"])
    ckpt = Checkpoints(run_dir / "checkpoints", read_only=True)
    assert ckpt.steps() == [2000, 4000] and ckpt.meta()["processes"] == 2
    with pytest.raises(IncompatibleCheckpoint, match="resume with --num-processes 2"):
        ckpt.restore(Trainer(ckpt.config()))


if __name__ == "__main__":
    check = sys.argv[1]
    result = check_members_and_data_parallel() if check == "checks" else check_run(sys.argv[2])
    print(json.dumps(result))
