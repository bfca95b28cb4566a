"""How many constraint-solver and line-search iterations each env really needs, per task.

MJX's ``solve`` runs a ``while_loop`` of up to ``opt.iterations`` Newton/CG iterations,
each with a zoom line search of up to ``opt.ls_iterations`` steps, and returns neither
count. This script (not the hot path) swaps an instrumented copy of ``solve`` into our
physics step while it is traced: the copy carries the iteration count and the largest
line-search count of each solve, and reports them to the host with ``jax.debug.callback``.

Under ``vmap`` each env's counters stop when its own solve converges (a batched
``while_loop`` freezes finished elements), so the records are per-env needs; the batch's
maximum of each solve call (what a batched ``while_loop`` pays) comes from a ``pmax`` over
the vmapped axis. Every solve call is recorded: ``frame_skip`` physics steps per env step,
and four solves per physics step with RK4 (one with Euler).

    python -m launch.solver_iterations --tasks Hopper Ant --envs 64 --steps 64
    python -m launch.solver_iterations --tasks Hopper --checkpoint /tmp/run  # a policy's states

The env runs with caps of 100 / 50 (the XMLs'; Humanoid's asks for 50 / 50), in float32 as in
training, from Gymnasium's reset states; ended episodes restart from fresh reset states.
Actions are uniform random in the control range, or a trained policy's deterministic ones.
Writes a JSON per task and run (quantiles, histograms) and prints a Markdown row.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import mujoco
import numpy as np

import envs

with contextlib.redirect_stdout(io.StringIO()):  # silence MJX's missing-Warp notice
    from mujoco import mjx
    from mujoco.mjx._src import math as mjx_math
    from mujoco.mjx._src import solver as mjx_solver
    from mujoco.mjx._src.types import DisableBit, SolverType

AXIS = "envs"
MEASURE_CAPS = {"iterations": 100, "ls_iterations": 50}
QUANTILES = (50, 99, 99.9, 100)


def instrumented_solve(
    m: mjx.Model, d: mjx.Data, report: Callable[..., None] | None = None
) -> tuple[mjx.Data, jax.Array, jax.Array]:
    """MJX 3.17's ``solver.solve``, line for line, also returning the number of solver
    iterations and the largest number of line-search iterations of any of them.

    The line search is MJX's own ``_linesearch``; its loop (``_while_loop_scan``) is
    wrapped to hand back the final ``ls_iter``, which ``_linesearch`` drops. ``report``,
    if given, is called inside the trace with both counts (per env under ``vmap``)."""
    captured: list[jax.Array] = []
    scan = mjx_solver._while_loop_scan

    def recording_scan(cond_fun, body_fun, init_val, max_iter):
        out = scan(cond_fun, body_fun, init_val, max_iter)
        captured.append(out.ls_iter)
        return out

    def cond(carry) -> jax.Array:
        ctx, _ = carry
        improvement = mjx_solver._rescale(m, d, ctx.prev_cost - ctx.cost)
        gradient = mjx_solver._rescale(m, d, mjx_math.norm(ctx.grad))
        done = ctx.solver_niter >= m.opt.iterations
        done |= improvement < m.opt.tolerance
        done |= gradient < m.opt.tolerance
        return ~done

    def body(carry):
        ctx, ls_max = carry
        with mock.patch.object(mjx_solver, "_while_loop_scan", recording_scan):
            ctx = mjx_solver._linesearch(m, d, ctx)
        ls_max = jnp.maximum(ls_max, jnp.asarray(captured.pop(), ls_max.dtype))
        prev_grad, prev_mgrad = ctx.grad, ctx.Mgrad
        ctx = mjx_solver._update_constraint(m, d, ctx)
        ctx = mjx_solver._update_gradient(m, d, ctx)
        if m.opt.solver == SolverType.NEWTON:
            search = -ctx.Mgrad
        else:  # Polak-Ribiere
            beta = jnp.dot(ctx.grad, ctx.Mgrad - prev_mgrad)
            beta = beta / jnp.maximum(mjx_solver.mujoco.mjMINVAL, jnp.dot(prev_grad, prev_mgrad))
            search = -ctx.Mgrad + jnp.maximum(0, beta) * ctx.search
        return ctx.replace(search=search, solver_niter=ctx.solver_niter + 1), ls_max

    qacc = d.qacc_smooth
    if not m.opt.disableflags & DisableBit.WARMSTART:
        warm = mjx_solver.Context.create(m, d.replace(qacc=d.qacc_warmstart), grad=False)
        smth = mjx_solver.Context.create(m, d.replace(qacc=d.qacc_smooth), grad=False)
        qacc = jnp.where(warm.cost < smth.cost, d.qacc_warmstart, d.qacc_smooth)
    d = d.replace(qacc=qacc)
    ctx = mjx_solver.Context.create(m, d)
    ls_max = jnp.zeros((), jnp.int32)
    if m.opt.iterations == 1:
        ctx, ls_max = body((ctx, ls_max))
    else:
        ctx, ls_max = jax.lax.while_loop(cond, body, (ctx, ls_max))
    niter = jnp.asarray(ctx.solver_niter, jnp.int32)
    if report is not None:
        report(niter, ls_max)
    d = d.tree_replace(
        {"qfrc_constraint": ctx.qfrc_constraint, "qacc": ctx.qacc, "_impl.efc_force": ctx.efc_force}
    )
    return d, niter, ls_max


class Recorder:
    """Host-side records of every solve: the env's own counts and the batch's maxima."""

    def __init__(self):
        self.rows: list[tuple[int, int, int, int]] = []

    def report(self, niter: jax.Array, ls_max: jax.Array) -> None:
        """Inside the traced, vmapped step: one host call per env and solve."""
        batch = (jax.lax.pmax(niter, AXIS), jax.lax.pmax(ls_max, AXIS))
        jax.debug.callback(self._append, niter, ls_max, *batch)

    def _append(self, *values) -> None:
        self.rows.append(tuple(int(v) for v in values))

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Within this block, ``mjx.solve`` (as our physics step calls it) is instrumented."""

        def solve(m, d):
            return instrumented_solve(m, d, self.report)[0]

        with mock.patch.object(mjx, "solve", solve):
            yield

    def summary(self) -> dict:
        rows = np.asarray(self.rows, np.int64).reshape(-1, 4)
        out = {"solves": len(rows)}
        names = ("iterations", "ls_iterations", "batch_iterations", "batch_ls_iterations")
        for i, name in enumerate(names):
            out[name] = {f"p{q:g}": float(np.percentile(rows[:, i], q)) for q in QUANTILES}
            out[name]["mean"] = float(rows[:, i].mean())
            values, counts = np.unique(rows[:, i], return_counts=True)
            out[name]["histogram"] = {int(v): int(c) for v, c in zip(values, counts, strict=True)}
        return out


def policy_actions(checkpoint: str) -> tuple[Callable, str]:
    """A trained policy's deterministic actions (in the control range) and its task."""
    from mjxsac import normalizer as obs_norm
    from mjxsac.networks import deterministic_action
    from mjxsac.policy import load

    trainer, policy, step, _member = load(checkpoint)  # the best member of a population
    env = trainer.env.unwrapped if hasattr(trainer.env, "unwrapped") else trainer.env

    def act(obs, key):
        del key
        mean, _ = trainer.actor.apply(
            policy["actor"], obs_norm.normalize(policy["normalizer"], obs)
        )
        return envs.scale_action(env, deterministic_action(mean))

    return act, f"{trainer.config.env} policy at step {step}"


def measure(
    task: str, num_envs: int, steps: int, seed: int = 0, checkpoint: str | None = None
) -> dict:
    """Roll ``num_envs`` envs for ``steps`` env steps and record every solve."""
    env = envs.make(task, **MEASURE_CAPS)
    recorder = Recorder()
    if checkpoint is None:
        low, high = jnp.asarray(env.action_low), jnp.asarray(env.action_high)

        def act(obs, key):
            return jax.random.uniform(key, (env.action_size,), obs.dtype, low, high)

        source = "uniform random actions"
    else:
        act, source = policy_actions(checkpoint)

    def step_one(state, key):
        return env.step(state, act(state.obs, key))

    step = jax.jit(jax.vmap(step_one, axis_name=AXIS))
    reset = jax.jit(jax.vmap(env.reset))

    @jax.jit
    def restart(state, fresh):
        done = state.terminated | (state.steps >= env.episode_length)

        def pick(new, old):
            return jnp.where(done.reshape(done.shape + (1,) * (old.ndim - 1)), new, old)

        return jax.tree.map(pick, fresh, state)

    key = jax.random.key(seed)
    key, k = jax.random.split(key)
    state = reset(jax.random.split(k, num_envs))
    with recorder.tracing():
        step = step.lower(state, jax.random.split(key, num_envs)).compile()  # traced patched
    start = time.perf_counter()
    episodes_ended = 0
    for _ in range(steps):
        key, k_act, k_reset = jax.random.split(key, 3)
        state = step(state, jax.random.split(k_act, num_envs))
        ended = state.terminated | (state.steps >= env.episode_length)
        episodes_ended += int(ended.sum())
        state = restart(state, reset(jax.random.split(k_reset, num_envs)))
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    rk4 = env.mj_model.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4
    solves_per_step = env.frame_skip * (4 if rk4 else 1)
    out = {
        "task": task,
        "source": source,
        "num_envs": num_envs,
        "env_steps": num_envs * steps,
        "solves_per_env_step": solves_per_step,
        "episodes_ended": episodes_ended,
        "seconds": seconds,
        "dtype": str(state.obs.dtype),
        **recorder.summary(),
    }
    expected = num_envs * steps * solves_per_step
    if out["solves"] != expected:
        raise RuntimeError(f"recorded {out['solves']} solves, expected {expected}")
    return out


def row(r: dict) -> str:
    it, ls = r["iterations"], r["ls_iterations"]
    bit, bls = r["batch_iterations"], r["batch_ls_iterations"]
    q = lambda d: " / ".join(f"{d[k]:g}" for k in ("p50", "p99", "p99.9", "p100"))  # noqa: E731
    return (
        f"| {r['task']} | {r['source']} | {r['env_steps']} ({r['solves']} solves) "
        f"| {it['mean']:.2f} | {q(it)} | {q(ls)} | {bit['mean']:.1f} / {bit['p100']:g} "
        f"| {bls['mean']:.1f} / {bls['p100']:g} |"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(envs.NAMES), choices=envs.NAMES)
    parser.add_argument("--envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64, help="env steps per env")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="a run directory or checkpoint: its policy acts")
    parser.add_argument("--out", default="solver_iterations.json")
    parser.add_argument("--float64", action="store_true", help="as the parity harness runs")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", args.float64)
    rows = []
    tasks = args.tasks
    if args.checkpoint:  # the policy's own task
        from mjxsac.policy import load

        tasks = [load(args.checkpoint)[0].config.env]
    for task in tasks:
        rows.append(measure(task, args.envs, args.steps, args.seed, args.checkpoint))
        print(row(rows[-1]), flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
