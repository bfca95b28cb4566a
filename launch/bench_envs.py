"""Raw environment throughput: random actions, ``vmap`` + ``lax.scan``, steps per second
and first-compile seconds, for our tasks and (``--brax``) Brax's built-in mjx envs in the
same run. Prints a Markdown table and writes JSON.

    python -m launch.bench_envs                                  # all tasks, 1k/4k/16k envs
    python -m launch.bench_envs --tasks Hopper Ant --num-envs 4096 --brax
    python -m launch.bench_envs --tasks Ant --iterations 4 --ls-iterations 8  # speed options
    python -m launch.bench_envs --tasks Hopper Ant --xml     # defaults vs the XML's solver caps
    python -m launch.bench_envs --tasks Hopper Ant --num-envs 64 --impl jax warp  # backends

Two columns per task: ``raw`` steps the vmapped env alone, ``wrapped`` adds what training
pays for (time limit and auto-reset with fresh reset noise). ``--xml`` adds ``raw`` with the
XML's solver caps (``iterations=xml,ls_iterations=xml``) and the ratio of the two.
``--impl jax warp`` measures each task under both physics backends, in the same run, and
prints the ratio of their raw steps/s (MuJoCo Warp needs ``pip install -e ".[warp]"``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable

import jax
import numpy as np

import envs
from envs.base import add_physics_arguments, physics_from_arguments

BRAX_NAMES = {
    "InvertedPendulum": "inverted_pendulum",
    "Hopper": "hopper",
    "Walker2d": "walker2d",
    "HalfCheetah": "halfcheetah",
    "Ant": "ant",
    "Humanoid": "humanoid",
    "Swimmer": "swimmer",
}


def rollout_program(step: Callable, num_envs: int, action_size: int, steps: int) -> Callable:
    """A ``steps``-long rollout of random actions in [-1, 1]: ``rollout(state, key)``."""

    def rollout(state, key):
        def body(state, key):
            action = jax.random.uniform(key, (num_envs, action_size), minval=-1.0, maxval=1.0)
            return step(state, action), None

        return jax.lax.scan(body, state, jax.random.split(key, steps))[0]

    return rollout


def measure(reset: Callable, step: Callable, num_envs: int, action_size: int, steps: int,
            repeats: int = 2, warmup: int = 0, deadline: float | None = None) -> dict:  # fmt: skip
    """Compile a ``steps``-long random-action rollout, run it ``warmup`` times untimed,
    then time it ``repeats`` times (fewer, at least once, where the next run would end
    after ``deadline``, a ``time.monotonic``): steps/s of the best run (``steps_per_s``)
    and of the median one, and every run's seconds."""
    rollout = rollout_program(step, num_envs, action_size, steps)
    key = jax.random.key(0)
    state = jax.block_until_ready(jax.jit(reset)(key))
    t0 = time.perf_counter()
    compiled = jax.jit(rollout).lower(state, key).compile()
    compile_s = time.perf_counter() - t0
    runs: list[float] = []
    for i in range(warmup + repeats):
        if runs and deadline is not None and time.monotonic() + runs[-1] > deadline:
            break
        t0 = time.perf_counter()
        state = jax.block_until_ready(compiled(state, jax.random.fold_in(key, i)))
        if i >= warmup:
            runs.append(time.perf_counter() - t0)
    best, median = min(runs), float(np.median(runs))
    return {"steps_per_s": num_envs * steps / best, "compile_s": compile_s, "run_s": best,
            "median_steps_per_s": num_envs * steps / median, "runs_s": runs}  # fmt: skip


def compile_rollout(reset: Callable, step: Callable, num_envs: int, action_size: int,
                    steps: int) -> dict:  # fmt: skip
    """Compile the programs ``measure`` runs (into the persistent compilation cache, for
    a later process), from shapes alone: nothing is allocated or run. Seconds of each."""
    key = jax.random.key(0)
    t0 = time.perf_counter()
    jax.jit(reset).lower(key).compile()
    reset_s = time.perf_counter() - t0
    rollout = jax.jit(rollout_program(step, num_envs, action_size, steps))
    rollout.lower(jax.eval_shape(reset, key), key).compile()
    return {"reset": reset_s, "rollout": time.perf_counter() - t0 - reset_s}


def stack_of(env: envs.Env, num_envs: int, stack: str = "raw") -> tuple[Callable, Callable]:
    """``reset`` and ``step`` (actions in [-1, 1]) of ``num_envs`` copies of ``env``: the
    vmapped env alone (``raw``) or with the time limit and auto-reset (``wrapped``)."""
    vmapped = envs.VmapEnv(env, num_envs) if stack == "raw" else envs.wrap(env, num_envs)
    return vmapped.reset, lambda state, action: vmapped.step(state, envs.scale_action(env, action))


def bench_ours(task: str, num_envs: int, steps: int, options: dict,
               stacks: tuple[str, ...] = ("raw", "wrapped")) -> dict:  # fmt: skip
    env = envs.make(task, **options)
    return {name: measure(*stack_of(env, num_envs, name), num_envs, env.action_size, steps)
            for name in stacks}  # fmt: skip


def bench_brax(task: str, num_envs: int, steps: int) -> dict:
    from brax import envs as brax_envs

    env = brax_envs.get_environment(BRAX_NAMES[task], backend="mjx")

    def reset(key):
        return jax.vmap(env.reset)(jax.random.split(key, num_envs))

    return {"raw": measure(reset, jax.vmap(env.step), num_envs, env.action_size, steps)}


def table(results: list[dict]) -> str:
    lines = [
        "| task | envs | ours raw steps/s (compile s) | ours wrapped steps/s (compile s) "
        "| Brax mjx steps/s (compile s) | ours raw, XML solver caps (compile s) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict | None) -> str:
        return "" if not r else f"{r['steps_per_s'] / 1e3:,.1f}k ({r['compile_s']:.0f})"

    for r in results:
        brax, xml = r.get("brax") or {}, (r.get("xml") or {}).get("raw")
        ratio = f"{r['ours']['raw']['steps_per_s'] / xml['steps_per_s']:.2f}x" if xml else ""
        task = r["task"] + (f" ({r['options']['impl']})" if "impl" in r["options"] else "")
        lines.append(
            f"| {task} | {r['num_envs']:,} | {cell(r['ours']['raw'])} | "
            f"{cell(r['ours']['wrapped'])} | {cell(brax.get('raw'))} | {cell(xml)} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(envs.NAMES), choices=envs.NAMES)
    parser.add_argument("--num-envs", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=200, help="scan length per rollout")
    parser.add_argument("--brax", action="store_true", help="also Brax's built-in mjx envs")
    parser.add_argument("--xml", action="store_true", help="also ours with the XML's solver caps")
    parser.add_argument("--out", default="bench_envs.json", help="JSON results")
    add_physics_arguments(parser, several=("impl",))
    args = parser.parse_args(argv)
    options = physics_from_arguments(args)
    impls = options.pop("impl", ["jax"])
    for impl in impls:  # refuse a bad or missing backend before measuring anything
        envs.PhysicsOptions(impl=impl)
    print(f"devices: {jax.devices()} | options: {options or 'task defaults'}", flush=True)
    results = []
    for task, n, impl in itertools.product(args.tasks, args.num_envs, impls):
        chosen = {**options, "impl": impl} if impl != "jax" else options
        row = {"task": task, "num_envs": n, "steps": args.steps, "options": chosen,
               "ours": bench_ours(task, n, args.steps, chosen)}  # fmt: skip
        if args.brax and impl == impls[0]:  # (Brax's envs once per task and size)
            row["brax"] = bench_brax(task, n, args.steps)
        if args.xml:
            xml = {**chosen, "iterations": "xml", "ls_iterations": "xml"}
            row["xml"] = bench_ours(task, n, args.steps, xml, stacks=("raw",))
        results.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        with open(args.out, "w") as f:  # rewritten after each row: nothing lost
            json.dump({"device": str(jax.devices()[0]), "results": results}, f, indent=1)
    print(table(results))
    if len(impls) > 1:
        print(impl_table(results, impls))
    return results


def impl_table(results: list[dict], impls: list[str]) -> str:
    """Raw steps/s of each backend, and each against the first (``--impl jax warp``)."""
    head = " | ".join(f"{i} raw steps/s" for i in impls)
    ratios = " | ".join(f"{i} / {impls[0]}" for i in impls[1:])
    lines = [f"| task | envs | {head} | {ratios} |", "|---|---|" + "---|" * (2 * len(impls) - 1)]
    by = {(r["task"], r["num_envs"], r["options"].get("impl", "jax")): r for r in results}
    for task, n in dict.fromkeys((r["task"], r["num_envs"]) for r in results):
        rates = [by[task, n, i]["ours"]["raw"]["steps_per_s"] for i in impls]
        cells = " | ".join(f"{x:,.0f}" for x in rates)
        ratio = " | ".join(f"{x / rates[0]:.2f}x" for x in rates[1:])
        lines.append(f"| {task} | {n:,} | {cells} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
