"""What the speed options cost in fidelity: one-step parity of each task, under each set
of options, against Gymnasium's own environment with its XML settings (the reference).
The empty option set is the task's defaults (its solver caps); ``iterations=xml,
ls_iterations=xml`` runs the XML's solver settings.

    python -m launch.fidelity                         # all tasks, the option sets below
    python -m launch.fidelity --tasks Ant --steps 400 --options "iterations=4,ls_iterations=8"

Prints a Markdown table (docs/ENVIRONMENTS.md keeps the measured one) and writes JSON.
Runs in float64 on the CPU; the numbers do not depend on the accelerator.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import envs
from envs.parity import one_step_parity, record_one_step
from mjxsac.config import parse_scalar

OPTION_SETS = (
    "",
    "iterations=xml,ls_iterations=xml",
    "faithful=false",
    "iterations=4,ls_iterations=8",
    "integrator=euler",
    "iterations=4,ls_iterations=8,integrator=euler",
)


def measure(task: str, options: str, steps: int, seed: int) -> dict:
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, value = item.split("=")
        kwargs[key] = parse_scalar(value)
    env = envs.make(task, **kwargs)
    record = record_one_step(task, steps, seed)
    diffs = one_step_parity(env, record)
    per_step = diffs["obs"].max(axis=1)
    scale = np.maximum(np.abs(np.stack([r.obs for r in record])).max(axis=1), 1e-12)
    return {
        "task": task,
        "options": options or "(task defaults)",
        "obs_median": float(np.median(per_step)),
        "obs_max": float(per_step.max()),
        "obs_max_relative": float((per_step / scale).max()),
        "steps_above_1e-3": float((per_step > 1e-3).mean()),
        "reward_max": float(diffs["reward"].max()),
        "termination_mismatches": int(diffs["terminated"].sum()),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| task | options | obs diff median | obs diff max (relative) | steps > 1e-3 "
        "| reward diff max | termination mismatches |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['options']} | {r['obs_median']:.1e} | {r['obs_max']:.1e} "
            f"({r['obs_max_relative']:.1e}) | {100 * r['steps_above_1e-3']:.0f}% "
            f"| {r['reward_max']:.1e} | {r['termination_mismatches']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(envs.NAMES), choices=envs.NAMES)
    parser.add_argument("--options", nargs="+", default=list(OPTION_SETS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fidelity.json")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    rows = []
    for task in args.tasks:
        for options in args.options:
            rows.append(measure(task, options, args.steps, args.seed))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
