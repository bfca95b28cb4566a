"""``mjxsac-train``: one command for a training run.

    mjxsac-train --env HalfCheetah [--preset parallel] [--algo sac-v2] [--seed 0]
                 [--steps N] [any Config field, e.g. --batch-size 512]
    mjxsac-train --resume runs/<run> [--total-steps N]
    mjxsac-train ... --dry-run       # check and print the resolved config; compile and
                                     # write nothing
    mjxsac-train ... --debug         # show tracebacks instead of one-line errors
    mjxsac-train ... --compile-cache {default,off,PATH}
                                     # JAX's persistent compilation cache (default:
                                     # $XDG_CACHE_HOME/mjxsac/jax, else ~/.cache/mjxsac/jax)

Presets (``mjxsac/presets.py``) supply the defaults for the task; fields given on the
command line win. Without ``--preset`` a machine with an accelerator gets ``parallel``
and a CPU-only machine gets ``cpu``, a small budget that finishes in minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mjxsac import compile_cache, distributed, policy, render
from mjxsac.ahead import compile_ahead
from mjxsac.checkpoint import Checkpoints, check_compatible
from mjxsac.cli import (
    UserError,
    debug_requested,
    one_line_errors,
    quiet_libraries,
    quoted,
    write,
)
from mjxsac.config import ALGOS, RESUMABLE, Config
from mjxsac.memory import check_memory
from mjxsac.runlog import (
    FollowerRunDir,
    Progress,
    RunDir,
    WandbLog,
    chunk_summaries,
    default_run_dir,
)
from mjxsac.sac import Trainer, TrainState, describe_mesh, env_steps, run_devices, update_count


class NonFiniteError(UserError):
    """A loss or a parameter became NaN or infinite."""


class Stopped(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived; the state was checkpointed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """The first SIGINT/SIGTERM/SIGHUP, as the training loop sees it: honoured after the
    running chunk (a checkpoint is saved, then the run exits)."""

    def __init__(self) -> None:
        self.signums: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.signums)


def train(
    trainer: Trainer,
    run: RunDir,
    state: TrainState | None = None,
    progress: Progress | None = None,
    wandb_log: WandbLog | None = None,
    stop: StopRequest | None = None,
) -> TrainState:
    """Train to ``total_steps``: chunk, check, evaluate, log, checkpoint. ``state`` (from a
    checkpoint) resumes; otherwise a fresh state is made from the seed. ``stop`` (set by a
    signal) ends the run with a checkpoint after the running chunk."""
    c = trainer.run_config
    members = trainer.population_size
    stop = StopRequest() if stop is None else stop
    total = c.num_chunks * c.env_steps_per_chunk
    label = f"{c.env} {c.algo}" + (f" x{members}" if members > 1 else "")
    # Over several processes, process 0 alone speaks.
    progress = progress or Progress(total, label, None if distributed.primary() else io.StringIO())
    run.path.mkdir(parents=True, exist_ok=True)
    if members > 1:
        write(run.write_population, trainer.run_config, what="writing population.json")
    ckpt = Checkpoints(run.checkpoints, keep=c.keep_checkpoints)
    state = trainer.init() if state is None else state
    first_chunk = env_steps(state) // c.env_steps_per_chunk
    updates_before = update_count(state)
    last_saved = ckpt.manager.latest_step()
    start = time.monotonic()
    evaluate = None  # set at the first chunk
    progress.message(
        f"run directory {run.path} | {members} member{'s' * (members > 1)} x {c.num_envs} "
        f"envs x {c.steps_per_chunk} steps per chunk, chunks {first_chunk + 1}..{c.num_chunks}"
        f" | {describe_mesh(trainer.mesh, members)}"
    )
    try:
        for chunk in range(first_chunk, c.num_chunks):
            t0 = time.monotonic()
            state, metrics = trainer.train_chunk(state)
            if evaluate is None:  # the chunk runs; compile evaluation meanwhile
                args = (state.actor, state.normalizer, trainer.eval_keys(0))
                evaluate = compile_ahead(trainer.trace_evaluate, trainer.run_evaluation, *args)
            metrics = distributed.to_host(metrics)  # reading the metrics waits for the chunk
            rows = chunk_summaries(metrics)
            seconds = time.monotonic() - t0
            check_finite(metrics, state, chunk, c, last_saved)
            # A failed asynchronous save (e.g. a full disk) stops the run here.
            write(ckpt.check_for_errors, what="saving a checkpoint")
            base = {
                "chunk": chunk,
                "env_steps": env_steps(state),
                "updates": update_count(state),
                "wall_s": round(time.monotonic() - start, 3),
                "chunk_s": round(seconds, 3),
            }
            rows = [{**base, **row} for row in rows]
            overflows = sum(row.get("train/physics_overflows", 0.0) for row in rows)
            if overflows:  # sized from the batch, so not expected: never silent
                progress.message(
                    f"warning: {overflows:.0f} env steps of chunk {chunk + 1} overflowed MuJoCo "
                    "Warp's contact or constraint budget (contacts were dropped)"
                )
            last = chunk + 1 == c.num_chunks
            eval_returns = None
            if (chunk + 1) % c.eval_every == 0 or last:
                keys = trainer.eval_keys(chunk)
                returns, lengths = distributed.to_host(
                    evaluate(state.actor, state.normalizer, keys)
                )
                eval_returns = [float(r) for r in returns.mean(axis=1)]
                for row, member_returns, member_lengths in zip(rows, returns, lengths, strict=True):
                    row |= {
                        "eval/return_mean": float(member_returns.mean()),
                        "eval/return_std": float(member_returns.std()),
                        "eval/length_mean": float(member_lengths.mean()),
                    }
            summary = rows[0] if members == 1 else population_summary(base, rows)
            write(run.append_metrics, summary, what="writing metrics.jsonl")
            if members > 1:
                for k, row in enumerate(rows):
                    write(run.append_metrics, row, k, what=f"writing member {k}'s metrics")
            if wandb_log:
                wandb_log.log(summary, rows)
            if eval_returns is not None:
                title = f"{c.env} {c.algo}" + (f" seed {c.seed}" if members == 1 else "")
                write(run.plot, title, trainer.run_config, what="writing the plot")
            # Read once (a later signal waits for the next chunk), and by every process alike.
            stopping = distributed.any_process(bool(stop))
            if (chunk + 1) % c.checkpoint_every == 0 or last or stopping:
                last_saved = write(
                    ckpt.save, state, c, c.save_buffer, eval_returns, what="saving a checkpoint"
                )
            # The updates this chunk made (none in the warm-up), not the configured rate.
            made, updates_before = base["updates"] - updates_before, base["updates"]
            progress.update(
                base["env_steps"],
                c.env_steps_per_chunk / seconds,
                made / seconds,
                time.monotonic() - start,
                eval_returns,
            )
            if stopping:
                ckpt.wait()
                raise Stopped(stop.signums[0] if stop else signal.SIGTERM)  # another process's
    except BaseException:
        # Let pending asynchronous saves complete (a good checkpoint stays good), without
        # letting a failing save hide the first error.
        with contextlib.suppress(Exception):
            ckpt.close()
        raise
    write(ckpt.close, what="finishing the last checkpoint")
    progress.message(f"done in {time.monotonic() - start:.0f}s; run directory {run.path}")
    where = quoted(run.path)
    progress.message(f"next: mjxsac-eval {where} [--gymnasium], mjxsac-render {where}, "
                     f"mjxsac-export {where} --onnx policy.onnx")  # fmt: skip
    return state


def population_summary(base: dict, rows: list[dict]) -> dict:
    """The population's row of ``metrics.jsonl``: the mean over members of every metric
    (``eval/return_mean`` is what sweeps maximize) and the best, median and worst member's
    eval return."""
    summary = dict(base)
    keys = [k for k in rows[0] if k not in base]
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if len(values) == len(rows):
            summary[key] = float(np.mean(values))
    if "eval/return_mean" in rows[0]:
        returns = [r["eval/return_mean"] for r in rows]
        summary |= {
            "eval/return_best": float(np.max(returns)),
            "eval/return_median": float(np.median(returns)),
            "eval/return_worst": float(np.min(returns)),
            "eval/best_member": int(np.argmax(returns)),
        }
    return summary


@jax.jit
def _non_finite_parameters(state: TrainState) -> dict[str, jax.Array]:
    """Per group of parameters, which members hold a NaN or infinity (member,)."""
    groups = {
        "actor parameters": state.actor,
        "critic parameters": state.critic,
        "target critic parameters": state.target_critic,
        "V parameters": state.value,
        "log_alpha": state.log_alpha,
    }

    def bad(x: jax.Array) -> jax.Array:
        return ~jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)

    return {
        name: jnp.any(jnp.stack([bad(x) for x in leaves]), axis=0)
        for name, tree in groups.items()
        if (leaves := jax.tree.leaves(tree))
    }


def check_finite(metrics: dict, state: TrainState, chunk: int, c: Config, saved) -> None:
    """Stop with a message naming the quantity, the env step (and in a population the
    member) if anything went NaN/inf. Metrics are stacked (train step, member)."""
    first_step = chunk * c.env_steps_per_chunk
    for name, values in metrics.items():
        values = np.asarray(values).reshape(np.shape(values)[0], -1)
        bad = ~np.isfinite(values)
        if bad.any():
            step, member = np.unravel_index(int(np.argmax(bad)), bad.shape)
            at = first_step + (int(step) + 1) * c.num_envs
            _raise_non_finite(name, at, saved, int(member), values.shape[1])
    for name, bad in distributed.to_host(_non_finite_parameters(state)).items():
        if bad.any():
            at = first_step + c.env_steps_per_chunk
            _raise_non_finite(name, at, saved, int(np.argmax(bad)), len(bad))


def _raise_non_finite(name: str, step: int, saved, member: int = 0, members: int = 1) -> None:
    kept = "no checkpoint was written yet" if saved is None else f"checkpoint {saved} is intact"
    who = f" of member {member}" if members > 1 else ""
    raise NonFiniteError(
        f"non-finite {name}{who} at env step {step:,}: training stopped, nothing saved; {kept}"
    )


# ---- the command line ----------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[Config, Path | None, bool]:
    """Presets first, then the command line. ``--env/--algo/--preset`` pick the preset;
    every ``Config`` field can be overridden (``--batch-size 512`` or ``--batch_size=512``).
    With ``--resume RUN_DIR`` the run's own config is the base instead."""
    import tyro

    from mjxsac import presets

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env", default=Config.env)
    pre.add_argument("--algo", default=Config.algo)
    pre.add_argument("--preset", default="auto")
    pre.add_argument("--steps", type=int)
    pre.add_argument("--resume")
    pre.add_argument("--dry-run", action="store_true")
    pre.add_argument("--debug", action="store_true")
    pre.add_argument("--vary", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    if known.algo not in ALGOS:  # before tyro, which would warn about its Literal type
        raise ValueError(f"unknown algo {known.algo!r}; valid: {', '.join(ALGOS)}")
    if known.vary:  # repeatable here; tyro takes the values after one flag
        rest = [*rest, "--vary", *known.vary]
    if known.steps is not None:
        rest = [*rest, "--total-steps", str(known.steps)]
    if known.resume:
        run_dir = Path(known.resume)
        given = [a.split("=")[0] for a in argv if a.startswith("--")]
        if "--preset" in given:
            raise UserError(
                "--preset cannot be combined with --resume: a resumed run keeps its own "
                "config; override single fields instead (e.g. --total-steps)"
            )
        ckpt = Checkpoints(run_dir / "checkpoints", read_only=True, prog="mjxsac-train")
        step, saved = ckpt.newest_config()
        for flag in ("--env", "--algo"):
            if flag in given:
                rest = [*rest, flag, getattr(known, flag[2:])]
        config = tyro.cli(Config, default=saved, args=rest, description=__doc__, prog=PROG)
        if {"--run-dir", "--run_dir"} & set(given) and not _same_path(config.run_dir, run_dir):
            raise UserError(
                f"--run-dir cannot be combined with --resume: the run continues in its own "
                f"directory {run_dir} (to continue a copy, copy the directory and resume it)"
            )
        config = Config.from_dict({**config.to_dict(), "run_dir": str(run_dir)})
        check_compatible(saved, config)
        check_resume(run_dir, step, saved, config)
        return config, run_dir, known.dry_run
    preset = known.preset
    if preset == "auto":
        preset = "cpu" if jax.default_backend() == "cpu" else "parallel"
    base = presets.config_for(known.env, known.algo, preset)
    cli_args = ["--env", known.env, "--algo", known.algo, "--preset", preset, *rest]
    config = tyro.cli(Config, default=base, args=cli_args, description=__doc__, prog=PROG)
    return config, None, known.dry_run


PROG = "mjxsac-train"


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_resume(run_dir: Path, step: int, saved: Config, config: Config) -> None:
    """What a resume can apply, checked before anything is changed: a total beyond the
    steps already done, and a ``config.json`` that still is the checkpoint's (a hand edit
    of a field the resume cannot change is refused; one it would overwrite is named).
    The fields the resume changes are named."""
    planned = config.num_chunks * config.env_steps_per_chunk
    if planned < step:
        raise UserError(
            f"total_steps {config.total_steps:,} is below the {step:,} env steps the run has "
            f"done: a resume trains on to a larger total (without --total-steps it keeps "
            f"{saved.total_steps:,})"
        )
    old, new = saved.to_dict(), config.to_dict()
    path = run_dir / "config.json"
    if path.exists():
        try:
            written = Config.from_saved(json.loads(path.read_text())).to_dict()
        except (ValueError, TypeError) as e:
            raise UserError(
                f"{path} is not the run's config ({' '.join(str(e).split())[:120]}): restore "
                "it, or delete it and the resume writes it anew from the checkpoint (nothing "
                "was changed)"
            ) from None
        edited = [k for k in old if k != "run_dir" and written[k] != old[k]]
        shape = [k for k in edited if k not in RESUMABLE]
        if shape:
            details = ", ".join(f"{k}: {written[k]!r} there, {old[k]!r} in the checkpoint"
                                for k in shape)  # fmt: skip
            raise UserError(
                f"{path} does not match the checkpoint ({details}): a resume continues the "
                "checkpoint's run and cannot change these; restore config.json, or delete it "
                "and the resume writes it anew (nothing was changed)"
            )
        ignored = [k for k in edited if new[k] == old[k]]  # not given on the command line
        if ignored:
            details = ", ".join(f"{k} {written[k]!r}" for k in ignored)
            flags = " ".join(f"--{k.replace('_', '-')} {written[k]}" for k in ignored)
            print(f"mjxsac-train: {path} holds {details}, which the checkpoint does not: "
                  f"resuming with the checkpoint's (give {flags} to change it)",
                  file=sys.stderr)  # fmt: skip
    changed = [k for k in old if k != "run_dir" and new[k] != old[k]]
    if changed:
        details = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed)
        print(f"mjxsac-train: the resume changes {details}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """The command: set up (config, run directory, resume), then train in a worker thread
    while this thread answers signals at once."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries(debug_requested(argv))
    wandb_log = None
    run = None
    scratch = None  # a dry run's wandb files go to a temporary directory
    code: int | str = 0
    try:
        with one_line_errors(PROG, debug_requested(argv)):
            try:
                cache_setting, argv = compile_cache.option(argv)  # first: before compiling
                hosts, argv = distributed.option(argv)
                processes = join(hosts)
                primary = distributed.primary()
                cache_dir = compile_cache.configure_for(PROG, cache_setting)
                tally = compile_cache.Tally()
                config, resume, dry_run = parse_args(argv)
                if processes > 1 and not (resume or config.run_dir):
                    raise UserError(
                        f"a run over {processes} processes needs --run-dir (one directory "
                        "that every host reaches), or --resume"
                    )
                if not resume and config.run_dir and primary:  # before wandb writes into it
                    RunDir(config.run_dir).check_new()
                if config.wandb and primary:  # a sweep agent's values arrive through run.config
                    if dry_run:
                        scratch = tempfile.TemporaryDirectory(prefix="mjxsac-dry-run-")
                    directory = Path(scratch.name) if scratch else None
                    wandb_log, config = WandbLog.start(config, directory)
                config = config.validate().check_run()
                if not config.run_dir:
                    run_dir = str(default_run_dir(config))
                    config = Config.from_dict({**config.to_dict(), "run_dir": run_dir})
                trainer = Trainer(config, run_devices(config.devices))
                memory = check_memory(trainer)
                if dry_run:  # the resolved config, shown; nothing compiled or written
                    dry = RunDir(config.run_dir)
                    if not resume:
                        dry.check_new()
                    dry.check_free()
                    print(json.dumps(config.to_dict(), indent=1))
                    place = describe_mesh(trainer.mesh, trainer.population_size)
                    print(f"mjxsac-train: dry run, nothing written; {place}; {memory}")
                    return
                run = RunDir(config.run_dir) if primary else FollowerRunDir(config.run_dir)
                notice = run.claim(resume=resume is not None)
                if notice:
                    print(f"mjxsac-train: {notice}", file=sys.stderr)
                state = restore(run, trainer) if resume else None
                run.write_config(config)
            except KeyboardInterrupt:
                raise UserError("interrupted before training started; nothing trained") from None
            if wandb_log:
                wandb_log.attach(run)
            if jax.default_backend() == "cpu" and primary:
                print("mjxsac-train: no accelerator found, running on the CPU", file=sys.stderr)
            code = run_with_signals(trainer, run, state, wandb_log, debug_requested(argv))
            if primary:
                print(f"mjxsac-train: {tally.summary(cache_dir)}", file=sys.stderr)
    except SystemExit as e:
        code = e.code if e.code is not None else 0
    finally:
        if wandb_log:
            wandb_log.finish(0 if code == 0 else 1)
        if scratch is not None:
            scratch.cleanup()
        if run is not None:
            run.release()
    if code:
        sys.exit(code)


def restore(run: RunDir, trainer: Trainer) -> TrainState:
    """The newest checkpoint that restores; damaged newer ones are named and set aside."""
    ckpt = Checkpoints(run.checkpoints, read_only=True, prog=PROG)
    state = trainer.set_data(ckpt.restore(trainer))  # this config's rates, gamma, ...
    step = env_steps(state)
    if isinstance(run, FollowerRunDir):
        return state  # process 0 tidies the run directory and speaks
    for moved in ckpt.set_aside(newer_than=step):
        print(f"mjxsac-train: moved the unusable checkpoint to {moved}", file=sys.stderr)
    run.truncate_metrics(step)
    print(f"mjxsac-train: resuming {run.path} at env step {step:,}")
    return state


def join(hosts: dict[str, str]) -> int:
    """Join the run's other processes (``mjxsac.distributed``); the process count."""
    try:
        return distributed.initialize(hosts)
    except ValueError:
        raise
    except Exception as e:  # the coordinator unreachable, a process missing, ...
        where = hosts.get("coordinator", "the cluster's coordinator")
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"could not join the other processes at {where}: {reason}") from None


class SignalHandler:
    """The main thread's answer to SIGINT, SIGTERM and SIGHUP (a dropped ssh session).
    The first asks for a checkpoint after the running chunk and says so; a later one ends
    the process at once, keeping the last complete checkpoint. The same SIGTERM or SIGHUP
    again within ``REPEAT_S`` is the same request (``timeout`` and batch schedulers signal
    the process and its process group); a second Ctrl-C always stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    REPEAT_S = 1.0

    def __init__(self, stop: StopRequest, run: RunDir, exit=os._exit, clock=time.monotonic):
        self.stop, self.run, self.exit, self.clock = stop, run, exit, clock
        self.first_at = -float("inf")

    def __call__(self, signum: int, frame=None) -> None:
        name = signal.Signals(signum).name
        now = self.clock()
        if not self.stop:
            self.stop.signums.append(signum)
            self.first_at = now
            say(f"\nmjxsac-train: {name} received: finishing the running chunk, then saving a "
                "checkpoint and exiting (send it again to stop at once, keeping the last "
                "complete checkpoint)")  # fmt: skip
            return
        repeat = signum == self.stop.signums[0] and signum != signal.SIGINT
        if repeat and now - self.first_at < self.REPEAT_S:
            return  # the first request, delivered twice
        say(f"\nmjxsac-train: second signal ({name}): stopping now; {self.kept()}")
        self.run.release()
        self.exit(128 + signum)

    def kept(self) -> str:
        if Checkpoints.exist(self.run.checkpoints):
            return (f"the last complete checkpoint in {self.run.checkpoints} is kept. Continue "
                    f"with: mjxsac-train --resume {quoted(self.run.path)}")  # fmt: skip
        if self.run.holds_run():
            return ("no checkpoint was saved yet, so the run cannot be resumed: start it anew "
                    "with another --run-dir")  # fmt: skip
        return ("no checkpoint was saved yet, so there is nothing to resume: start the run "
                "again (the same command)")  # fmt: skip


def say(text: str) -> None:
    """A line on stderr that a terminal gone away (SIGHUP) cannot turn into an error."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


def run_with_signals(trainer: Trainer, run: RunDir, state: TrainState | None,
                     wandb_log: WandbLog | None, debug: bool = False) -> int | str:  # fmt: skip
    """Train in a worker thread; this (main) thread handles SIGINT/SIGTERM/SIGHUP at once,
    even while XLA compiles (``SignalHandler``). Returns the exit code (or the one-line
    message of a failure)."""
    stop = StopRequest()
    outcome: dict = {}

    def work() -> None:
        try:
            train(trainer, run, state, wandb_log=wandb_log, stop=stop)
            if wandb_log:
                video, member = render_final_video(run)
                if video:
                    wandb_log.log_video(video, member)
        except BaseException as e:
            outcome["error"] = e

    worker = threading.Thread(target=work, name="mjxsac-train", daemon=True)
    handler = SignalHandler(stop, run)
    previous = {s: signal.signal(s, handler) for s in SignalHandler.SIGNALS}
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    error = outcome.get("error")
    if error is None:
        return 0
    if isinstance(error, Stopped):
        say(f"\nmjxsac-train: stopped by {error}; checkpoint saved in {run.checkpoints}. "
            f"Continue with: mjxsac-train --resume {quoted(run.path)}")  # fmt: skip
        return 128 + error.signum
    if isinstance(error, UserError) and not debug:
        hint = ""
        if not isinstance(error, NonFiniteError) and Checkpoints.exist(run.checkpoints):
            hint = ("; the last complete checkpoint is kept: then mjxsac-train --resume "
                    f"{quoted(run.path)}")  # fmt: skip
        return f"mjxsac-train: {error}{hint}"
    raise error


def render_final_video(run: RunDir) -> tuple[Path | None, int]:
    """The final policy's video (the best member's in a population) for wandb; a machine
    without a headless GL gets a warning, not a failed run."""
    try:
        member = policy.load(run.path, prog="mjxsac-train").member
        return render.render_run(run.path, run.path / "final.mp4", member=member), member
    except Exception as e:  # rendering is a bonus: never lose the run over it
        print(f"mjxsac-train: no final video ({type(e).__name__}: {e})", file=sys.stderr)
        return None, 0


if __name__ == "__main__":
    main()
