"""Population scaling: wall time and env steps/s per member for populations of P members
at a fixed per-member size, as ratios to P = 1, measured in one run. Prints a Markdown
table and writes JSON.

    python -m launch.bench_population                                   # P = 1, 4, 16, 64
    python -m launch.bench_population --task HalfCheetah --preset parallel --sizes 1 8 32

Each population is its own program (P is a shape): the first chunk (compile included) is
timed apart, then ``--chunks`` chunks with updates on. ``--set key=value`` overrides the
per-member config (e.g. a smaller ``num_envs`` or ``hidden_sizes`` for a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

from launch.bench_sac import chunk_times
from mjxsac import presets
from mjxsac.config import Config, parse_scalar
from mjxsac.sac import Trainer, describe_mesh

CPU_MEMBER = {"num_envs": 8, "batch_size": 128, "hidden_sizes": (128, 128), "warmup_steps": 0,
              "updates_per_step": 2, "steps_per_chunk": 50, "buffer_size": 20_000}  # fmt: skip


def member_config(task: str, preset: str, sets: list[str]) -> Config:
    config = presets.config_for(task, "sac-v2", preset)
    values = dict(CPU_MEMBER) if preset == "cpu" else {}
    for item in sets:
        key, _, value = item.partition("=")
        values[key] = parse_scalar(value)
    if isinstance(values.get("hidden_sizes"), str):
        values["hidden_sizes"] = tuple(int(h) for h in values["hidden_sizes"].split("x"))
    return dataclasses.replace(config, **values).validate()


def measure(config: Config, size: int, chunks: int, deadline: float | None = None,
            devices: int = 1) -> dict:  # fmt: skip
    """First chunk (compile included) and the best (and the median) of ``chunks`` later
    chunks (fewer where the next would end after ``deadline``: see ``chunk_times``), on
    the first ``devices`` devices (members spread, or data parallel: ``mjxsac.sac``)."""
    trainer = Trainer(population(config, size), jax.devices()[:devices])
    first, times = chunk_times(trainer, chunks, deadline)
    best = min(times)
    steps = config.env_steps_per_chunk
    return {
        "members": size,
        "devices": devices,
        "placement": describe_mesh(trainer.mesh, size),
        "first_chunk_s": first,
        "chunk_s": best,
        "median_chunk_s": float(np.median(times)),
        "env_steps_per_s_per_member": steps / best,
        "env_steps_per_s_total": size * steps / best,
    }


def population(config: Config, size: int) -> Config:
    """``size`` members of ``config``: seeds 0 to size - 1."""
    return dataclasses.replace(config, seeds=f"0-{size - 1}")


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| members | first chunk s (compile incl.) | chunk s | wall time vs P=1 "
        "| env steps/s per member | per member vs P=1 | total env steps/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['members']} | {r['first_chunk_s']:.1f} | {r['chunk_s']:.3f} | "
            f"{r['chunk_s'] / base['chunk_s']:.2f}x | {r['env_steps_per_s_per_member']:,.0f} | "
            f"{r['env_steps_per_s_per_member'] / base['env_steps_per_s_per_member']:.2f} | "
            f"{r['env_steps_per_s_total']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="Hopper")
    parser.add_argument("--preset", default="cpu" if jax.default_backend() == "cpu" else "paper")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks after the first")
    parser.add_argument("--set", action="append", default=[], help="member config key=value")
    parser.add_argument("--out", default="bench_population.json")
    args = parser.parse_args(argv)
    config = member_config(args.task, args.preset, args.set)
    print(f"device {jax.devices()[0]} | {args.task} {args.preset} per member: "
          f"{config.num_envs} envs, batch {config.batch_size}, {config.hidden_sizes}, "
          f"{config.updates_per_step} updates/step, {config.steps_per_chunk} steps/chunk",
          flush=True)  # fmt: skip
    rows = []
    for size in args.sizes:
        rows.append(measure(config, size, args.chunks))
        print(table(rows).splitlines()[-1], flush=True)
        with open(args.out, "w") as f:  # rewritten after each size: nothing lost
            json.dump({"device": str(jax.devices()[0]), "task": args.task,
                       "member": config.to_dict(), "results": rows}, f, indent=1)  # fmt: skip
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
