"""Seconds from process start to the first SAC update, per task, phase by phase.

    python -m launch.bench_compile --tasks HalfCheetah Hopper Ant --runs 2 --out bench.json
    python -m launch.bench_compile --compile-cache off            # every process compiles
    python -m launch.bench_compile --serial                        # no background compile

Each run is a fresh process (started by this one; the clock starts before the interpreter
does), so imports count and nothing is shared but the persistent compilation cache. Runs
after the first use the next seed: the programs are the same, so with the cache on they
are loaded, not compiled. The phases, in the order the training command runs them:

* ``interpreter``, ``imports`` (jax, the envs, the trainer), ``env`` (``Trainer(config)``:
  the model, networks, optimizers), ``init`` (the first TrainState: jit of the init
  program, and running it);
* ``train_trace``, ``train_lower``, ``train_compile``: the train chunk through jit's
  ahead-of-time stages (trace to a jaxpr, lower to StableHLO, compile it or, with the
  cache on, load it);
* ``first_chunk``: running it (its updates start after ``warmup_steps``);
* ``eval_trace``, ``eval_lower``, ``eval_compile``: evaluation, in a worker thread while
  the first chunk runs where that can overlap (an accelerator, or several CPU cores), as
  the training command does; after it on one CPU core or with ``--serial``.

``to_first_update`` is the wall time from process start to the first chunk's end. Unless
``--set warmup_steps=...`` says otherwise, the warm-up is one chunk long
(``num_envs x steps_per_chunk`` env steps), so the first chunk's last step makes the
first ``updates_per_step`` updates and its end *is* the first update, not an upper bound
that adds a chunk of training compute. ``to_eval_ready`` adds what is left of
evaluation's compilation. Each run also reports the programs compiled and loaded (JAX's
compile events and cache logging) and the updates in the first chunk. The default config
is the ``parallel`` preset scaled to a CPU: 16 envs, batch 256, a buffer of 100,000
(``--set`` overrides any field).
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports, which are a measured phase

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

CPU_SCALE = ["num_envs=16", "batch_size=256", "buffer_size=100000"]


def first_update_at_chunk_end(config, sets: list[str]):
    """The config whose warm-up ends with the first chunk's last step (unless ``sets``
    chose a warm-up): updates start once the buffer holds ``num_envs x steps_per_chunk``
    transitions, which it does after that step's insert."""
    import dataclasses

    if any(item.startswith(("warmup_steps=", "learning_starts=")) for item in sets):
        return config
    steps = config.num_envs * config.steps_per_chunk
    return dataclasses.replace(config, warmup_steps=steps, learning_starts=None).validate()


def child(args) -> dict:
    """One process: the phases, timed in the order the training command runs them."""
    t = {"interpreter": STARTED - args.spawned}
    mark = time.time()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.time()
        t[name] = now - mark
        mark = now

    import jax

    from launch.bench_sac import make_config
    from mjxsac import compile_cache
    from mjxsac.ahead import Ahead, abstract, helps
    from mjxsac.sac import Trainer

    lap("imports")
    cache_dir = compile_cache.configure(args.compile_cache)
    tally = compile_cache.Tally()
    config = make_config(args.task, "sac-v2", args.preset, args.seed, [*CPU_SCALE, *args.set])
    config = first_update_at_chunk_end(config, args.set)
    trainer = Trainer(config)
    lap("env")
    state = jax.block_until_ready(trainer.init())
    lap("init")
    traced = trainer.trace_train_chunk(state)
    lap("train_trace")
    lowered = traced.lower()
    lap("train_lower")
    chunk = lowered.compile()
    lap("train_compile")
    eval_args = (state.actor, state.normalizer, trainer.eval_keys(0))
    eval_phases: dict[str, float] = {}
    evaluate = None
    eval_args = abstract(eval_args)  # the chunk donates the state
    overlap = helps() and not args.serial
    if overlap:
        evaluate = Ahead(trainer.trace_evaluate, *eval_args, phases=eval_phases)
    state, metrics = chunk(state)
    jax.block_until_ready((state, metrics))
    lap("first_chunk")
    to_first_update = mark - args.spawned
    if int(state.updates[0]) == 0:
        raise SystemExit(
            "bench_compile: the first chunk made no update, so its end is not the first "
            "update: lower warmup_steps / learning_starts / batch_size"
        )
    if evaluate is None:
        evaluate = Ahead(trainer.trace_evaluate, *eval_args, phases=eval_phases)
    evaluate.result()
    lap("eval_wait")
    out = {
        "task": args.task,
        "seed": args.seed,
        "compile_cache": str(cache_dir) if cache_dir else "off",
        "overlap": overlap,
        "seconds": {k: round(v, 2) for k, v in t.items()},
        "eval_seconds": {f"eval_{k}": round(v, 2) for k, v in eval_phases.items()},
        "to_first_update": round(to_first_update, 2),
        "to_eval_ready": round(mark - args.spawned, 2),
        **tally.counts(),
        "loaded": sorted(set(tally.hits)),
        "updates_in_first_chunk": int(state.updates[0]),
        "config": config.to_dict(),
    }
    return out


def run_child(task: str, seed: int, args) -> dict:
    command = [sys.executable, "-m", "launch.bench_compile", "--child", "--task", task,
               "--seed", str(seed), "--preset", args.preset, "--compile-cache",
               args.compile_cache, "--spawned", repr(time.time()),
               *(["--serial"] if args.serial else []), "--set", *args.set]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode:
        raise SystemExit(f"bench_compile: {task} seed {seed} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    from mjxsac.compile_cache import HELP

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["HalfCheetah", "Hopper", "Ant"])
    parser.add_argument("--runs", type=int, default=2, help="processes per task (seeds 0..)")
    parser.add_argument("--preset", default="parallel")
    parser.add_argument("--compile-cache", default="default", help=HELP)
    parser.add_argument("--serial", action="store_true", help="compile evaluation afterwards")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides field=value")
    parser.add_argument("--out", default="bench_compile.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    rows = []
    for task in args.tasks:
        for seed in range(args.runs):
            row = run_child(task, seed, args)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
    import jax

    out = {"device": str(jax.devices()[0]), "cpus": len(os.sched_getaffinity(0)),
           "date": time.strftime("%Y-%m-%d"), "runs": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
