"""Orbax checkpoints of the whole ``TrainState``, restorable on any device.

Each checkpoint step holds four items:

* ``state``: the TrainState (parameters, target parameters, optimizer states, log_alpha,
  normalizer, env states, keys, counters), with the replay buffer only under
  ``save_buffer``;
* ``policy``: the actor parameters and the normalizer alone, what rendering needs;
* ``config``: the resolved run config (JSON);
* ``meta``: env steps, whether the buffer is inside, the eval return if one was run.

``save_policy`` writes the last three alone (``meta`` says ``policy_only``): a small
checkpoint that ``mjxsac-render`` loads and a resume refuses.

Restoring builds an abstract target from the config (shapes and dtypes from
``jax.eval_shape``, placed on this machine's default device), so a checkpoint written on a
GPU restores on a CPU-only machine. Orbax writes each step to a temporary directory and
renames it when complete, so a crash never leaves a partial checkpoint in place of a good
one. The manager keeps the last ``keep`` steps and the best one by eval return; the eval
return is written with each step (Orbax's metrics item), so the best survives resumes.

Reading takes the newest checkpoint that restores: a damaged one (a truncated file, a
missing manifest, an emptied item) is skipped with a one-line notice naming the reason.
A resumed run moves damaged steps aside into ``<run>/checkpoints-unusable/``; nothing is
deleted.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from mjxsac.cli import UserError, drop_closed_loop_noise, os_error_in
from mjxsac.config import RESUMABLE, Config, FormatVersionError
from mjxsac.sac import Trainer, TrainState, env_steps

ITEMS = ("state", "policy", "config", "meta")


T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that is missing, or does not match what it is restored into."""


class IncompatibleCheckpoint(CheckpointError):
    """A sound checkpoint of another run (task, algorithm, sizes): never skipped."""


class UnreadableCheckpoint(UserError):
    """A checkpoint this process cannot read (permissions, an I/O error): not damage, so
    nothing is skipped or set aside; the command stops naming the file."""


_REPORTED: set[str] = set()


def notify(text: str, prog: str = "mjxsac") -> None:
    """Print a notice once per process (a resume reads the newest config, then the state)."""
    if text not in _REPORTED:
        _REPORTED.add(text)
        print(f"{prog}: {text}", file=sys.stderr, flush=True)


class Checkpoints:
    """The checkpoints of one run directory (``<run>/checkpoints``)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False, prog: str = "mjxsac"):  # fmt: skip
        self.directory = Path(directory).absolute()
        self.prog = prog
        preserve = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=_eval_return,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve,
            # best_fn makes Orbax write each step's metrics to disk (it keeps them only in
            # memory otherwise), so a resumed run still knows which step is the best.
            best_fn=_eval_return,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # steps a killed process left unfinished
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    @staticmethod
    def exist(directory: str | Path) -> bool:
        """Whether ``directory`` holds at least one finished checkpoint step."""
        directory = Path(directory)
        return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())

    # ---- saving ------------------------------------------------------------------------------

    def save(self, state: TrainState, config: Config, save_buffer: bool,
             eval_returns: list[float] | None = None) -> int:  # fmt: skip
        """Save at step ``env_steps`` (asynchronously; the arrays are copied first, so the
        caller may donate ``state`` to the next chunk at once). ``eval_returns``: each
        member's; the checkpoint's rank among the best is their mean."""
        saved = drop_empty(state if save_buffer else state.replace(buffer=None))
        meta = {"has_buffer": save_buffer, "env_devices": env_devices(state)}
        if jax.process_count() > 1:
            meta["processes"] = jax.process_count()
        return self._save(env_steps(state), config, eval_returns, meta,
                          state=ocp.args.StandardSave(saved),
                          policy=ocp.args.StandardSave(policy_of(state)))  # fmt: skip

    def save_policy(self, policy: dict[str, Any], config: Config, step: int,
                    eval_returns: list[float] | None = None) -> int:  # fmt: skip
        """A checkpoint of the policy alone (``policy_of`` a TrainState: the actor
        parameters and the normalizer, with the member axis) besides the config and the
        meta, at ``step``: what ``mjxsac-render`` loads, a few MiB where the whole
        TrainState takes tens or hundreds. It cannot be resumed."""
        meta = {"has_buffer": False, "policy_only": True}
        return self._save(step, config, eval_returns, meta,
                          policy=ocp.args.StandardSave(policy))  # fmt: skip

    def _save(self, step: int, config: Config, eval_returns: list[float] | None,
              meta: dict, **items: Any) -> int:  # fmt: skip
        mean = None if eval_returns is None else float(sum(eval_returns) / len(eval_returns))
        meta = {"env_steps": step, **meta, "eval_return": mean, "eval_returns": eval_returns}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **items, config=ocp.args.JsonSave(config.to_saved()), meta=ocp.args.JsonSave(meta)
            ),
            metrics=None if mean is None else {"eval_return": mean},
            force=True,
        )
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def check_for_errors(self) -> None:
        """Raise the error of an asynchronous save that failed (e.g. a full disk)."""
        self.manager.check_for_errors()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ---- reading -----------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest(self) -> int:
        step = self.manager.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return step

    def newest_usable(self, load: Callable[[int], T], step: int | None = None) -> tuple[int, T]:
        """``(step, load(step))`` for ``step``, or else for the newest step that loads.
        Each damaged step passed over is named in one line on stderr; a checkpoint of
        another run stops the search (it is not damage)."""
        if step is not None:
            return step, self._load(load, step)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        for candidate in steps:
            try:
                return candidate, self._load(load, candidate)
            except IncompatibleCheckpoint:
                raise
            except CheckpointError as e:
                notify(f"skipping checkpoint {self.directory / str(candidate)}: {e}", self.prog)
        raise CheckpointError(f"none of the checkpoints in {self.directory} can be restored")

    def _load(self, load: Callable[[int], T], step: int) -> T:
        sys.unraisablehook = drop_closed_loop_noise
        try:
            return load(step)
        except CheckpointError:
            raise
        except Exception as e:  # damage shows as any error of Orbax, TensorStore or JSON
            cannot_read(self.directory / str(step), e)
            reason = " ".join(str(e).split())
            reason = reason if len(reason) < 200 else reason[:200] + "..."
            raise CheckpointError(f"unreadable ({type(e).__name__}: {reason})") from e

    def config(self, step: int | None = None) -> Config:
        """The run config of ``step`` (default: the newest checkpoint whose config reads)."""
        return self.newest_usable(self._config, step)[1]

    def newest_config(self) -> tuple[int, Config]:
        """``(step, config)`` of the newest checkpoint whose config reads."""
        return self.newest_usable(self._config)

    def _config(self, step: int) -> Config:
        data = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        try:
            return Config.from_saved(data["config"])
        except FormatVersionError as e:  # a sound checkpoint of another layout, not damage
            raise IncompatibleCheckpoint(str(e)) from None

    def meta(self, step: int | None = None) -> dict:
        step = self.latest() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, trainer: Trainer, step: int | None = None) -> TrainState:
        """The full TrainState of ``step`` (default: the newest that restores) for
        ``trainer``'s config. Without a saved buffer the state gets an empty one (updates
        pause until it refills)."""
        return self.newest_usable(lambda s: self._restore_state(trainer, s), step)[1]

    def _restore_state(self, trainer: Trainer, step: int) -> TrainState:
        check_compatible(self._config(step), trainer.run_config)
        meta = self.meta(step)
        if meta.get("policy_only"):
            raise CheckpointError("it holds the policy alone (it renders; it cannot resume)")
        has_buffer = bool(meta["has_buffer"])
        processes = meta.get("processes", 1)
        if processes != jax.process_count():
            raise IncompatibleCheckpoint(
                f"it was written by {processes} process(es), this run has "
                f"{jax.process_count()}: resume with --num-processes {processes}"
            )
        shards = meta.get("env_devices", 1)
        if has_buffer and shards != trainer.env_shards:
            raise IncompatibleCheckpoint(
                f"its replay buffers are split over {shards} device(s) per member, this run's "
                f"over {trainer.env_shards}: resume with --devices "
                f"{shards * trainer.population_size}"
            )
        shapes = state_shapes(trainer)
        target = abstract(shapes, trainer.shardings(shapes))
        if not has_buffer:
            target = target.replace(buffer=None)
        state = fill_empty(self._restore_item(step, "state", drop_empty(target)), target)
        if not has_buffer:
            members = jnp.arange(trainer.population_size)
            capacity = trainer.config.buffer_size  # every device's rows of a member
            empty = jax.vmap(lambda _: trainer.empty_buffer(capacity))(members)
            state = state.replace(buffer=empty)
        if env_steps(state) != step:
            raise CheckpointError(f"its state is at env step {env_steps(state)}, not {step}")
        return trainer.place(state)

    def restore_policy(self, trainer: Trainer, step: int | None = None) -> tuple[int, dict]:
        """``(step, policy)``: the actor parameters and the normalizer of ``step``
        (default: the newest checkpoint whose policy restores)."""
        shapes = state_shapes(trainer)
        target = abstract(policy_of(shapes), policy_of(trainer.shardings(shapes)))
        return self.newest_usable(lambda s: self._restore_item(s, "policy", target), step)

    def set_aside(self, newer_than: int) -> list[Path]:
        """Move the steps newer than ``newer_than`` (damaged ones a resume passed over) to
        ``<run>/checkpoints-unusable/``, so that the resumed run can save those steps anew.
        Returns where they went; nothing is deleted."""
        aside = self.directory.parent / "checkpoints-unusable"
        moved = []
        for step in sorted(self.manager.all_steps()):
            if step > newer_than:
                aside.mkdir(exist_ok=True)
                target = aside / str(step)
                suffix = 1
                while target.exists():
                    target = aside / f"{step}.{suffix}"
                    suffix += 1
                shutil.move(self.directory / str(step), target)
                moved.append(target)
        self.manager.reload()
        return moved

    def _restore_item(self, step: int, item: str, target: Any) -> Any:
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
        return self.manager.restore(step, args=args)[item]


def cannot_read(step_dir: Path, error: Exception) -> None:
    """Raise ``UnreadableCheckpoint`` if ``error`` came from the machine, not from damage:
    a directory or file of the step this process may not open (permissions), or an
    operating-system error other than a missing file. A missing or corrupt file is
    damage, and this returns."""

    def refuse(e: OSError) -> None:
        if not isinstance(e, FileNotFoundError | NotADirectoryError):
            _raise_unreadable(step_dir, e)

    for root, _, files in os.walk(step_dir, onerror=refuse):
        for name in files:
            try:
                (Path(root) / name).open("rb").close()
            except OSError as e:
                refuse(e)
    cause = os_error_in(error)
    if cause is not None:
        refuse(cause)


def _raise_unreadable(step_dir: Path, e: OSError) -> None:
    what = f"{e.filename}" if e.filename else f"checkpoint {step_dir}"
    fix = "fix its permissions" if e.errno in (errno.EACCES, errno.EPERM) else "check the disk"
    raise UnreadableCheckpoint(
        f"cannot read {what} ({e.strerror or e}): {fix}, then try again (a checkpoint "
        "that cannot be read is not a damaged one: nothing was skipped, moved or changed)"
    ) from None


def _eval_return(metrics: dict) -> float:
    return metrics["eval_return"]


def drop_empty(tree: Any) -> Any:
    """Orbax refuses zero-size arrays (MJX keeps several, e.g. ``act`` of a model without
    activations): they are saved as None and rebuilt from the target on restore."""
    return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def fill_empty(restored: Any, target: Any) -> Any:
    return jax.tree.map(
        lambda r, t: jax.numpy.zeros(t.shape, t.dtype) if r is None and t is not None else r,
        restored,
        target,
        is_leaf=lambda x: x is None,
    )


def env_devices(state: TrainState) -> int:
    """Over how many devices each member's envs and replay rows are split."""
    spec = state.episode_return.sharding.spec
    mesh = state.episode_return.sharding.mesh
    return mesh.shape[spec[1]] if len(spec) > 1 and spec[1] else 1


def policy_of(state: TrainState) -> dict[str, Any]:
    return {"actor": state.actor, "normalizer": state.normalizer}


def state_shapes(trainer: Trainer) -> TrainState:
    """The shapes and dtypes of ``trainer``'s TrainState, computed without allocating it."""
    return jax.eval_shape(trainer._init, *trainer.init_args())


def abstract(tree: Any, shardings: Any) -> Any:
    """Shapes and dtypes of ``tree``, placed as ``shardings`` says (the trainer's devices)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def check_compatible(saved: Config, wanted: Config) -> None:
    """Refuse to restore a checkpoint of another task, algorithm or shape of run."""
    a, b = saved.to_dict(), wanted.to_dict()
    differ = sorted(k for k in a if k not in RESUMABLE and a[k] != b.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {a[k]!r} vs requested {b.get(k)!r}" for k in differ)
        raise IncompatibleCheckpoint(f"the checkpoint was written by a different run ({details})")
    # A field the population varies takes each member's value from ``vary``: a new value
    # for the field itself would be recorded and ignored by every member.
    varied = saved.varied()
    ignored = sorted(k for k in varied if a[k] != b.get(k))
    if ignored:
        details = ", ".join(
            f"{k} (each member's own: {', '.join(f'{v:g}' for v in varied[k])})" for k in ignored
        )
        raise IncompatibleCheckpoint(
            f"the population varies {details}, so a resume cannot change it"
        )


def find_checkpoints(path: str | Path) -> tuple[Path, int | None]:
    """Accept a run directory, its ``checkpoints`` directory or one step's directory;
    return the checkpoints directory and the step (None: the latest)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "meta").exists():
        return path.parent, int(path.name)
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path, None
    raise CheckpointError(f"{path} is neither a run directory nor a checkpoint directory")
