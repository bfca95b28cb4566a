"""``mjxsac-train``: one command for a training run.

    mjxsac-train --env HalfCheetah [--preset parallel] [--algo sac-v2] [--seed 0]
                 [--steps N] [any Config field, e.g. --batch-size 512]
    mjxsac-train --resume runs/<run> [--total-steps N]

Presets (``launch/presets.py``) supply the defaults for the task; fields given on the
command line win. Without ``--preset`` a machine with an accelerator gets ``parallel``
and a CPU-only machine gets ``cpu``, a small budget that finishes in minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mjxsac.checkpoint import CheckpointError, Checkpoints, check_compatible
from mjxsac.config import Config
from mjxsac.runlog import Progress, RunDir, WandbLog, default_run_dir
from mjxsac.sac import (
    Trainer,
    TrainState,
    check_memory,
    chunk_summary,
    default_device,
    seed_key,
)


class NonFiniteError(RuntimeError):
    """A loss or a parameter became NaN or infinite."""


class Stopped(Exception):
    """SIGINT or SIGTERM arrived; the state was checkpointed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM into a request, honoured after the running chunk; a
    second one interrupts at once."""
    received: list[int] = []
    previous = {}

    def handler(signum, frame):
        if received:
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
        received.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def train(
    trainer: Trainer,
    run: RunDir,
    state: TrainState | None = None,
    progress: Progress | None = None,
    wandb_log: WandbLog | None = None,
) -> TrainState:
    """Train to ``total_steps``: chunk, check, evaluate, log, checkpoint. ``state`` (from a
    checkpoint) resumes; otherwise a fresh state is made from the seed."""
    c = trainer.config
    total = c.num_chunks * c.env_steps_per_chunk
    progress = progress or Progress(total, f"{c.env} {c.algo}")
    ckpt = Checkpoints(run.checkpoints, keep=c.keep_checkpoints)
    state = trainer.init(seed_key(c.seed)) if state is None else state
    first_chunk = int(state.env_steps) // c.env_steps_per_chunk
    last_saved = ckpt.manager.latest_step()
    eval_key = jax.random.fold_in(seed_key(c.seed), 1)
    start = time.monotonic()
    progress.message(
        f"run directory {run.path} | {c.num_envs} envs x {c.steps_per_chunk} steps per chunk,"
        f" chunks {first_chunk + 1}..{c.num_chunks} | device {default_device()}"
    )
    try:
        with stop_on_signals() as signals:
            for chunk in range(first_chunk, c.num_chunks):
                t0 = time.monotonic()
                state, metrics = trainer.train_chunk(state)
                row = chunk_summary(metrics)  # reading the metrics waits for the chunk
                seconds = time.monotonic() - t0
                check_finite(metrics, state, chunk, c, last_saved)
                row = {
                    "chunk": chunk,
                    "env_steps": int(state.env_steps),
                    "updates": int(state.updates),
                    "wall_s": round(time.monotonic() - start, 3),
                    "chunk_s": round(seconds, 3),
                    **row,
                }
                last = chunk + 1 == c.num_chunks
                eval_return = None
                if (chunk + 1) % c.eval_every == 0 or last:
                    returns, lengths = trainer.evaluate(
                        state.actor, state.normalizer, jax.random.fold_in(eval_key, chunk)
                    )
                    eval_return = float(np.mean(returns))
                    row |= {
                        "eval/return_mean": eval_return,
                        "eval/return_std": float(np.std(returns)),
                        "eval/length_mean": float(np.mean(lengths)),
                    }
                run.append_metrics(row)
                if wandb_log:
                    wandb_log.log(row)
                if eval_return is not None:
                    run.plot(f"{c.env} {c.algo} seed {c.seed}")
                stop = bool(signals)  # read once: a later signal waits for the next chunk
                if (chunk + 1) % c.checkpoint_every == 0 or last or stop:
                    last_saved = ckpt.save(state, c, c.save_buffer, eval_return)
                progress.update(
                    row["env_steps"],
                    c.env_steps_per_chunk / seconds,
                    c.updates_per_step * c.steps_per_chunk / seconds,
                    time.monotonic() - start,
                    eval_return,
                )
                if stop:
                    ckpt.wait()
                    raise Stopped(signals[0])
    finally:
        ckpt.close()  # waits for pending asynchronous saves: a good checkpoint completes
    progress.message(f"done in {time.monotonic() - start:.0f}s; run directory {run.path}")
    return state


@jax.jit
def _non_finite_parameters(state: TrainState) -> dict[str, jax.Array]:
    groups = {
        "actor parameters": state.actor,
        "critic parameters": state.critic,
        "target critic parameters": state.target_critic,
        "V parameters": state.value,
        "log_alpha": state.log_alpha,
    }
    return {
        name: jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))
        for name, tree in groups.items()
        if (leaves := jax.tree.leaves(tree))
    }


def check_finite(metrics: dict, state: TrainState, chunk: int, c: Config, saved) -> None:
    """Stop with a message naming the quantity and the env step if anything went NaN/inf."""
    first_step = chunk * c.env_steps_per_chunk
    for name, values in metrics.items():
        values = np.asarray(values)
        bad = ~np.isfinite(values)
        if bad.any():
            step = first_step + (int(np.argmax(bad)) + 1) * c.num_envs
            _raise_non_finite(name, step, saved)
    for name, bad in _non_finite_parameters(state).items():
        if bool(bad):
            _raise_non_finite(name, first_step + c.env_steps_per_chunk, saved)


def _raise_non_finite(name: str, step: int, saved) -> None:
    kept = "no checkpoint was written yet" if saved is None else f"checkpoint {saved} is intact"
    raise NonFiniteError(
        f"non-finite {name} at env step {step:,}: training stopped, nothing saved; {kept}"
    )


# ---- the command line ----------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[Config, Path | None, bool]:
    """Presets first, then the command line. ``--env/--algo/--preset`` pick the preset;
    every ``Config`` field can be overridden (``--batch-size 512`` or ``--batch_size=512``).
    With ``--resume RUN_DIR`` the run's own config is the base instead."""
    import tyro

    from launch import presets

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env", default=Config.env)
    pre.add_argument("--algo", default=Config.algo)
    pre.add_argument("--preset", default="auto")
    pre.add_argument("--steps", type=int)
    pre.add_argument("--resume")
    pre.add_argument("--dry-run", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.steps is not None:
        rest = [*rest, "--total-steps", str(known.steps)]
    if known.resume:
        run_dir = Path(known.resume)
        saved = Checkpoints(run_dir / "checkpoints", read_only=True).config()
        given = [a for a in argv if a.startswith("--")]
        for flag in ("--env", "--algo", "--preset"):
            if flag in given:
                rest = [*rest, flag, getattr(known, flag[2:])]
        config = tyro.cli(Config, default=saved, args=rest, description=__doc__)
        config = Config.from_dict({**config.to_dict(), "run_dir": str(run_dir)})
        check_compatible(saved, config)
        return config, run_dir, known.dry_run
    preset = known.preset
    if preset == "auto":
        preset = "cpu" if jax.default_backend() == "cpu" else "parallel"
    base = presets.config_for(known.env, known.algo, preset)
    cli_args = ["--env", known.env, "--algo", known.algo, "--preset", preset, *rest]
    config = tyro.cli(Config, default=base, args=cli_args, description=__doc__)
    return config, None, known.dry_run


def quiet_libraries() -> None:
    """Orbax and friends log routine notices through absl at WARNING; keep errors only."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    wandb_log = None
    try:
        config, resume, dry_run = parse_args(argv)
        if config.wandb:  # a sweep agent's values arrive through run.config
            wandb_log, config = WandbLog.start(config)
        config = config.validate()
        if not config.run_dir:
            config = Config.from_dict({**config.to_dict(), "run_dir": str(default_run_dir(config))})
        trainer = Trainer(config)
        memory = check_memory(trainer, refuse=not dry_run)
        run = RunDir(config.run_dir)
        if dry_run:  # the resolved config, written and shown; nothing compiled or trained
            run.write_config(config)
            print(json.dumps(config.to_dict(), indent=1))
            print(f"mjxsac-train: dry run; {memory}")
            if wandb_log:
                wandb_log.finish(0)
            return
        state = None
        if resume:
            ckpt = Checkpoints(run.checkpoints, read_only=True)
            state = ckpt.restore(trainer)
            run.truncate_metrics(int(state.env_steps))
            print(f"mjxsac-train: resuming {run.path} at env step {int(state.env_steps):,}")
    except (ValueError, MemoryError, CheckpointError, FileNotFoundError) as e:
        if wandb_log:
            wandb_log.finish(1)
        sys.exit(f"mjxsac-train: {e}")
    run.write_config(config)
    if wandb_log:
        wandb_log.attach(run)
    if jax.default_backend() == "cpu":
        print("mjxsac-train: no accelerator found, running on the CPU", file=sys.stderr)
    code = 0
    try:
        state = train(trainer, run, state, wandb_log=wandb_log)
        if wandb_log:
            wandb_log.final_video(run)
    except NonFiniteError as e:
        code = f"mjxsac-train: {e}"
    except Stopped as e:
        print(f"\nmjxsac-train: {e} received; checkpoint saved in {run.checkpoints}. "
              f"Continue with: mjxsac-train --resume {run.path}", file=sys.stderr)  # fmt: skip
        code = 128 + e.signum
    finally:
        if wandb_log:
            wandb_log.finish(0 if code == 0 else 1)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
