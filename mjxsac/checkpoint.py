"""Orbax checkpoints of the whole ``TrainState``, restorable on any device.

Each checkpoint step holds four items:

* ``state``: the TrainState (parameters, target parameters, optimizer states, log_alpha,
  normalizer, env states, keys, counters), with the replay buffer only under
  ``save_buffer``;
* ``policy``: the actor parameters and the normalizer alone, what rendering needs;
* ``config``: the resolved run config (JSON);
* ``meta``: env steps, whether the buffer is inside, the eval return if one was run.

Restoring builds an abstract target from the config (shapes and dtypes from
``jax.eval_shape``, placed on this machine's default device), so a checkpoint written on a
GPU restores on a CPU-only machine. Orbax writes each step to a temporary directory and
renames it when complete, so a crash never leaves a partial checkpoint in place of a good
one. The manager keeps the last ``keep`` steps and the best one by eval return.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from mjxsac import buffer as replay
from mjxsac.config import HOST_ONLY, Config
from mjxsac.sac import Trainer, TrainState, default_device, place, seed_key

ITEMS = ("state", "policy", "config", "meta")


class CheckpointError(ValueError):
    """A checkpoint that is missing, or does not match what it is restored into."""


class Checkpoints:
    """The checkpoints of one run directory (``<run>/checkpoints``)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):  # fmt: skip
        self.directory = Path(directory).absolute()
        preserve = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=lambda m: m["eval_return"],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # ---- saving ------------------------------------------------------------------------------

    def save(self, state: TrainState, config: Config, save_buffer: bool,
             eval_return: float | None = None) -> int:  # fmt: skip
        """Save at step ``env_steps`` (asynchronously; the arrays are copied first, so the
        caller may donate ``state`` to the next chunk at once)."""
        step = int(state.env_steps)
        saved = drop_empty(state if save_buffer else state.replace(buffer=None))
        meta = {"env_steps": step, "has_buffer": save_buffer, "eval_return": eval_return}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(saved),
                policy=ocp.args.StandardSave(policy_of(state)),
                config=ocp.args.JsonSave(config.to_dict()),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=None if eval_return is None else {"eval_return": eval_return},
            force=True,
        )
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

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

    def config(self, step: int | None = None) -> Config:
        step = self.latest() if step is None else step
        data = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return Config.from_dict(data["config"])

    def meta(self, step: int | None = None) -> dict:
        step = self.latest() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, trainer: Trainer, step: int | None = None) -> TrainState:
        """The full TrainState of ``step`` (default: latest) for ``trainer``'s config. Without
        a saved buffer the state gets an empty one (updates pause until it refills)."""
        step = self.latest() if step is None else step
        check_compatible(self.config(step), trainer.config)
        has_buffer = bool(self.meta(step)["has_buffer"])
        target = abstract(state_shapes(trainer))
        if not has_buffer:
            target = target.replace(buffer=None)
        state = fill_empty(self._restore_item(step, "state", drop_empty(target)), target)
        if not has_buffer:
            c = trainer.config
            state = state.replace(
                buffer=replay.init(c.buffer_size, trainer.obs_size, trainer.action_size)
            )
        return place(state)

    def restore_policy(self, trainer: Trainer, step: int | None = None) -> dict[str, Any]:
        """Only the actor parameters and the normalizer of ``step``."""
        step = self.latest() if step is None else step
        return self._restore_item(step, "policy", abstract(policy_of(state_shapes(trainer))))

    def _restore_item(self, step: int, item: str, target: Any) -> Any:
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this config: {e}"
            ) from e
        return out[item]


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


def policy_of(state: TrainState) -> dict[str, Any]:
    return {"actor": state.actor, "normalizer": state.normalizer}


def state_shapes(trainer: Trainer) -> TrainState:
    """The shapes and dtypes of ``trainer``'s TrainState, computed without allocating it."""
    return jax.eval_shape(trainer.init, seed_key(0))


def abstract(tree: Any) -> Any:
    """Shapes and dtypes of ``tree``, placed on this machine's default device."""
    sharding = jax.sharding.SingleDeviceSharding(default_device())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# Fields a resumed run may change: they do not shape the TrainState or the learning.
RESUMABLE_CHANGES = HOST_ONLY | {"eval_envs"}


def check_compatible(saved: Config, wanted: Config) -> None:
    """Refuse to restore a checkpoint of another task, algorithm or shape of run."""
    a, b = saved.to_dict(), wanted.to_dict()
    differ = sorted(k for k in a if k not in RESUMABLE_CHANGES and a[k] != b.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {a[k]!r} vs requested {b.get(k)!r}" for k in differ)
        raise CheckpointError(f"the checkpoint was written by a different run ({details})")


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
