"""Whether a run fits, checked on the host before anything is allocated or compiled."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from mjxsac import buffer as replay
from mjxsac.sac import MEMBER, Trainer, default_device


def check_memory(trainer: Trainer, refuse: bool = True) -> str:
    """Refuse a run that cannot fit, before anything is allocated or compiled: the replay
    buffers, the networks with their target copies, optimizer states and gradients, and
    an update's activations (an estimate: XLA's temporaries come on top), on each of the
    run's devices. Returns the estimate as a sentence."""
    config = trainer.config
    row = replay.row_bytes(trainer.obs_size, trainer.action_size, config.n_step > 1)
    members = trainer.population_size
    devices = trainer.mesh.size
    here = members // trainer.mesh.shape[MEMBER]  # members with rows on each device
    buffer = here * trainer.local_capacity * row
    parameters, network = network_bytes(trainer)
    network *= here
    activations = here * activation_bytes(trainer)
    need = buffer + network + activations
    free, where = available_bytes()
    sizes = f"{trainer.local_capacity:,} transitions x {row} bytes"
    if here == 1:
        estimate = f"the replay buffer needs {buffer / 2**30:.2f} GiB ({sizes})"
    else:
        estimate = f"the {here} members' replay buffers need {buffer / 2**30:.2f} GiB "
        estimate += f"({here} x {sizes})"
    estimate += (
        f", the networks with optimizer states {network / 2**30:.2f} GiB ({parameters:,} "
        f"parameters{' per member' if here > 1 else ''}), an update's activations about "
        f"{activations / 2**30:.2f} GiB"
    )
    if devices > 1:
        estimate = f"on each of the {devices} devices {estimate}"
    if free is None:
        return estimate
    estimate += f"; {where} has {free / 2**30:.2f} GiB free"
    if where == "host memory":  # CPU devices share it
        need *= devices
    if refuse and need > 0.8 * free:
        largest = max((buffer, "buffer_size"), (network, "hidden_sizes"),
                      (activations, "batch_size"))[1]  # fmt: skip
        fewer = " or the number of members" if members > 1 else ""
        raise MemoryError(f"{estimate}: lower {largest}{fewer}")
    return estimate


def network_bytes(trainer: Trainer) -> tuple[int, int]:
    """One member's parameter count (actor, critics, V) and the bytes of its parameters,
    target copies, optimizer states and one gradient of each, from shapes alone (nothing
    is allocated or compiled)."""

    def build():
        key = jax.random.key(0)
        obs, act = jnp.zeros((1, trainer.obs_size)), jnp.zeros((1, trainer.action_size))
        nets = {"actor": trainer.actor.init(key, obs), "critic": trainer.critic.init(key, obs, act)}
        if trainer.value is not None:
            nets["value"] = trainer.value.init(key, obs)
        opts = {
            name: (trainer.actor_opt if name == "actor" else trainer.critic_opt).init(params)
            for name, params in nets.items()
        }
        return nets, opts

    nets, opts = jax.eval_shape(build)

    def size(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    parameters = sum(x.size for x in jax.tree.leaves(nets))
    targets = size({k: v for k, v in nets.items() if k != "actor"})
    return parameters, 2 * size(nets) + targets + size(opts)  # + a gradient of each


def activation_bytes(trainer: Trainer) -> int:
    """About what one update keeps for its backward passes: each network pass over the
    batch stores its hidden layers (before and after the activation), and an update makes
    about 8 passes (twin critics and target critics, the actor twice), 11 for sac-v1."""
    c = trainer.config
    passes = 11 if trainer.v1 else 8
    return trainer.local_batch * sum(c.hidden_sizes) * 4 * 2 * passes


def available_bytes() -> tuple[int | None, str]:
    """Free memory of the default device: the accelerator's, or the host's RAM on CPU."""
    device = default_device()
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), str(device)
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return pages * os.sysconf("SC_PAGE_SIZE"), "host memory"
    except (ValueError, OSError, AttributeError):
        return None, "host memory"
