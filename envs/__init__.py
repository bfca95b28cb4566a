"""The SAC papers' locomotion tasks, ported from Gymnasium v5 to MuJoCo-MJX.

env = envs.make("Hopper")
state = jax.jit(env.reset)(jax.random.key(0))
state = jax.jit(env.step)(state, action)
"""

from __future__ import annotations

import importlib
import math

from envs.base import OVERFLOW, Env, PhysicsOptions, State, scale_action
from envs.wrappers import AutoReset, TimeLimit, VmapEnv, Wrapper, desynchronize, wrap

_MODULES = {
    "InvertedPendulum": "envs.inverted_pendulum",
    "Hopper": "envs.hopper",
    "Walker2d": "envs.walker2d",
    "HalfCheetah": "envs.half_cheetah",
    "Ant": "envs.ant",
    "Humanoid": "envs.humanoid",
    "Swimmer": "envs.swimmer",
}
NAMES: tuple[str, ...] = tuple(_MODULES)
PHYSICS_FIELDS = tuple(f for f in PhysicsOptions.__dataclass_fields__)


def env_class(name: str) -> type[Env]:
    """The class of task ``name``; a ``ValueError`` lists the valid names."""
    if name not in _MODULES:
        raise ValueError(f"unknown environment {name!r}; valid names: {', '.join(NAMES)}")
    return getattr(importlib.import_module(_MODULES[name]), name)


def check_options(name: str, overrides: dict) -> None:
    """Refuse unknown task names, unknown options and bad speed options, cheaply."""
    task_args = set(env_class(name).defaults)
    unknown = sorted(set(overrides) - task_args - set(PHYSICS_FIELDS))
    if unknown:
        valid = ", ".join(sorted(task_args | set(PHYSICS_FIELDS)))
        raise ValueError(f"{name} has no option {', '.join(unknown)}; valid options: {valid}")
    PhysicsOptions(**{k: v for k, v in overrides.items() if k in PHYSICS_FIELDS})
    defaults = env_class(name).defaults
    for key, value in overrides.items():
        if key in defaults:
            _check_option_type(name, key, value, defaults[key])


def _check_option_type(name: str, key: str, value, default) -> None:
    """A task option must have its Gymnasium default's type (ints pass for floats), be
    finite (a range's ends may be infinite: ``healthy_z_range=0.7,inf``) and a range must
    not be empty."""

    def number(x) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = number(value), "a number"
        if ok and not math.isfinite(value):
            ok, kind = False, "a finite number"
    elif isinstance(default, tuple):
        ok = isinstance(value, tuple | list) and len(value) == len(default)
        pair = ",".join(map(str, default))
        ok = ok and all(number(v) and not math.isnan(v) for v in value)
        kind = f"{len(default)} numbers like {key}={pair}"
        if ok and key.endswith("_range") and value[0] > value[1]:
            ok, kind = False, f"a range low,high with low <= high, like {key}={pair}"
    else:
        ok, kind = isinstance(value, type(default)), type(default).__name__
    if not ok:
        raise ValueError(f"{name} option {key} must be {kind}, got {value!r}")


def make(name: str, **overrides) -> Env:
    """Build task ``name``. Overrides are Gymnasium's keyword arguments of the same task
    (e.g. ``ctrl_cost_weight``) or the speed options of :class:`PhysicsOptions`
    (``solver``, ``iterations``, ``ls_iterations``, ``integrator``, ``cone``)."""
    check_options(name, overrides)
    physics = {k: overrides.pop(k) for k in PHYSICS_FIELDS if k in overrides}
    return env_class(name)(physics=PhysicsOptions(**physics), **overrides)


__all__ = [
    "NAMES",
    "OVERFLOW",
    "AutoReset",
    "Env",
    "PhysicsOptions",
    "State",
    "TimeLimit",
    "VmapEnv",
    "Wrapper",
    "check_options",
    "desynchronize",
    "env_class",
    "make",
    "scale_action",
    "wrap",
]
