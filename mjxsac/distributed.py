"""Several hosts: one process per host, joined through ``jax.distributed``.

``mjxsac-train ... --coordinator HOST:PORT --num-processes N --process-id I`` starts one
of N processes (every host runs the same command with its own ``--process-id``; process
0's host serves as coordinator). Under SLURM or Open MPI (more than one task) the flags
are not needed: ``jax.distributed.initialize()`` reads the cluster's own variables. The
processes then form one program over all hosts' devices (``mjxsac.sac``'s mesh spans
them); process 0 alone prints, writes metrics, plots and wandb, and every process writes
its shards of each checkpoint (Orbax). On the CPU the collectives go through gloo.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

FLAGS = {"--coordinator": "coordinator", "--num-processes": "num_processes",
         "--process-id": "process_id"}  # fmt: skip


def option(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The multi-host flags of ``argv`` (``--flag value`` or ``--flag=value``), and the
    rest of ``argv``."""
    found, rest = {}, []
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag not in FLAGS:
            rest.append(arg)
            continue
        if not eq:
            value = next(args, None)
            if value is None or value.startswith("--"):
                raise ValueError(f"{flag} needs a value")
        found[FLAGS[flag]] = value
    return found, rest


def in_cluster() -> bool:
    """Whether this process is one task of several under SLURM or Open MPI."""
    tasks = [os.environ.get("SLURM_NTASKS"), os.environ.get("OMPI_COMM_WORLD_SIZE")]
    return any(t is not None and t.isdigit() and int(t) > 1 for t in tasks)


def initialize(settings: dict[str, str]) -> int:
    """Join the other processes (before anything touches a JAX backend); returns the
    process count (1: a single-process run, nothing joined)."""
    if settings:
        missing = [f for f, name in FLAGS.items() if name not in settings]
        if missing:
            raise ValueError(
                "--coordinator, --num-processes and --process-id go together: "
                f"{', '.join(missing)} missing"
            )
        count, index = _integer(settings, "num_processes"), _integer(settings, "process_id")
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"--process-id must be in 0..{count - 1}, got {index}")
        kwargs: dict[str, Any] = {"coordinator_address": settings["coordinator"],
                                  "num_processes": count, "process_id": index}  # fmt: skip
    elif in_cluster():
        kwargs = {}
    else:
        return 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU's; GPUs: NCCL
    jax.distributed.initialize(**kwargs)
    # What is made outside the run's programs (an env's template Data, keys) goes to this
    # process's own first device, not to the first device of all (another process's).
    jax.config.update("jax_default_device", jax.local_devices()[0])
    return jax.process_count()


def _integer(settings: dict[str, str], name: str) -> int:
    try:
        return int(settings[name])
    except ValueError:
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} must be an integer, got {settings[name]!r}") from None


def primary() -> bool:
    """Whether this process speaks for the run (prints, writes metrics, plots, wandb)."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Device arrays as NumPy arrays holding every member's values, in every process
    (across processes, gathered)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds in any process: a decision every process must take at the
    same chunk (a signal that reached some of them first), or one waits forever in the
    next chunk's collectives."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
