"""The GPU check in one command: what matters most about mjxsac on an accelerator,
measured in the order of its value within a fixed wall-time budget.

    python -m launch.gpu_check --out DIR --budget-s 500        # the device command (README)
    python -m launch.gpu_check --out DIR --smoke               # the same on a CPU, tiny sizes

``DIR/report.json`` and ``DIR/report.md`` are rewritten after every measurement, so a kill
at any moment keeps what was measured. The phases, in order of value:

* ``0``: versions (jax, jaxlib, mujoco, mujoco-mjx, ...), devices, memory, host;
* ``a``: raw env steps/s, random actions, ``vmap`` + ``lax.scan``: every task at 4,096
  envs, HalfCheetah and Ant at 1,024 and 16,384 (``launch/bench_envs.py``); then, where
  MuJoCo Warp is installed, every task under ``impl=warp`` at 4,096 and at 1,024 envs
  (else the reason is recorded);
* ``b``: the pipeline's overhead: env steps/s through the training loop with updates off
  against the raw wrapped env, at 4,096 envs (HalfCheetah, Ant; ``launch/bench_sac.py
  overhead``), and for the ``fast`` and ``parallel`` presets a chunk with updates on
  against the same chunk with updates off: how its time splits between env steps and
  updates;
* ``c``: learning against wall time: HalfCheetah with ``fast`` and with ``parallel``, half
  the phase each, eval returns with wall time and env steps (``launch/bench_sac.py``'s
  ``run_ours``). The wall time counts from the run's start, its programs loaded from the
  cache; their compile seconds (what a process that compiles them adds) are recorded
  apart;
* ``d``: a population: 8 HalfCheetah seeds against 1, wall time per chunk
  (``launch/bench_population.py``; goal: at most 2x); on a machine with several devices,
  also the 8 seeds spread over all of them and 1 seed data parallel over all of them,
  each against the same on one device;
* ``e``: the policy of c's best run saved small (actor and normalizer alone) into
  ``DIR/policy``, which ``mjxsac-render DIR/policy`` loads on any machine.

Each phase has a time budget (its share of ``--budget-s``, ``--phase-budget`` overrides).
A phase starts only while the budget left holds at least half of its own, and is skipped
otherwise, with the reason recorded; within a phase, each measurement starts as soon as
its programs are ready (the first in order of value among those), gets an equal share of
what is left, and what the phase's budget cannot hold is skipped and recorded too. Timed
runs are repeated (median and best recorded) after an untimed first run, fewer times
where the share runs short.

Compiling is CPU work and the machine has many cores: at the start the programs of every
phase that can run are compiled in child processes (``--workers`` at a time, in the order
of the phases), into one persistent compilation cache (``--compile-cache``) from which
JAX serves them to this process. Each program's compile time is recorded. A measurement
waits for its programs; where a child failed (or ``--workers 0``) this process compiles
them itself. What each measurement loaded and compiled is recorded with it, and so is how
many children were compiling meanwhile (they share the host's cores, and the device for
autotuning).
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget and "time from process start" count from here

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402
from launch import bench_population  # noqa: E402
from launch.bench_envs import compile_rollout, measure, stack_of  # noqa: E402
from launch.bench_sac import chunk_times, overhead, run_ours  # noqa: E402
from mjxsac import compile_cache, presets  # noqa: E402
from mjxsac.checkpoint import Checkpoints, abstract, policy_of, state_shapes  # noqa: E402
from mjxsac.config import Config  # noqa: E402
from mjxsac.runlog import write_atomic  # noqa: E402
from mjxsac.sac import Trainer, env_steps  # noqa: E402

IMPORTED = time.monotonic()

PHASES = {
    "0": "versions, devices, memory",
    "a": "raw env steps/s",
    "b": "pipeline overhead and the chunk's split",
    "c": "learning against wall time",
    "d": "population: seeds against 1",
    "e": "the best policy, saved small",
}
# Each phase's share of a 500-second budget (the rest is slack).
SHARES = {"0": 15, "a": 130, "b": 80, "c": 200, "d": 45, "e": 10}
POLICY_LIMIT = 16 * 2**20  # bytes: the saved policy must travel back from a device machine


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure, at which sizes: the device's (the defaults) or ``SMOKE``."""

    tasks: tuple[str, ...] = tuple(envs.NAMES)  # a: every task at num_envs
    num_envs: int = 4096  # a and b
    size_tasks: tuple[str, ...] = ("HalfCheetah", "Ant")  # a: these also at ``sizes``
    sizes: tuple[int, ...] = (1024, 16384)
    warp_sizes: tuple[int, ...] = (4096, 1024)  # a: every task under MuJoCo Warp too
    steps: int = 50  # a: rollout length
    overhead_tasks: tuple[str, ...] = ("HalfCheetah", "Ant")  # b
    task: str = "HalfCheetah"  # b's split, c and d
    presets: tuple[str, ...] = ("fast", "parallel")  # b's split and c, in this order
    members: int = 8  # d: against 1
    chunks: int = 3  # b and d: timed chunks after the first
    repeats: int = 3  # a and b: timed rollouts after an untimed one
    # c: evaluate every N chunks, per preset (about 0.8M and 0.4M env steps)
    eval_chunks: dict = dataclasses.field(default_factory=lambda: {"fast": 4, "parallel": 8})
    overrides: dict = dataclasses.field(default_factory=dict)  # on every trainer config


SMALL = {
    "num_envs": 8,
    "batch_size": 64,
    "buffer_size": 4096,
    "hidden_sizes": (32, 32),
    "steps_per_chunk": 10,
    "eval_envs": 2,
    "episode_length": 100,
    "warmup_steps": 0,
    "learning_starts": 128,
}
SMOKE = Plan(
    ("InvertedPendulum", "HalfCheetah"),
    8,
    ("HalfCheetah",),
    (4, 16),
    (8,),
    10,
    ("InvertedPendulum",),
    "InvertedPendulum",
    members=2,
    chunks=2,
    repeats=2,
    eval_chunks={"fast": 2, "parallel": 2},
    overrides=SMALL,
)


def plan_from(args) -> Plan:
    plan = SMOKE if args.smoke else Plan()
    given = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in vars(args).items()
        if k in ("tasks", "size_tasks", "sizes", "num_envs") and v is not None
    }
    return dataclasses.replace(plan, **given)


# ---- configs ----------------------------------------------------------------------------


def config(plan: Plan, task: str, preset: str, **fields: Any) -> Config:
    """The preset's config for ``task`` with the plan's overrides, then ``fields``."""
    base = presets.config_for(task, "sac-v2", preset)
    return dataclasses.replace(base, **{**plan.overrides, **fields}).validate()


def overhead_config(plan: Plan, task: str) -> Config:
    """b's loop: ``parallel`` at the plan's env count, updates off, no random warm-up
    (``launch/bench_sac.py overhead``)."""
    return config(
        plan, task, "parallel", num_envs=plan.num_envs, updates_per_step=0, warmup_steps=0
    )


def split_configs(plan: Plan, preset: str) -> dict[str, Config]:
    """A chunk with updates on from the first steps (no random warm-up, so every timed
    chunk updates at every step) and the same chunk with updates off."""
    on = config(plan, plan.task, preset, warmup_steps=0)
    return {"on": on, "off": dataclasses.replace(on, updates_per_step=0).validate()}


def population_config(plan: Plan) -> Config:
    """d's member: b's ``parallel`` chunk with updates on (the preset's random warm-up
    would leave the first timed chunks without updates)."""
    return split_configs(plan, "parallel")["on"]


# ---- compiling ahead, in child processes -------------------------------------------------


def compile_trainer(config: Config, evaluate: bool = False) -> dict[str, float]:
    """Compile a trainer's programs (init, train chunk, evaluation) from shapes alone, as
    a run calls them; seconds of each (trace, lower, compile or load)."""
    trainer = Trainer(config)
    state = abstract(state_shapes(trainer))
    stages = {"init": trainer.trace_init, "train_chunk": lambda: trainer.trace_train_chunk(state)}
    if evaluate:
        keys = trainer.eval_keys(0)
        stages["evaluate"] = lambda: trainer.trace_evaluate(state.actor, state.normalizer, keys)
    seconds = {}
    for name, trace in stages.items():
        t0 = time.perf_counter()
        trace().lower().compile()
        seconds[name] = time.perf_counter() - t0
    return seconds


def rollout_args(task: str, num_envs: int, stack: str = "raw", **options: Any) -> tuple:
    """``(reset, step, num_envs, action_size)`` of a ``launch.bench_envs`` rollout."""
    env = envs.make(task, **options)
    return (*stack_of(env, num_envs, stack), num_envs, env.action_size)


@dataclasses.dataclass
class Item:
    """One measurement: its phase, what it needs compiled (job names), how to run it."""

    phase: str
    name: str
    needs: list[str]
    run: Callable[[Check], dict]


class Jobs:
    """The compile jobs of a plan by name, each with the phases that need it; trainers of
    one compiled identity share a job (its first name), which compiles evaluation too if
    any of them evaluates."""

    def __init__(self) -> None:
        self.compile: dict[str, Callable[[], dict]] = {}
        self.phases: dict[str, set[str]] = {}
        self._trainers: dict[Any, str] = {}
        self._evaluate: dict[str, bool] = {}

    def add(self, phase: str, name: str, compile: Callable[[], dict]) -> str:
        self.compile.setdefault(name, compile)
        self.phases.setdefault(name, set()).add(phase)
        return name

    def trainer(self, phase: str, name: str, config: Config, evaluate: bool = False) -> str:
        name = self._trainers.setdefault(config.compiled_identity(), name)
        self._evaluate[name] = self._evaluate.get(name, False) or evaluate
        return self.add(phase, name, lambda: compile_trainer(config, self._evaluate[name]))


def warp_refusal() -> str | None:
    """Why MuJoCo Warp (``impl=warp``) cannot run here, or None where it can."""
    try:
        envs.PhysicsOptions(impl="warp")
    except ValueError as e:
        return str(e)
    return None


def skip(reason: str) -> dict:
    raise Skip(reason)


def build(plan: Plan) -> tuple[list[Item], Jobs]:
    """Every measurement, in order of value within its phase, and the compile jobs."""
    jobs, items = Jobs(), [Item("0", "versions", [], lambda check: versions())]
    first = [t for t in ("HalfCheetah", "Ant") if t in plan.tasks]
    raw = [(t, plan.num_envs, {}) for t in first + [t for t in plan.tasks if t not in first]]
    raw += [(t, n, {}) for t in plan.size_tasks for n in plan.sizes]
    refusal = warp_refusal()
    if refusal is None:  # both backends per task, at each of ``warp_sizes``
        raw += [
            (t, n, {"impl": "warp"}) for n in plan.warp_sizes for t, _, _ in raw[: len(plan.tasks)]
        ]
    else:
        items.append(Item("a", "impl=warp", [], lambda check: skip(refusal)))
    for task, n, options in raw:
        name = f"{task}@{n}" + "".join(f" {k}={v}" for k, v in options.items())
        args = functools.partial(rollout_args, task, n, **options)
        job = jobs.add("a", f"a/{name}", lambda a=args: compile_rollout(*a(), plan.steps))
        items.append(Item("a", name, [job], lambda check, a=args: run_raw(check, plan, a)))
    for task in plan.overhead_tasks:
        c = overhead_config(plan, task)
        args = functools.partial(rollout_args, task, c.num_envs, "wrapped")
        needs = [
            jobs.trainer("b", f"b/overhead/{task}", c),
            jobs.add(
                "b",
                f"b/wrapped/{task}",
                lambda a=args, c=c: compile_rollout(*a(), c.steps_per_chunk),
            ),
        ]
        items.append(
            Item("b", f"overhead {task}", needs, lambda check, c=c: run_overhead(check, plan, c))
        )
    for preset in plan.presets:
        configs = split_configs(plan, preset)
        needs = [jobs.trainer("b", f"b/{preset}/{mode}", c) for mode, c in configs.items()]
        items.append(
            Item(
                "b", f"split {preset}", needs, lambda check, cs=configs: run_split(check, plan, cs)
            )
        )
    for preset in plan.presets:
        c = config(plan, plan.task, preset)
        needs = [jobs.trainer("c", f"c/{preset}", c, evaluate=True)]
        items.append(Item("c", preset, needs, lambda check, c=c: run_learning(check, plan, c)))
    for members in (1, plan.members):
        needs = [
            jobs.trainer(
                "d", f"d/{members}", bench_population.population(population_config(plan), members)
            )
        ]
        items.append(
            Item(
                "d",
                f"{members} members",
                needs,
                lambda check, m=members: run_population(check, plan, m),
            )
        )
    devices = jax.device_count()
    if devices > 1:  # every mode on every device (compiled here, when measured)
        for members in (plan.members, 1):
            name = f"{members} members on {devices} devices"
            items.append(Item("d", name, [], lambda check, m=members: run_population(
                check, plan, m, devices)))  # fmt: skip
    items.append(Item("e", "policy", [], lambda check: save_best_policy(check)))
    return items, jobs


# ---- the measurements -------------------------------------------------------------------


class Skip(Exception):
    """A measurement that cannot run, with the reason (recorded, not an error)."""


def run_raw(check: Check, plan: Plan, rollout: Callable[[], tuple]) -> dict:
    """a: raw env steps/s, the median of ``repeats`` timed rollouts after an untimed one."""
    reset, step, num_envs, action_size = rollout()
    r = measure(
        reset,
        step,
        num_envs,
        action_size,
        plan.steps,
        plan.repeats,
        warmup=1,
        deadline=check.deadline,
    )
    return {
        "num_envs": num_envs,
        "steps": plan.steps,
        "steps_per_s": r["median_steps_per_s"],
        "best_steps_per_s": r["steps_per_s"],
        "runs_s": r["runs_s"],
        "compile_or_load_s": r["compile_s"],
    }


def run_overhead(check: Check, plan: Plan, config: Config) -> dict:
    """b: env steps/s through the training loop with updates off, as a ratio of the raw
    wrapped env's (and of a's raw env's where a measured it)."""
    r = overhead(config, plan.chunks, plan.repeats, deadline=check.deadline)
    raw = check.result("a", f"{config.env}@{config.num_envs}")
    ratio = r["loop_steps_per_s"] / raw["steps_per_s"] if raw else None
    return {
        **r,
        "num_envs": config.num_envs,
        "steps_per_chunk": config.steps_per_chunk,
        "ratio_to_raw": ratio,
    }


def run_split(check: Check, plan: Plan, configs: dict[str, Config]) -> dict:
    """b: a chunk with updates on against the same chunk with updates off: the time of
    the updates is the difference."""
    seconds = {}
    for mode in ("off", "on"):
        first, times = chunk_times(Trainer(configs[mode]), plan.chunks, check.deadline)
        seconds[mode] = {"first_chunk_s": first, "chunks_s": times, "median": median(times)}
        gc.collect()
    on, off = seconds["on"]["median"], seconds["off"]["median"]
    c = configs["on"]
    steps = c.env_steps_per_chunk
    return {
        "num_envs": c.num_envs,
        "batch_size": c.batch_size,
        "hidden_sizes": c.hidden_sizes,
        "updates_per_step": c.updates_per_step,
        "steps_per_chunk": c.steps_per_chunk,
        "chunk_s_on": on,
        "chunk_s_off": off,
        "env_steps_per_s_on": steps / on,
        "env_steps_per_s_off": steps / off,
        "updates_per_s": c.steps_per_chunk * c.updates_per_step / on,
        "update_share": 1.0 - off / on,
        "every_timed_chunk_updates": c.update_start <= c.env_steps_per_chunk,
        "chunks": seconds,
    }


def run_learning(check: Check, plan: Plan, config: Config) -> dict:
    """c: train from scratch for this run's share of the phase; eval returns against wall
    time from the run's start (its programs loaded from the cache: add their compile
    seconds, recorded beside, for a process that compiles them) and env steps."""
    start = time.monotonic()
    budget = 0.9 * (check.deadline - start)
    eval_chunks = plan.eval_chunks.get(config.preset, 5)
    result = run_ours(config, None, budget, eval_chunks, start=start)
    curve, state = result["curve"], result.pop("state")
    result.pop("trainer")
    if curve:
        check.policies.append(
            {
                "preset": config.preset,
                "config": config,
                "policy": jax.device_get(policy_of(state)),
                "step": env_steps(state),
                "eval_return": curve[-1]["eval_return"],
            }
        )
    del state
    returns = [p["eval_return"] for p in curve]
    return {
        "preset": config.preset,
        "process_s_at_start": start - STARTED,
        "eval_every_chunks": eval_chunks,
        "env_steps_per_eval": eval_chunks * config.env_steps_per_chunk,
        "final_eval_return": returns[-1] if returns else None,
        "best_eval_return": max(returns) if returns else None,
        "curve": curve,
        "config": result["config"],
    }


def run_population(check: Check, plan: Plan, members: int, devices: int = 1) -> dict:
    """d: wall time per chunk (updates on) of ``members`` seeds, and as a ratio to 1 (on
    one device); on several ``devices``, also as a ratio to the same members on one
    (members spread over the devices; one member: data parallel)."""
    member = population_config(plan)
    r = bench_population.measure(member, members, plan.chunks, check.deadline, devices)
    one = check.result("d", "1 members")
    ratio = r["median_chunk_s"] / one["median_chunk_s"] if one and members > 1 else None
    if devices > 1:
        alone = check.result("d", f"{members} members")
        ratio = None  # the goal is one device's
        r["vs_one_device"] = alone and r["median_chunk_s"] / alone["median_chunk_s"]
    return {
        **r,
        "vs_1": ratio,
        "goal_at_most_2x": None if ratio is None else ratio <= 2.0,
        "num_envs": member.num_envs,
        "batch_size": member.batch_size,
        "updates_per_step": member.updates_per_step,
        "steps_per_chunk": member.steps_per_chunk,
        "preset": member.preset,
    }


def save_best_policy(check: Check) -> dict:
    """e: the policy of c's best run (by its last eval return), saved small."""
    if not check.policies:
        raise Skip("no learning run of phase c ended with an evaluation")
    best = max(check.policies, key=lambda p: p["eval_return"])
    out = save_policy(
        check.out / "policy", best["policy"], best["config"], best["step"], [best["eval_return"]]
    )
    return {"preset": best["preset"], **out}


def save_policy(
    directory: Path, policy: dict, config: Config, step: int, eval_returns: list[float]
) -> dict:
    """Save ``policy`` (actor and normalizer, with the member axis) as a run directory
    that ``mjxsac-render`` loads, check its size, and load it back as mjxsac-render does."""
    from mjxsac.policy import load

    if directory.exists():  # a rerun into the same DIR
        shutil.rmtree(directory)
    ckpt = Checkpoints(directory / "checkpoints", async_save=False)
    ckpt.save_policy(policy, config, step, eval_returns)
    ckpt.close()
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    _, loaded, loaded_step, member = load(directory)
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)[member]), loaded, policy
    )
    return {
        "directory": str(directory),
        "bytes": size,
        "under_16_mib": size < POLICY_LIMIT,
        "env_steps": step,
        "eval_return": float(np.mean(eval_returns)),
        "loads_back": bool(all(jax.tree.leaves(same))) and loaded_step == step,
        "render": f"mjxsac-render {directory} --out {config.env.lower()}.mp4",
    }


def median(values: list[float]) -> float:
    return float(np.median(values))


def versions() -> dict:
    """0: versions, devices, memory, the host, the settings that change XLA's programs."""
    names = [
        "jax",
        "jaxlib",
        "mujoco",
        "mujoco-mjx",
        "flax",
        "optax",
        "orbax-checkpoint",
        "brax",
        "numpy",
    ]
    plugins = sorted(
        {
            d.metadata["Name"]
            for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "")
            .lower()
            .replace("_", "-")
            .startswith(("jax-cuda", "jax-rocm"))
        }
    )
    packages = {}
    for name in [*names, *plugins]:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    device = jax.devices()[0]
    stats = (device.memory_stats() or {}) if device.platform != "cpu" else {}
    keep = ("bytes_limit", "bytes_in_use", "peak_bytes_in_use")
    return {
        "packages": packages,
        "backend": jax.default_backend(),
        "devices": [
            {"id": d.id, "platform": d.platform, "kind": d.device_kind} for d in jax.devices()
        ],
        "memory": {k: stats[k] for k in keep if k in stats},
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "environment": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(("XLA_", "JAX_", "MUJOCO_GL", "CUDA_VISIBLE"))
        },
        "nvidia_smi": _command(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                "--format=csv,noheader",
            ]
        ),
        "git": _command(
            ["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"]
        ),
        "imports_s": IMPORTED - STARTED,
        "warp": "measured in a" if warp_refusal() is None else f"not measured: {warp_refusal()}",
        "scale_out": f"{len(jax.devices())} device(s); "
        + ("every mode on all of them measured in d" if len(jax.devices()) > 1 else "one"),
    }


def _command(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


# ---- child processes --------------------------------------------------------------------


class Pool:
    """Compile jobs in child processes (``--compile-only JOB``), at most ``workers`` at a
    time, in the order submitted. ``record`` receives each job's state: queued, running,
    done (with each program's seconds), failed (with the end of its log) or cancelled."""

    def __init__(
        self, argv: list[str], directory: Path, workers: int, cache: str, record: dict
    ) -> None:
        self.argv, self.directory, self.workers, self.record = argv, directory, workers, record
        self.cache, self.out = cache, str(directory.parent)
        self.queue: list[str] = []
        self.running: dict[str, subprocess.Popen] = {}
        self.changed = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._serve, name="gpu-check-pool", daemon=True)

    def submit(self, names: list[str]) -> None:
        with self.changed:
            for name in names:
                self.queue.append(name)
                self.record[name] = {"status": "queued"}
        if names and not self.thread.is_alive():
            self.thread.start()

    def status(self, name: str) -> str:
        with self.changed:
            return self.record.get(name, {}).get("status", "not submitted")

    def busy(self) -> int:
        with self.changed:
            return len(self.running)

    def compiling(self) -> set[str]:
        """The jobs queued or running."""
        with self.changed:
            return set(self.queue) | set(self.running)

    def wait(self, names: list[str], deadline: float) -> None:
        """Until one of ``names`` (queued or running jobs) ends, or ``deadline``."""

        def compiling() -> bool:
            return all(self.record[n]["status"] in ("queued", "running") for n in names)

        with self.changed:
            while names and time.monotonic() < deadline and compiling():
                self.changed.wait(min(0.5, max(deadline - time.monotonic(), 0.01)))

    def cancel(self, names: list[str]) -> None:
        with self.changed:
            for name in names:
                if name in self.queue:
                    self.queue.remove(name)
                    self.record[name]["status"] = "cancelled"
                elif name in self.running:
                    self.record[name]["status"] = "cancelled"
                    self.running[name].terminate()

    def close(self) -> None:
        """Cancel what is left and wait for the children to end."""
        self.cancel([*self.queue, *self.running])
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=20)

    def _serve(self) -> None:
        while True:
            with self.changed:
                self._reap()
                while self.queue and len(self.running) < self.workers and not self.closed:
                    name = self.queue.pop(0)
                    try:
                        self._start(name)
                    except Exception as e:  # e.g. no process could be started
                        self.record[name] |= {"status": "failed", "error": repr(e)}
                self.changed.notify_all()
                if self.closed and not self.running:
                    return
                self.changed.wait(0.2)

    def _start(self, name: str) -> None:
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        own = ["--compile-only", name, "--compile-cache", self.cache, "--out", self.out]
        argv = [sys.executable, "-m", "launch.gpu_check", *self.argv, *own]
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._path(name, ".log").open("w") as log:
            self.running[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.directory
            )
        self.record[name] |= {"status": "running", "started_s": round(elapsed(), 1)}

    def _reap(self) -> None:
        for name, child in list(self.running.items()):
            code = child.poll()
            if code is None:
                continue
            del self.running[name]
            entry = self.record[name]
            entry["ended_s"] = round(elapsed(), 1)
            if entry["status"] == "cancelled":
                continue
            try:
                result = json.loads(self._path(name, ".json").read_text()) if code == 0 else None
            except (OSError, ValueError):
                result = None
            if result is not None:
                entry |= {"status": "done", **result}
            else:  # this process compiles the job's programs itself
                with contextlib.suppress(OSError):
                    entry["log_tail"] = self._path(name, ".log").read_text(errors="replace")[-1500:]
                entry |= {"status": "failed", "exit_code": code}

    def _path(self, name: str, suffix: str) -> Path:
        return job_file(self.directory, name, suffix)


def job_file(directory: Path, name: str, suffix: str) -> Path:
    """A job's log (``.log``) or result (``.json``)."""
    return directory / (name.replace("/", "_").replace(" ", "_") + suffix)


def compile_only(args, plan: Plan) -> None:
    """A child: compile one job's programs into the cache and write their seconds."""
    with contextlib.suppress(OSError):
        os.nice(10)  # the measuring process comes first
    compile_cache.configure(args.compile_cache)
    tally = compile_cache.Tally()
    t0 = time.monotonic()
    seconds = build(plan)[1].compile[args.compile_only]()
    out = {
        "programs_s": {k: round(v, 2) for k, v in seconds.items()},
        "wall_s": round(time.monotonic() - t0, 2),
        "imports_s": round(IMPORTED - STARTED, 2),
        "compiled": tally.compiled,
        "cache_hits": len(tally.hits),
    }
    write_atomic(job_file(Path(args.out) / "compile", args.compile_only, ".json"), json.dumps(out))


# ---- the check ------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGTERM or SIGINT: the report is written as it stands, the children are ended."""


def elapsed() -> float:
    return time.monotonic() - STARTED


class Check:
    """The phases in order, within the budget, with the report rewritten after each
    measurement."""

    def __init__(self, args, plan: Plan, argv: list[str]) -> None:
        self.out, self.plan, self.budget_s = Path(args.out), plan, args.budget_s
        self.budgets = {k: v * args.budget_s / 500 for k, v in SHARES.items()}
        for item in args.phase_budget:
            key, _, value = item.partition("=")
            if key not in PHASES:
                raise SystemExit(f"--phase-budget {item}: phases are {', '.join(PHASES)}")
            self.budgets[key] = float(value)
        self.items, self.jobs = build(plan)
        self.policies: list[dict] = []
        self.deadline = STARTED + args.budget_s
        self.report: dict[str, Any] = {
            "schema": 1,
            "command": ["python", "-m", "launch.gpu_check", *argv],
            "smoke": args.smoke,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "budget_s": args.budget_s,
            "elapsed_s": 0.0,
            "finished": False,
            "interrupted": None,
            "plan": dataclasses.asdict(plan),
            "compile": {"cache": str(args.compile_cache), "workers": args.workers, "jobs": {}},
            "phases": {
                k: {
                    "name": name,
                    "status": "pending",
                    "budget_s": round(self.budgets[k], 1),
                    "items": {},
                }
                for k, name in PHASES.items()
            },
        }
        self.pool = Pool(
            argv,
            self.out / "compile",
            args.workers,
            args.compile_cache,
            self.report["compile"]["jobs"],
        )

    def left(self) -> float:
        return self.budget_s - elapsed()

    def result(self, phase: str, item: str) -> dict | None:
        """A measurement's result, if it was made."""
        entry = self.report["phases"][phase]["items"].get(item)
        return entry.get("result") if entry and entry["status"] == "ok" else None

    def write(self) -> None:
        with self.pool.changed:  # its thread updates the jobs' records
            self.report["elapsed_s"] = round(elapsed(), 1)
            text, md = json.dumps(self.report, indent=1, default=str), markdown(self.report)
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / "report.json", text)
        write_atomic(self.out / "report.md", md)

    def possible(self, phase: str) -> bool:
        budget = self.budgets[phase]
        return budget > 0 and self.left() >= budget / 2

    def start_compiling(self) -> None:
        """Submit the jobs of every phase that can still run, in the order of phases."""
        if self.pool.workers < 1:
            return
        names = [n for n in self.jobs.compile if any(map(self.possible, self.jobs.phases[n]))]
        names.sort(key=lambda n: min(self.jobs.phases[n]))
        self.pool.submit(names)

    def run(self) -> None:
        for phase in PHASES:
            self.run_phase(phase, [i for i in self.items if i.phase == phase])
            later = set(list(PHASES)[list(PHASES).index(phase) + 1 :])
            self.pool.cancel([n for n, ps in self.jobs.phases.items() if not ps & later])
        self.report["finished"] = True
        self.write()

    def run_phase(self, key: str, items: list[Item]) -> None:
        phase = self.report["phases"][key]
        budget = self.budgets[key]
        if not self.possible(key):
            reason = (
                f"its budget is {budget:.0f} s"
                if budget <= 0
                else f"{max(self.left(), 0.0):.0f} s of the budget left; it needs half of its "
                f"{budget:.0f} s"
            )
            phase |= {"status": "skipped", "reason": reason}
            for item in items:
                phase["items"][item.name] = {"status": "skipped", "reason": "phase skipped"}
            self.write()
            return
        allowance = min(budget, self.left())
        phase |= {
            "status": "running",
            "allowance_s": round(allowance, 1),
            "started_s": round(elapsed(), 1),
        }
        try:
            self.run_items(phase, items, time.monotonic() + allowance)
        except Interrupted:
            phase["status"] = "interrupted"
            raise
        statuses = {e["status"] for e in phase["items"].values()}
        phase["status"] = (
            "ok"
            if statuses == {"ok"}
            else "partial"
            if "ok" in statuses
            else "skipped"
            if statuses <= {"skipped"}
            else "error"
        )
        phase["elapsed_s"] = round(elapsed() - phase["started_s"], 1)
        self.write()

    def run_items(self, phase: dict, items: list[Item], end: float) -> None:
        """Each measurement as soon as its programs are ready, the first in order of value
        among those; what ``end`` leaves no time for is skipped. Each gets an equal share
        of what is left for its repeats (``self.deadline``)."""
        pending = list(items)
        while pending:
            item = self.next_ready(pending, end)
            if item is None:
                compiling = any(
                    self.pool.status(j) in ("queued", "running") for i in pending for j in i.needs
                )
                reason = (
                    "its programs were still compiling when the phase's budget ran out"
                    if compiling
                    else "the phase's budget ran out"
                )
                for rest in pending:
                    phase["items"][rest.name] = {"status": "skipped", "reason": reason}
                return
            pending.remove(item)
            self.deadline = time.monotonic() + (end - time.monotonic()) / (len(pending) + 1)
            self.run_item(phase, item)

    def next_ready(self, pending: list[Item], end: float) -> Item | None:
        """The first pending measurement (in order of value) whose programs are no longer
        compiling (done, failed or never submitted), waiting for one until ``end``."""
        while time.monotonic() < end:
            for item in pending:
                if all(self.pool.status(j) not in ("queued", "running") for j in item.needs):
                    return item
            compiling = {j for i in pending for j in i.needs} & self.pool.compiling()
            self.pool.wait(sorted(compiling), end)
            self.write()  # with the compile times of the job that ended
        return None

    def run_item(self, phase: dict, item: Item) -> None:
        entry = {
            "status": "running",
            "started_s": round(elapsed(), 1),
            "compiling_meanwhile": self.pool.busy(),
        }
        phase["items"][item.name] = entry
        self.write()
        tally = compile_cache.Tally()
        try:
            entry |= {"status": "ok", "result": item.run(self)}
        except Skip as e:
            entry |= {"status": "skipped", "reason": str(e)}
        except Interrupted:
            entry |= {"status": "interrupted"}
            raise
        except Exception as e:  # recorded; the next measurement goes on
            entry |= {
                "status": "error",
                "error": f"{type(e).__name__}: {e}"[:1000],
                "traceback": traceback.format_exc()[-3000:],
            }
        finally:
            counts = tally.counts()
            entry |= {
                "elapsed_s": round(elapsed() - entry["started_s"], 2),
                "programs": {
                    "compiled": counts["compiled"],
                    "loaded": counts["cache_hits"],
                    "compile_or_load_s": counts["compile_or_load_s"],
                },
                "compiling_meanwhile_at_end": self.pool.busy(),
            }
            gc.collect()
            self.write()


# ---- the human-readable report --------------------------------------------------------


def markdown(report: dict) -> str:
    """``report.md``: the figures of ``report.json`` as tables."""
    state = (
        "finished"
        if report["finished"]
        else f"interrupted ({report['interrupted']})"
        if report["interrupted"]
        else "running"
    )
    lines = [
        f"# mjxsac GPU check{' (smoke)' if report['smoke'] else ''}, {report['date']}",
        "",
        f"`{' '.join(report['command'])}`: budget {report['budget_s']:.0f} s, "
        f"{report['elapsed_s']:.0f} s elapsed, {state}. Wall seconds; steps/s are "
        "medians of the timed runs unless marked best.",
        "",
    ]
    for key, phase in report["phases"].items():
        reason = f": {phase['reason']}" if phase.get("reason") else ""
        lines += [f"## {key}. {phase['name']} ({phase['status']}{reason})", ""]
        ok = {name: e["result"] for name, e in phase["items"].items() if e["status"] == "ok"}
        if ok:
            lines += [*RENDERERS[key](ok, phase["items"]), ""]
        for name, entry in phase["items"].items():
            why = entry.get("reason") or entry.get("error") or ""
            if entry["status"] != "ok" and why != "phase skipped":
                lines.append(f"- {name}: {entry['status']} {why}".rstrip())
        lines.append("")
    jobs = report["compile"]["jobs"]
    lines += [
        "## Compiled ahead",
        "",
        f"Cache {report['compile']['cache']}, {report['compile']['workers']} children at a time.",
        "",
    ]
    rows = [
        [
            name,
            job["status"],
            ", ".join(f"{k} {v:.1f}" for k, v in job.get("programs_s", {}).items()),
            f"{job.get('started_s', '')}, {job.get('ended_s', '')}",
        ]
        for name, job in jobs.items()
    ]
    lines += table(
        ["job", "status", "seconds per program (trace, lower, compile)", "started, ended s"], rows
    )
    return "\n".join(lines) + "\n"


def table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(x) for x in row) + " |" for row in rows),
    ]


def _k(x: float | None) -> str:
    return "" if x is None else f"{x / 1e3:,.1f}k"


def _f(x: float | None, form: str = ".2f") -> str:
    return "" if x is None else format(x, form)


def _versions(ok: dict, items: dict) -> list[str]:
    v = ok["versions"]
    packages = ", ".join(f"{k} {x}" for k, x in v["packages"].items() if x)
    devices = ", ".join(f"{d['kind']} ({d['platform']} {d['id']})" for d in v["devices"])
    memory = ", ".join(f"{k} {x / 2**30:.1f} GiB" for k, x in v["memory"].items())
    host = v["host"]
    return [
        f"- packages: {packages}",
        f"- devices: {devices}; memory: {memory or 'n/a'}",
        f"- nvidia-smi: {v['nvidia_smi']}",
        f"- host: Python {host['python']}, "
        f"{host['cpus']} CPUs, {host['ram_gib']} GiB, {host['platform']}",
        f"- imports {v['imports_s']:.1f} s; code {v['git']}; XLA/JAX settings: "
        f"{v['environment'] or 'none'}",
        f"- warp: {v['warp']}",
        f"- devices: {v['scale_out']}",
    ]


def _raw(ok: dict, items: dict) -> list[str]:
    rows = [
        [
            name,
            _k(r["steps_per_s"]),
            _k(r["best_steps_per_s"]),
            ", ".join(f"{t:.3f}" for t in r["runs_s"]),
            f"{r['compile_or_load_s']:.1f}",
            f"{items[name]['programs']['compiled']} / {items[name]['programs']['loaded']}",
            items[name]["compiling_meanwhile"],
        ]
        for name, r in ok.items()
    ]
    return table(
        [
            "task @ envs",
            "steps/s",
            "best",
            "timed runs s",
            "first call s (load or compile)",
            "programs compiled / loaded",
            "children compiling",
        ],
        rows,
    )


def _pipeline(ok: dict, items: dict) -> list[str]:
    loops = [
        [
            name,
            f"{r['num_envs']:,}",
            _k(r["loop_steps_per_s"]),
            _k(r["raw_steps_per_s"]),
            _f(r["ratio"]),
            _f(r["ratio_to_raw"]),
        ]
        for name, r in ok.items()
        if name.startswith("overhead")
    ]
    splits = [
        [
            name,
            f"{r['num_envs']:,}, {r['batch_size']:,}, {r['updates_per_step']}, "
            f"{r['steps_per_chunk']}",
            _f(r["chunk_s_on"], ".3f"),
            _f(r["chunk_s_off"], ".3f"),
            _k(r["env_steps_per_s_on"]),
            _k(r["env_steps_per_s_off"]),
            _f(r["updates_per_s"], ",.0f"),
            _f(r["update_share"], ".0%"),
        ]
        for name, r in ok.items()
        if name.startswith("split")
    ]
    return [
        *table(
            [
                "updates off",
                "envs",
                "loop steps/s (best)",
                "wrapped env steps/s (best)",
                "ratio",
                "ratio to a's raw",
            ],
            loops,
        ),
        "",
        *table(
            [
                "chunk",
                "envs, batch, updates/step, steps",
                "chunk s, updates on",
                "off",
                "env steps/s on",
                "off",
                "updates/s",
                "updates' share",
            ],
            splits,
        ),
    ]


def _learning(ok: dict, items: dict) -> list[str]:
    lines = []
    for name, r in ok.items():
        c = r["config"]
        lines += [
            f"{name}: {c['num_envs']:,} envs, batch {c['batch_size']:,}, "
            f"{c['updates_per_step']} updates/step, {tuple(c['hidden_sizes'])}; started "
            f"{r['process_s_at_start']:.0f} s after process start, its programs loaded "
            "from the cache (their compile times: 'Compiled ahead'); best eval return "
            f"{_f(r['best_eval_return'], ',.1f')}; {len(r['curve'])} evaluations"
            + (
                f", {CURVE_ROWS} of them below (all in report.json)."
                if len(r["curve"]) > CURVE_ROWS
                else "."
            ),
            "",
        ]
        curve = r["curve"]
        if len(curve) > CURVE_ROWS:  # evenly spaced, the first and the last among them
            curve = [
                curve[round(i * (len(curve) - 1) / (CURVE_ROWS - 1))] for i in range(CURVE_ROWS)
            ]
        rows = [
            [f"{p['wall_s']:.1f}", f"{p['env_steps']:,}", f"{p['eval_return']:,.1f}"] for p in curve
        ]
        lines += [*table(["wall s from the run's start", "env steps", "eval return"], rows), ""]
    return lines


CURVE_ROWS = 25


def _population(ok: dict, items: dict) -> list[str]:
    rows = [
        [
            r["members"],
            f"{r['first_chunk_s']:.1f}",
            f"{r['median_chunk_s']:.3f}",
            _f(r["vs_1"]),
            _k(r["env_steps_per_s_per_member"]),
            _k(r["env_steps_per_s_total"]),
        ]
        for r in ok.values()
    ]
    return table(
        ["members", "first chunk s", "chunk s (median)", "vs 1", "env steps/s per member", "total"],
        rows,
    )


def _policy(ok: dict, items: dict) -> list[str]:
    r = ok["policy"]
    return [
        f"{r['preset']} run's policy at {r['env_steps']:,} env steps (eval return "
        f"{r['eval_return']:,.1f}): {r['directory']}, {r['bytes'] / 2**20:.2f} MiB, loads "
        f"back: {r['loads_back']}; `{r['render']}`"
    ]


RENDERERS = {
    "0": _versions,
    "a": _raw,
    "b": _pipeline,
    "c": _learning,
    "d": _population,
    "e": _policy,
}


def _interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    plan = plan_from(args)
    if args.compile_only:
        compile_only(args, plan)
        return {}
    compile_cache.configure(args.compile_cache)  # before anything compiles
    check = Check(args, plan, argv)
    jax.devices()  # the backend first (it takes the device's memory), then the children
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    code = 0
    try:
        check.start_compiling()
        check.run()
    except Interrupted as e:
        check.report["interrupted"] = str(e)
        code = 128 + signal.SIGTERM
    finally:
        check.pool.close()
        check.write()
    print(f"gpu_check: {check.out / 'report.md'} ({check.report['elapsed_s']:.0f} s)")
    if code:
        raise SystemExit(code)
    return check.report


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the report's directory")
    parser.add_argument(
        "--budget-s", type=float, help="wall seconds from process start; default 500 (--smoke: 60)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU")
    parser.add_argument(
        "--phase-budget",
        nargs="*",
        default=[],
        metavar="PHASE=S",
        help="a phase's own budget in seconds (default: its share)",
    )
    parser.add_argument(
        "--compile-cache",
        help="the compilation cache shared with the "
        "children; default: a folder in the system's temporary directory",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="compiling children at a time; default: "
        "the CPUs less 2, at least 1; 0: this process compiles everything",
    )
    parser.add_argument("--tasks", nargs="*", choices=envs.NAMES, help="a: at --num-envs")
    parser.add_argument("--num-envs", type=int, help="a and b (default 4,096; smoke 8)")
    parser.add_argument(
        "--size-tasks",
        nargs="*",
        choices=envs.NAMES,
        help="a: also at --sizes (default HalfCheetah Ant)",
    )
    parser.add_argument("--sizes", nargs="*", type=int, help="default 1,024 16,384")
    parser.add_argument("--compile-only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 60.0 if args.smoke else 500.0
    if args.compile_cache is None:
        args.compile_cache = str(Path(tempfile.gettempdir()) / "mjxsac-gpu-check-cache")
    # absolute: the children start elsewhere
    args.out, args.compile_cache = (str(Path(p).absolute()) for p in (args.out, args.compile_cache))
    if args.workers is None:
        args.workers = max(1, len(os.sched_getaffinity(0)) - 2)
    return args


if __name__ == "__main__":
    main()
