"""What the speed options cost in fidelity: one-step parity of each task, under each set
of options, against Gymnasium's own environment with its XML settings (the reference).
The empty option set is the task's defaults (its solver caps); ``iterations=xml,
ls_iterations=xml`` runs the XML's solver settings.

    python -m launch.fidelity                         # all tasks, the option sets below
    python -m launch.fidelity --tasks Ant --steps 400 --options "iterations=4,ls_iterations=8"

``--long`` is the check that chooses the default caps: one-step parity from every state of
long held-out trajectories (seeds 1000-1009, 2,000 steps each, episodes restarting at a
termination or at 1,000 steps: 20,000 steps per task and source), driven by uniform random
actions and, with ``--policies DIR``, by the trained policy in ``DIR/<task>`` (its mean
action plus N(0, 0.1) in its [-1, 1] units), for the caps of ``--caps``, cheapest first
(the task's default too), up to the first that passes on every source (``--all-caps``:
all of them). A step's error is relative: its largest |observation difference| over the
largest |entry| of Gymnasium's observation. A cap passes when every step is within 1e-6,
except steps where the XML's caps miss 1e-6 too and the cap's step is within 1e-6 of
theirs (MuJoCo's solver tolerance: C and MJX stop at different iterates within it; the
XML's caps always pass). The cheapest passing cap is printed as the task's choice::

    python -m launch.fidelity --long --policies RUNS --cache CACHE --out fidelity_long.json

``--tolerance 1e-14`` runs both simulators' solvers to that tolerance instead of the XML's
1e-8: the check that the misses left at the XML's caps are the tolerance's.

Prints a Markdown table (docs/ENVIRONMENTS.md keeps the measured ones) and writes JSON.
Runs in float64 on the CPU; the numbers do not depend on the accelerator. The reference
is Gymnasium's own environment, except Humanoid's in ``--long``: C MuJoCo with Newton
(Gymnasium's PGS differs by its solver, not by the caps; see docs/ENVIRONMENTS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

import envs
from envs.base import XML, PhysicsOptions
from envs.parity import GymStep, Policy, compare, one_step_outputs, one_step_parity, record_one_step
from mjxsac.config import parse_scalar

OPTION_SETS = (
    "",
    "iterations=xml,ls_iterations=xml",
    "faithful=false",
    "iterations=4,ls_iterations=8",
    "integrator=euler",
    "iterations=4,ls_iterations=8,integrator=euler",
)


CRITERION = 1e-6
"""A cap passes when no held-out step's relative observation error exceeds this."""
CAP_LADDER = ("4/4", "8/4", "8/8", "16/16", "xml")
"""Candidate caps, ``iterations/ls_iterations``: each at least the one before it in both,
so the first that passes is the cheapest of them."""
HELD_OUT_SEEDS = tuple(range(1000, 1010))
"""Seeds no test uses."""


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


# ---- the long held-out check of the solver caps ---------------------------------------


def parse_caps(text: str) -> dict:
    """'4/8' -> iterations 4, ls_iterations 8; 'xml' -> the XML's; 'default' -> the task's."""
    if text == "default":
        return {}
    if text == XML:
        return {"iterations": XML, "ls_iterations": XML}
    iterations, ls_iterations = (int(x) for x in text.split("/"))
    return {"iterations": iterations, "ls_iterations": ls_iterations}


def reference_physics(task: str, tolerance: float | None = None) -> PhysicsOptions | None:
    """What the reference runs: Gymnasium's XML, but Newton for Humanoid (MJX has no PGS),
    and the solver's ``tolerance`` if one is given."""
    if task != "Humanoid" and tolerance is None:
        return None
    return PhysicsOptions(solver="newton" if task == "Humanoid" else None, tolerance=tolerance)


def policy_from_run(run: str | Path, noise: float) -> tuple[Policy, str]:
    """A trained policy's mean action plus N(0, noise) in the policy's [-1, 1] units,
    clipped and mapped onto the control range; and a description of it."""
    from mjxsac import normalizer as obs_norm
    from mjxsac.networks import deterministic_action
    from mjxsac.policy import load

    with jax.enable_x64(False):  # the policy as trained: float32
        trainer, params, step, _member = load(run)
    env = trainer.env
    low, high = np.asarray(env.action_low, np.float64), np.asarray(env.action_high, np.float64)

    @jax.jit
    def mean_action(obs):
        normalized = obs_norm.normalize(params["normalizer"], obs)
        return deterministic_action(trainer.actor.apply(params["actor"], normalized)[0])

    def act(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        action = np.asarray(mean_action(np.asarray(obs, np.float32)), np.float64)
        action = np.clip(action + noise * rng.standard_normal(action.shape), -1.0, 1.0)
        return low + (action + 1.0) * 0.5 * (high - low)

    return act, f"policy at step {step} + N(0, {noise:g})"


def held_out_record(
    task: str,
    seeds: tuple[int, ...],
    steps: int,
    policy: Policy | None = None,
    tolerance: float | None = None,
) -> list[GymStep]:
    """``steps`` recorded Gymnasium steps per seed, one seed after the other."""
    record = []
    for seed in seeds:
        record += record_one_step(task, steps, seed, reference_physics(task, tolerance), policy)
    return record


def measure_long(
    task: str, source: str, record: list[GymStep], caps: str, seeds: tuple[int, ...],
    steps: int, batch_size: int = 1000, tolerance: float | None = None,
) -> tuple[dict, np.ndarray, np.ndarray]:  # fmt: skip
    """One-step parity of ``task`` under ``caps`` from every state of ``record``: the
    row, our observations and the per-step relative errors."""
    env = make_env(task, caps, tolerance)
    start = time.perf_counter()
    ours = one_step_outputs(env, record, batch_size)
    diffs = compare(env, ours, record)
    relative = diffs["obs"].max(axis=1) / obs_scale(record)
    worst = np.argsort(relative)[::-1][:5]
    row = {
        "task": task,
        "source": source,
        "reference": "C MuJoCo, Newton" if task == "Humanoid" else "Gymnasium",
        "tolerance": env.mj_model.opt.tolerance,
        "caps": f"{env.physics.iterations} / {env.physics.ls_iterations}",
        "caps_option": caps,
        "is_default": parse_caps(caps) in ({}, dict(envs.env_class(task).solver_defaults)),
        "steps": len(record),
        "terminations": int(sum(r.terminated for r in record)),
        "relative_max": float(relative.max()),
        "above_1e-9": int((relative > 1e-9).sum()),
        "above_1e-6": int((relative > 1e-6).sum()),
        "obs_max": float(diffs["obs"].max()),
        "reward_max": float(diffs["reward"].max()),
        "reward_terms_max": float(max((diffs[k].max() for k in env.metric_names), default=0.0)),
        "termination_mismatches": int(diffs["terminated"].sum()),
        "worst": [
            {"seed": seeds[i // steps], "step": int(i % steps), "relative": float(relative[i])}
            for i in worst
        ],
        "seconds": time.perf_counter() - start,
    }
    return row, ours["obs"], relative


def make_env(task: str, caps: str, tolerance: float | None = None) -> envs.Env:
    """Our ``task`` under ``caps`` (and the solver's ``tolerance``, if given)."""
    return envs.make(
        task, **parse_caps(caps), **({} if tolerance is None else {"tolerance": tolerance})
    )


def obs_scale(record: list[GymStep]) -> np.ndarray:
    """Per step, the largest |observation entry| of Gymnasium's: relative errors divide
    the largest absolute difference of the step by it."""
    return np.maximum(np.abs(np.stack([r.obs for r in record])).max(axis=1), 1e-12)


def passes(row: dict) -> bool:
    """Every step within ``CRITERION`` of Gymnasium, except steps where the XML's own caps
    miss it too (the solver's tolerance, not the caps: C MuJoCo and MJX stop at different
    iterates within it) and this cap's step is within ``CRITERION`` of theirs."""
    return row["above_1e-6"] == row.get("above_1e-6_as_xml", 0)


def choose(rows: list[dict]) -> dict[str, str | None]:
    """Per task, the first caps of the ladder (in the order measured: cheapest first)
    that pass on every source (``passes``); None if none does. A default outside the ladder is
    measured first but not a candidate."""
    chosen: dict[str, str | None] = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task and r["caps_option"] != "default"]
        chosen[task] = None
        for caps in dict.fromkeys(r["caps"] for r in mine):
            if all(passes(r) for r in mine if r["caps"] == caps):
                chosen[task] = caps
                break
    return chosen


def long_table(rows: list[dict]) -> str:
    lines = [
        "| task | states from | caps | steps (terminations) | max relative obs error "
        "| steps > 1e-9 | steps > 1e-6 | of which the XML's caps miss too (cap vs XML's max) "
        "| reward diff max | termination mismatches |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        caps = r["caps"] + (" (default)" if r["is_default"] else "")
        as_xml = "-"
        if r["above_1e-6"]:
            as_xml = str(r["above_1e-6_as_xml"])
            if r.get("vs_xml_max") is not None:
                as_xml += f" ({r['vs_xml_max']:.0e})"
        lines.append(
            f"| {r['task']} | {r['source']} | {caps} | {r['steps']:,} ({r['terminations']}) "
            f"| {r['relative_max']:.1e} | {r['above_1e-9']} | {r['above_1e-6']} | {as_xml} "
            f"| {r['reward_max']:.1e} | {r['termination_mismatches']} |"
        )
    return "\n".join(lines)


def seed_range(text: str) -> tuple[int, ...]:
    """'1000-1009' or '1000,1003'."""
    if "-" in text:
        first, last = (int(x) for x in text.split("-"))
        return tuple(range(first, last + 1))
    return tuple(int(x) for x in text.split(","))


def main_long(args) -> list[dict]:
    seeds = seed_range(args.seeds)
    steps = args.steps or 2000
    rows: list[dict] = []

    def save(more: list[dict]) -> None:  # after each row: an interrupted run keeps its rows
        with open(args.out, "w") as f:
            meta = {"seeds": list(seeds), "steps_per_seed": steps}
            json.dump({**meta, "rows": rows + more}, f, indent=1)

    for task in args.tasks:
        rows += check_task(task, seeds, steps, args, save)
        save([])
    print(long_table(rows))
    print()
    for task, caps in choose(rows).items():
        print(f"{task}: the cheapest caps that pass on every source: {caps}")
    return rows


def check_task(
    task: str, seeds: tuple[int, ...], steps: int, args, save: Callable[[list[dict]], None]
) -> list[dict]:
    """The ladder of caps for one task, cheapest first, up to the first that passes on
    every source (``passes``); the XML's caps are the last rung. Where a cap misses the
    criterion, our step at the XML's caps is computed on the steps it missed."""
    sources: list[tuple[str, Policy | None]] = [("random actions", None)]
    run = Path(args.policies, task) if args.policies else None
    if run is not None and run.exists():
        sources.append(policy_from_run(run, args.policy_noise)[::-1])
    elif run is not None:
        print(f"{task}: no policy run at {run}; random actions only", flush=True)
    records = [
        (label, held_out_record(task, seeds, steps, p, args.tolerance)) for label, p in sources
    ]
    scales = [obs_scale(record) for _, record in records]
    at_xml: list[dict[int, tuple[np.ndarray, float]]] = [{} for _ in records]
    xml_env: list[envs.Env] = []
    default = dict(envs.env_class(task).solver_defaults)
    candidates = [c for c in args.caps if c != XML]
    if not any(parse_caps(c) == default for c in candidates):
        candidates.insert(0, "default")
    rows: list[dict] = []

    def xml_steps(i: int, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Our observations and relative errors at the XML's caps on steps ``where`` of
        source ``i``, each step computed once."""
        todo = [int(j) for j in where if int(j) not in at_xml[i]]
        if todo:
            if not xml_env:  # one env: one compiled program per batch shape
                xml_env.append(make_env(task, XML, args.tolerance))
            record = [records[i][1][j] for j in todo]
            obs = one_step_outputs(xml_env[0], record, args.batch)["obs"]
            gym = np.stack([r.obs for r in record])
            relative = np.abs(obs - gym).max(axis=1) / scales[i][todo]
            at_xml[i].update(zip(todo, zip(obs, relative, strict=True), strict=True))
        pairs = [at_xml[i][int(j)] for j in where]
        return np.stack([o for o, _ in pairs]), np.array([r for _, r in pairs])

    def measure(caps: str) -> list[dict]:
        out = []
        for i, (label, record) in enumerate(records):
            tag = ("random", "policy")[i]
            name = f"{task}-{tag}-{caps.replace('/', '_')}-{seeds[0]}-{seeds[-1]}x{steps}"
            name += "" if args.tolerance is None else f"-tol{args.tolerance:g}"
            name += ".npz"
            cached = Path(args.cache, name) if args.cache else None
            if cached is not None and cached.exists():  # a finished measurement, resumed
                with np.load(cached) as z:
                    row = json.loads(str(z["row"]))
            else:
                row, obs, relative = measure_long(
                    task, label, record, caps, seeds, steps, args.batch, args.tolerance
                )
                missed = np.flatnonzero(relative > CRITERION)
                row["above_1e-6_as_xml"] = 0
                if caps == XML:
                    row["above_1e-6_as_xml"] = len(missed)
                elif len(missed):
                    xml_obs, xml_relative = xml_steps(i, missed)
                    gap = np.abs(obs[missed] - xml_obs).max(axis=1) / scales[i][missed]
                    row["vs_xml_max"] = float(gap.max())
                    row["above_1e-6_as_xml"] = int(
                        ((xml_relative > CRITERION) & (gap <= CRITERION)).sum()
                    )
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(cached, row=json.dumps(row))
            out.append(row)
            print(long_table([row]).splitlines()[-1], flush=True)
            save(rows + out)
        rows.extend(out)
        return out

    for caps in [*candidates, XML]:
        mine = measure(caps)
        if caps != "default" and all(passes(r) for r in mine) and not args.all_caps:
            break  # the dearer caps of the ladder are not needed
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(envs.NAMES), choices=envs.NAMES)
    parser.add_argument("--options", nargs="+", default=list(OPTION_SETS))
    parser.add_argument("--steps", type=int, help="steps (per seed with --long; 200 / 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fidelity.json")
    parser.add_argument(
        "--float32",
        action="store_true",
        help="run ours in float32 (MuJoCo Warp's only precision: compare impl=warp here)",
    )
    long = parser.add_argument_group("the long held-out check of the solver caps (--long)")
    long.add_argument("--long", action="store_true")
    long.add_argument("--caps", nargs="+", default=list(CAP_LADDER), help="cheapest first")
    long.add_argument(
        "--all-caps", action="store_true", help="measure every cap, not only up to a pass"
    )
    long.add_argument("--seeds", default=f"{HELD_OUT_SEEDS[0]}-{HELD_OUT_SEEDS[-1]}")
    long.add_argument("--policies", help="a folder of training runs named by task")
    long.add_argument("--policy-noise", type=float, default=0.1)
    long.add_argument(
        "--tolerance",
        type=float,
        help="the constraint solver's tolerance in both simulators (the XMLs': 1e-8)",
    )
    long.add_argument("--batch", type=int, default=1000, help="states stepped per vmapped call")
    long.add_argument(
        "--cache",
        help="keep each measurement here and reuse it: an interrupted run resumes (clear it "
        "when the code, the policies or the records change)",
    )
    args = parser.parse_args(argv)
    with jax.enable_x64(not args.float32):
        return main_long(args) if args.long else main_short(args)


def main_short(args) -> list[dict]:
    args.steps = args.steps or 200
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
