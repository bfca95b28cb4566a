"""SAC benchmarks, side by side on the same task and hardware. Prints results and writes
JSON; docs/BENCHMARKS.md records them with date, device and command.

    # time from process start to an eval return (ours, then Brax's SAC through the adapter)
    python -m launch.bench_sac target --task HalfCheetah --target 10000 --budget-s 600 --brax
    python -m launch.bench_sac target --task HalfCheetah --brax-only --brax-steps 1000000
    # pipeline overhead: env steps/s through the training loop with updates off, 4,096 envs
    python -m launch.bench_sac overhead --task HalfCheetah --num-envs 4096
    # final returns and the wall time to reach them, evaluated in MJX and in Gymnasium
    python -m launch.bench_sac final --task Hopper --algo sac-v2 sac-v1 --seeds 0 1 2

Our runs use the ``parallel`` preset unless ``--preset`` says otherwise; ``--set
field=value`` overrides any config field.
"""

from __future__ import annotations

import time

PROCESS_START = time.monotonic()  # "time from process start" counts from here

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402
from launch.bench_envs import measure, stack_of  # noqa: E402
from mjxsac import presets  # noqa: E402
from mjxsac.config import Config, parse_scalar  # noqa: E402
from mjxsac.evaluate import evaluate_gymnasium  # noqa: E402
from mjxsac.policy import Loaded  # noqa: E402
from mjxsac.sac import Trainer, env_steps  # noqa: E402


def make_config(task: str, algo: str, preset: str, seed: int, sets: list[str]) -> Config:
    config = dataclasses.replace(presets.config_for(task, algo, preset), seed=seed)
    overrides = dict(item.split("=", 1) for item in sets)
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SystemExit(f"unknown config fields: {', '.join(unknown)}")
    values = {k: parse_scalar(v) for k, v in overrides.items()}
    return Config.from_dict({**config.to_dict(), **values}).validate()


def run_ours(config: Config, target: float | None, budget_s: float, eval_chunks: int,
             start: float = PROCESS_START) -> dict:  # fmt: skip
    """Train until ``target`` (if given), the step budget or ``budget_s``; evaluate every
    ``eval_chunks`` chunks. Times count from ``start`` (``time.monotonic``; default:
    process start)."""
    trainer = Trainer(config)
    state = trainer.init()
    curve, reached = [], None
    for chunk in range(config.num_chunks):
        state, _ = trainer.train_chunk(state)
        if (chunk + 1) % eval_chunks and chunk + 1 != config.num_chunks:
            continue
        returns, _ = trainer.evaluate(state, chunk)
        eval_return = float(np.mean(returns))  # waits for the chunk and the evaluation
        point = {
            "wall_s": time.monotonic() - start,
            "env_steps": env_steps(state),
            "eval_return": eval_return,
        }
        curve.append(point)
        print(f"  ours {point}", flush=True)
        if target is not None and point["eval_return"] >= target:
            reached = point
            break
        if point["wall_s"] > budget_s:
            break
    return {"config": config.to_dict(), "curve": curve, "reached": reached,
            "trainer": trainer, "state": state}  # fmt: skip


def run_brax(task: str, target: float, budget_s: float, seed: int, env_steps: int) -> dict:
    """Brax's own SAC trainer on our task through the adapter (its settings from
    ../shared/gpu/README.md: 256 envs, batch 512, 32 updates per step)."""
    if not hasattr(jax, "device_put_replicated"):  # removed from jax; Brax still calls it
        jax.device_put_replicated = lambda x, devices: jax.tree.map(
            lambda leaf: jax.device_put(jnp.stack([jnp.asarray(leaf)] * len(devices)), devices[0]),
            x,
        )
    from brax.training.agents.sac import train as brax_sac

    from envs.brax_adapter import BraxEnv

    curve, start = [], time.monotonic()

    def progress(steps, metrics):
        point = {
            "wall_s": time.monotonic() - start,
            "env_steps": int(steps),
            "eval_return": float(metrics.get("eval/episode_reward", np.nan)),
        }
        curve.append(point)
        print(f"  brax {point}", flush=True)

    env = BraxEnv(envs.make(task))
    brax_sac.train(
        environment=env, num_timesteps=env_steps, episode_length=1000, num_envs=256,
        batch_size=512, grad_updates_per_step=32, learning_rate=3e-4, discounting=0.99,
        normalize_observations=True, num_evals=20, seed=seed, progress_fn=progress,
        deterministic_eval=True, max_replay_size=1_000_000, min_replay_size=8192,
    )  # fmt: skip
    reached = next((p for p in curve if p["eval_return"] >= target), None)
    return {"curve": curve, "reached": reached, "budget_s": budget_s}


def cmd_target(args) -> dict:
    out = {}
    if not args.brax_only:
        config = make_config(args.task, args.algo[0], args.preset, args.seeds[0], args.set)
        out["ours"] = _public(run_ours(config, args.target, args.budget_s, args.eval_chunks))
    if args.brax or args.brax_only:
        out["brax"] = run_brax(args.task, args.target, args.budget_s, args.seeds[0],
                               args.brax_steps)  # fmt: skip
    return out


def time_chunks(trainer: Trainer, chunks: int) -> tuple[float, float]:
    """Seconds of the first chunk (compilation included, from a fresh state) and the best
    of ``chunks`` later chunks."""
    first, times = chunk_times(trainer, chunks)
    return first, min(times)


def chunk_times(trainer: Trainer, chunks: int,
                deadline: float | None = None) -> tuple[float, list[float]]:  # fmt: skip
    """Seconds of the first chunk (compilation included, from a fresh state) and of each
    of ``chunks`` later chunks; fewer (at least one) where the next would end after
    ``deadline`` (``time.monotonic``), judged by the last."""
    t0 = time.perf_counter()
    state, _ = trainer.train_chunk(trainer.init())
    jax.block_until_ready(state)
    first = time.perf_counter() - t0
    times: list[float] = []
    for _ in range(chunks):
        if times and deadline is not None and time.monotonic() + times[-1] > deadline:
            break
        t0 = time.perf_counter()
        state, _ = trainer.train_chunk(state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return first, times


def overhead(config: Config, chunks: int = 3, repeats: int = 2,
             deadline: float | None = None) -> dict:  # fmt: skip
    """Env steps/s through ``train_chunk`` with updates switched off (best of ``chunks``
    chunks), against the raw wrapped env (time limit + auto-reset) in the same process,
    ``steps_per_chunk`` steps per rollout (best of ``repeats``). ``deadline``: fewer
    repeats (see ``chunk_times``)."""
    trainer = Trainer(config)
    compile_and_first, times = chunk_times(trainer, chunks, deadline)
    loop = config.env_steps_per_chunk / min(times)
    raw = measure(*stack_of(trainer.env, config.num_envs, "wrapped"), config.num_envs,
                  trainer.env.action_size, config.steps_per_chunk, repeats,
                  deadline=deadline)  # fmt: skip
    return {"loop_steps_per_s": loop, "loop_first_chunk_s": compile_and_first,
            "raw_steps_per_s": raw["steps_per_s"], "ratio": loop / raw["steps_per_s"],
            "loop_chunks_s": times, "raw_runs_s": raw["runs_s"]}  # fmt: skip


def cmd_overhead(args) -> dict:
    """``overhead`` for ``--task`` at ``--num-envs``, updates off, no warm-up."""
    sets = [*args.set, f"num_envs={args.num_envs}", "updates_per_step=0", "warmup_steps=0"]
    return overhead(make_config(args.task, "sac-v2", args.preset, args.seeds[0], sets))


def cmd_final(args) -> dict:
    rows = []
    for algo in args.algo:
        for seed in args.seeds:
            config = make_config(args.task, algo, args.preset, seed, args.set)
            result = run_ours(config, None, float("inf"), args.eval_chunks)
            state = jax.tree.map(lambda x: x[0], result["state"])  # the one member
            policy = {"actor": state.actor, "normalizer": state.normalizer}
            loaded = Loaded(result["trainer"], policy, env_steps(result["state"]), 0)
            gym_returns = evaluate_gymnasium(loaded, 10, seed=1000, say=lambda _: None)[0]
            final = result["curve"][-1]
            rows.append({"algo": algo, "seed": seed, "env_steps": final["env_steps"],
                         "wall_s": final["wall_s"], "mjx_return": final["eval_return"],
                         "gymnasium_return": float(np.mean(gym_returns)),
                         "gymnasium_returns": gym_returns, "curve": result["curve"]})  # fmt: skip
            print(f"  {algo} seed {seed}: MJX {final['eval_return']:.1f}, "
                  f"Gymnasium {np.mean(gym_returns):.1f}", flush=True)  # fmt: skip
    return {"runs": rows}


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("trainer", "state")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["target", "overhead", "final"])
    parser.add_argument("--task", default="HalfCheetah", choices=envs.NAMES)
    parser.add_argument("--algo", nargs="+", default=["sac-v2"], choices=["sac-v2", "sac-v1"])
    parser.add_argument("--preset", default="parallel", choices=list(presets.PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides field=value")
    parser.add_argument("--target", type=float, default=10_000.0)
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--eval-chunks", type=int, default=10, help="evaluate every N chunks")
    parser.add_argument("--num-envs", type=int, default=4096)
    parser.add_argument("--brax", action="store_true", help="also run Brax's SAC (target)")
    parser.add_argument("--brax-only", action="store_true", help="Brax's SAC alone (target)")
    parser.add_argument("--brax-steps", type=int, default=3_000_000)
    parser.add_argument("--out", default="bench_sac.json")
    args = parser.parse_args(argv)
    command = {"target": cmd_target, "overhead": cmd_overhead, "final": cmd_final}[args.mode]
    out = {"mode": args.mode, "task": args.task, "device": str(jax.devices()[0]),
           "date": time.strftime("%Y-%m-%d"), **command(args)}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, default=float)[:2000])
    return out


if __name__ == "__main__":
    main()
