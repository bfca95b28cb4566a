"""The environment base: a pure ``(reset, step)`` pair over MuJoCo-MJX.

Each task module subclasses :class:`Env` and supplies only what Gymnasium's v5 class of the
same name defines: the reset noise, the observation and the reward/termination. Physics,
frame skip and the solver options live here, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import io
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import struct

# mujoco.mjx prints a line when its optional Warp backend is missing; we use the JAX one.
with contextlib.redirect_stdout(io.StringIO()):
    from mujoco import mjx
    from mujoco.mjx import warp as mjx_warp

from envs.physics import Physics, local_device

ASSETS = Path(__file__).parent
XML = "xml"
"""The value of an iteration cap that keeps the XML's (``iterations="xml"``)."""
STEP_INPUTS = ("time", "qpos", "qvel", "act", "qacc_warmstart", "ctrl")
"""The ``mjx.Data`` fields a physics step reads from the step before it: ``mjx.step``
recomputes every other field from these (the applied forces, mocap and equality fields
are inputs too, but nothing here sets them: they stay at ``make_data``'s values)."""
IMPLS = ("jax", "warp")
"""The physics backends: MJX's JAX pipeline, or MuJoCo Warp through MJX (``impl="warp"``)."""
WARP_INSTALL = "pip install -e '.[warp]'"
OVERFLOW = "physics_overflow"
"""Under Warp, the metric that is 1 on a step where the contact or constraint budget
overflowed (Warp then drops contacts, with only a printed warning); the trainer sums it."""


@struct.dataclass
class State:
    """One environment's state. Batched along a leading axis under ``vmap``.

    ``obs`` is what the agent sees next; ``final_obs`` is the observation produced by the
    last step before any auto-reset, so a learner can bootstrap through a truncation.
    """

    data: mjx.Data
    obs: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: jax.Array
    steps: jax.Array
    """Steps taken in the current episode."""
    key: jax.Array
    """Randomness for the next auto-reset."""
    metrics: dict[str, jax.Array]
    """Per-step reward terms and velocities, named as in Gymnasium's ``info``."""


class Solver(enum.Enum):
    NEWTON = mujoco.mjtSolver.mjSOL_NEWTON
    CG = mujoco.mjtSolver.mjSOL_CG


class Integrator(enum.Enum):
    EULER = mujoco.mjtIntegrator.mjINT_EULER
    RK4 = mujoco.mjtIntegrator.mjINT_RK4
    IMPLICITFAST = mujoco.mjtIntegrator.mjINT_IMPLICITFAST


class Cone(enum.Enum):
    PYRAMIDAL = mujoco.mjtCone.mjCONE_PYRAMIDAL
    ELLIPTIC = mujoco.mjtCone.mjCONE_ELLIPTIC


@dataclasses.dataclass(frozen=True)
class PhysicsOptions:
    """Speed options: simulator settings that override the XML's. ``None`` keeps the XML's,
    except for the two iteration caps, where ``None`` means the task's default.

    The XMLs keep MuJoCo's defaults (100 solver iterations, 50 line-search iterations);
    under ``vmap`` every env pays for the slowest one's iterations, and MJX's line search
    runs all ``ls_iterations`` steps of its scan whenever envs are batched. Each task
    therefore caps both by default (``Env.solver_defaults``) at values chosen from the
    measured iteration needs and the parity harness (``docs/ENVIRONMENTS.md``).
    ``iterations="xml"`` / ``ls_iterations="xml"`` (or the numbers 100 / 50) restore the
    XML's; Euler instead of RK4 buys more speed at a fidelity cost measured there too.
    """

    solver: str | None = None
    """'newton' or 'cg'. PGS (Humanoid's XML) is not available in MJX: Newton replaces it."""
    iterations: int | str | None = None
    """Maximum constraint-solver iterations: a positive integer, 'xml' for the XML's, or
    None for the task's default (``Env.solver_defaults``)."""
    ls_iterations: int | str | None = None
    """Maximum line-search iterations of the solver: as ``iterations``."""
    integrator: str | None = None
    """'euler', 'rk4' or 'implicitfast'."""
    cone: str | None = None
    """Friction cone: 'pyramidal' or 'elliptic'."""
    faithful: bool = True
    """Correct MJX where it departs from C MuJoCo (RK4 on free joints, contact geometry;
    see ``envs/physics.py``). False runs plain ``mjx.step``."""
    tolerance: float | None = None
    """The constraint solver's convergence tolerance (MuJoCo's ``opt.tolerance``, 1e-8 in
    the XMLs); 0 disables early termination."""
    impl: str = "jax"
    """The physics backend: 'jax' (MJX's JAX pipeline) or 'warp' (MuJoCo Warp, the
    ``.[warp]`` extra). Under Warp the C-faithful corrections (``faithful``) cannot run:
    the step is Warp's own (docs/ENVIRONMENTS.md measures what that costs)."""

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; valid: {', '.join(IMPLS)}")
        if self.impl == "warp" and not mjx_warp.WARP_INSTALLED:
            raise ValueError(f"impl=warp needs MuJoCo Warp, which is not installed: {WARP_INSTALL}")
        for kind, name in ((Solver, "solver"), (Integrator, "integrator"), (Cone, "cone")):
            if getattr(self, name) is not None:
                _enum_value(kind, getattr(self, name), name)
        for name in ("iterations", "ls_iterations"):
            value = getattr(self, name)
            if (
                value is not None
                and value != XML
                and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
            ):
                raise ValueError(f"{name} must be a positive integer or 'xml', got {value!r}")
        if not isinstance(self.faithful, bool):
            raise ValueError(f"faithful must be true or false, got {self.faithful!r}")
        if self.tolerance is not None and not (
            isinstance(self.tolerance, int | float)
            and not isinstance(self.tolerance, bool)
            and 0 <= self.tolerance < float("inf")
        ):
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance!r}")

    def apply(self, model: mujoco.MjModel) -> None:
        """Write the chosen options into ``model.opt`` (in place)."""
        opt = model.opt
        if self.solver is not None:
            opt.solver = _enum_value(Solver, self.solver, "solver")
        elif opt.solver == mujoco.mjtSolver.mjSOL_PGS:
            opt.solver = mujoco.mjtSolver.mjSOL_NEWTON
        if self.integrator is not None:
            opt.integrator = _enum_value(Integrator, self.integrator, "integrator")
        if self.cone is not None:
            opt.cone = _enum_value(Cone, self.cone, "cone")
        for name in ("iterations", "ls_iterations"):
            if getattr(self, name) not in (None, XML):
                setattr(opt, name, getattr(self, name))
        if self.tolerance is not None:
            opt.tolerance = self.tolerance

    def with_task_defaults(self, defaults: dict[str, int]) -> PhysicsOptions:
        """These options, with the task's default for each iteration cap left at None."""
        chosen = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **chosen)


def add_physics_arguments(parser, several: tuple[str, ...] = ()) -> None:
    """``--solver``, ``--iterations``, ... for the command-line tools (argparse); the
    options named in ``several`` take one value or more (a benchmark's variants)."""

    def boolean(text: str) -> bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")

    def cap(text: str) -> int | str:
        return XML if text.lower() == XML else int(text)

    kinds = {"iterations": cap, "ls_iterations": cap, "faithful": boolean, "tolerance": float}
    for field in dataclasses.fields(PhysicsOptions):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=kinds.get(field.name, str),
            nargs="+" if field.name in several else None,
            help=f"speed/fidelity option (PhysicsOptions.{field.name}); default: the "
            + ("task's" if "iterations" in field.name else "XML's"),
        )


def physics_from_arguments(args) -> dict:
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(PhysicsOptions)
        if getattr(args, f.name) is not None
    }


def _enum_value(kind: type[enum.Enum], name: str, what: str) -> int:
    try:
        return kind[str(name).upper()].value
    except KeyError:
        valid = ", ".join(m.name.lower() for m in kind)
        raise ValueError(f"unknown {what} {name!r}; valid: {valid}") from None


class Env:
    """A Gymnasium v5 MuJoCo task as pure, jittable, vmappable JAX functions.

    Subclasses set ``xml``, ``frame_skip`` and ``defaults`` and implement ``_observe`` and
    ``_reward`` (and ``_reset_physics`` to compute less at a reset). Actions are in the
    units of the model's control range (``action_low`` .. ``action_high``), exactly as
    Gymnasium's action space.
    """

    xml: str
    frame_skip: int
    defaults: dict[str, Any] = {}
    """Gymnasium's keyword arguments of the task and their v5 defaults; each becomes an
    attribute of the env, and ``envs.make(name, **overrides)`` may override any of them."""
    solver_defaults: dict[str, int] = {}
    """The task's solver caps (``iterations``, ``ls_iterations``) when the user gives none;
    measured and justified in ``docs/ENVIRONMENTS.md``. Empty keeps the XML's."""
    qvel_noise: str = "uniform"
    """Reset noise on qvel: 'uniform' in +-reset_noise_scale, or 'normal' with that scale
    (HalfCheetah, Ant), as in Gymnasium."""
    episode_length: int = 1000
    uses_cfrc_ext: bool = False
    """Whether the task reads ``cfrc_ext``: only then is ``rne_postconstraint`` run."""
    before_fields: tuple[str, ...] = ()
    """Computed ``Data`` fields that ``_reward`` reads from the state *before* the step
    (Ant: the torso's ``xpos``); ``compact`` keeps them next to ``STEP_INPUTS``."""
    camera_distance: float = 4.0
    """Video camera distance (Gymnasium's default camera configuration of the task)."""
    camera_tracks: bool = True
    """Whether the video camera follows the robot's root body."""

    def __init__(self, physics: PhysicsOptions | None = None, **overrides: Any):
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.name} has no option {', '.join(unknown)}")
        for key, value in {**self.defaults, **overrides}.items():
            setattr(self, key, value)
        chosen = (physics or PhysicsOptions()).with_task_defaults(self.solver_defaults)
        model = mujoco.MjModel.from_xml_path(str(ASSETS / self.xml))
        chosen.apply(model)
        # What the model runs, with 'xml' resolved to the XML's numbers (and no
        # corrections under Warp, where they cannot run).
        self.physics = dataclasses.replace(
            chosen,
            iterations=int(model.opt.iterations),
            ls_iterations=int(model.opt.ls_iterations),
            faithful=chosen.faithful and chosen.impl == "jax",
        )
        self.mj_model = model
        self.impl = chosen.impl
        if self.impl == "warp":
            _quiet_warp()
        self.mjx_model = mjx.put_model(model, device=local_device(), impl=self.impl)
        step_model = self.mjx_model
        if self.impl == "warp":
            # Warp's step leaves cfrc_ext at zero unless asked; the JAX impl runs
            # rne_postconstraint after the step instead (``step``).
            # Only budget overflows warn (and count, ``OVERFLOW``); reaching the solver's
            # iteration caps is what the caps are for, as under the JAX impl.
            step_model = step_model.tree_replace(
                {
                    "opt._impl.run_rne_postconstraint": self.uses_cfrc_ext,
                    "opt._impl.warn_overflow": _warp_budget_bits(),
                }
            )
            self._warp_budget = _warp_budget(model)
        self.sim = Physics(step_model, self.physics.faithful)
        self.worlds = 1
        self._data0 = self._template()  # after mj_resetData: qpos0, zero velocities, warmstart
        self.init_qpos = jnp.asarray(model.qpos0, self._data0.qpos.dtype)
        self.init_qvel = jnp.zeros(model.nv, self._data0.qvel.dtype)
        self.action_low = np.asarray(model.actuator_ctrlrange[:, 0], np.float32)
        self.action_high = np.asarray(model.actuator_ctrlrange[:, 1], np.float32)
        shapes = jax.eval_shape(self.reset, jax.random.key(0))
        self.observation_size = int(shapes.obs.shape[-1])
        self.metric_names = tuple(k for k in shapes.metrics if k != OVERFLOW)
        """Gymnasium's ``info`` terms (not Warp's overflow flag)."""

    def reserve(self, worlds: int) -> None:
        """Size the physics for ``worlds`` envs stepped as one batch (every vmapped call of
        the run, training and evaluation, members included). Only Warp needs it: its
        contact budget (``naconmax``) is shared by all the worlds of a call. It grows only;
        call it before tracing the functions that step that many envs."""
        if self.impl == "warp" and worlds > self.worlds:
            self.worlds = int(worlds)
            self._data0 = self._template()

    def _template(self) -> mjx.Data:
        """A fresh ``Data`` for ``worlds`` envs per call (Warp's budgets)."""
        if self.impl == "jax":
            return mjx.make_data(self.mjx_model, device=local_device())
        contacts, rows = self._warp_budget
        return mjx.make_data(
            self.mj_model,
            device=local_device(),
            impl="warp",
            naconmax=max(1, contacts * self.worlds),
            njmax=max(1, rows),
        )

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def action_size(self) -> int:
        return int(self.mj_model.nu)

    @property
    def dt(self) -> float:
        """Seconds of simulated time per env step."""
        return float(self.mj_model.opt.timestep) * self.frame_skip

    # ---- the pure interface -------------------------------------------------------------

    def reset(self, key: jax.Array) -> State:
        """A fresh episode with Gymnasium's reset noise."""
        key, init_key = jax.random.split(key)
        qpos, qvel = self._sample_init(init_key)
        return self._state_at(qpos, qvel, key)

    def reset_to(self, qpos: jax.Array, qvel: jax.Array, key: jax.Array | None = None) -> State:
        """The state at the given positions and velocities (like Gymnasium's ``set_state``)."""
        qpos = jnp.asarray(qpos, self._data0.qpos.dtype)
        qvel = jnp.asarray(qvel, self._data0.qvel.dtype)
        if qpos.shape != (self.mj_model.nq,) or qvel.shape != (self.mj_model.nv,):
            raise ValueError(
                f"{self.name}: qpos must have shape ({self.mj_model.nq},) and qvel "
                f"({self.mj_model.nv},), got {qpos.shape} and {qvel.shape}"
            )
        return self._state_at(qpos, qvel, jax.random.key(0) if key is None else key)

    def step(self, state: State, action: jax.Array) -> State:
        """Advance ``frame_skip`` physics steps with ``action`` held, as Gymnasium does."""
        before = state.data
        data = before.replace(ctrl=jnp.asarray(action, before.ctrl.dtype))
        data = jax.lax.fori_loop(0, self.frame_skip, lambda _, d: self.sim.step(d), data)
        if self.uses_cfrc_ext and self.impl == "jax":
            data = mjx.rne_postconstraint(self.mjx_model, data)
        obs = self._observe(data)
        reward, terminated, metrics = self._reward(before, data, data.ctrl)
        if self.impl == "warp":
            overflow = (data._impl.overflow & _warp_budget_bits()) != 0
            metrics = {**metrics, OVERFLOW: overflow.astype(reward.dtype)}
        return state.replace(
            data=data,
            obs=obs,
            final_obs=obs,
            reward=reward,
            terminated=terminated,
            truncated=jnp.zeros_like(terminated),
            steps=state.steps + 1,
            metrics=metrics,
        )

    # ---- task hooks ---------------------------------------------------------------------

    def _sample_init(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Gymnasium's reset noise: uniform on qpos; uniform or normal on qvel."""
        kq, kv = jax.random.split(key)
        qpos = self.init_qpos + self._uniform(kq, self.init_qpos)
        noise = self._normal if self.qvel_noise == "normal" else self._uniform
        return qpos, self.init_qvel + noise(kv, self.init_qvel)

    def _reset_physics(self, data: mjx.Data) -> mjx.Data:
        """Compute what the reset observation and the first reward read.

        ``mjx.step`` recomputes everything from qpos, qvel, ctrl and the (zero) warmstart,
        so a task computes here only what its observation and its ``before`` term need;
        for most tasks that is nothing. The default runs the full forward pass.
        """
        return self.sim.forward(data)

    def _observe(self, data: mjx.Data) -> jax.Array:
        raise NotImplementedError

    def _reward(
        self, before: mjx.Data, after: mjx.Data, action: jax.Array
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Return ``(reward, terminated, metrics)`` for the transition ``before -> after``."""
        raise NotImplementedError

    # ---- a compact state ----------------------------------------------------------------

    def compact(self, data: mjx.Data) -> mjx.Data:
        """``data`` with only what the next step reads (``STEP_INPUTS`` and
        ``before_fields``); every other field is ``None``. A loop that carries env states
        (the training chunk, evaluation) carries 6-7 arrays per env instead of 84: less
        to copy per step and a smaller program to compile. ``expand`` undoes it."""
        keep = set(STEP_INPUTS + self.before_fields)
        dropped = {f.name: None for f in dataclasses.fields(data) if f.name not in keep}
        return data.replace(**dropped)

    def expand(self, data: mjx.Data) -> mjx.Data:
        """A full ``Data`` from a compact one: the kept fields over a fresh ``make_data``."""
        kept = STEP_INPUTS + self.before_fields
        return self._data0.replace(**{name: getattr(data, name) for name in kept})

    # ---- helpers ------------------------------------------------------------------------

    def _uniform(self, key: jax.Array, like: jax.Array) -> jax.Array:
        s = self.reset_noise_scale
        return jax.random.uniform(key, like.shape, like.dtype, -s, s)

    def _normal(self, key: jax.Array, like: jax.Array) -> jax.Array:
        return self.reset_noise_scale * jax.random.normal(key, like.shape, like.dtype)

    def _state_at(self, qpos: jax.Array, qvel: jax.Array, key: jax.Array) -> State:
        data = self._reset_physics(self._data0.replace(qpos=qpos, qvel=qvel))
        # MJX writes normalized quaternions back into qpos; MuJoCo's mj_forward does not,
        # and Gymnasium's reset observation shows the noisy, unnormalized ones.
        data = data.replace(qpos=qpos)
        obs = self._observe(data)
        _, terminated, metrics = self._reward(data, data, data.ctrl)
        zero = jnp.zeros((), obs.dtype)
        if self.impl == "warp":
            metrics = {**metrics, OVERFLOW: zero}
        return State(
            data=data,
            obs=obs,
            reward=zero,
            terminated=jnp.zeros_like(terminated),
            truncated=jnp.zeros_like(terminated),
            final_obs=obs,
            steps=jnp.zeros((), jnp.int32),
            key=key,
            metrics={k: jnp.zeros_like(v) for k, v in metrics.items()},
        )


def scale_action(env: Env, action: jax.Array) -> jax.Array:
    """Map a policy's action in [-1, 1] affinely onto ``[env.action_low, env.action_high]``."""
    low, high = jnp.asarray(env.action_low), jnp.asarray(env.action_high)
    return low + (action + 1.0) * 0.5 * (high - low)


def healthy_between(x: jax.Array, low: float, high: float, inclusive: bool = False) -> jax.Array:
    """``low < x < high`` (or ``<=``), elementwise, as Gymnasium's health checks write it."""
    if inclusive:
        return (low <= x) & (x <= high)
    return (low < x) & (x < high)


def control_cost(weight: float, action: jax.Array) -> jax.Array:
    return weight * jnp.sum(jnp.square(action))


@functools.cache
def _warp_budget_bits() -> int:
    """Warp's overflow flags for budgets (contacts, constraint rows), not solver caps."""
    from mujoco.mjx.third_party.mujoco_warp._src.types import OverflowType as Flag

    return int(Flag.ALL & ~(Flag.ITERATIONS | Flag.LS_ITERATIONS))


def _quiet_warp() -> None:
    """Warp prints a line per kernel module it loads; keep the console for the run."""
    import warp

    warp.config.log_level = max(warp.config.log_level, warp.LOG_WARNING)


def _warp_budget(model: mujoco.MjModel) -> tuple[int, int]:
    """Contacts and constraint rows one world can need: the JAX impl's slot counts, which
    hold every contact the model's geom pairs can make (and their rows, all active)."""
    data = mjx.make_data(mjx.put_model(model, impl="jax"), device=local_device())
    return int(data._impl.contact.dist.shape[0]), int(data._impl.efc_J.shape[0])


def impl_field(data: mjx.Data, name: str) -> Any:
    """A field MJX keeps in its backend-specific part of ``Data`` (e.g. ``cfrc_ext``)."""
    return getattr(data._impl, name)
