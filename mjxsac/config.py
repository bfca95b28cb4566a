"""The run configuration: one frozen dataclass, a docstring per field, and each field's
kind declared on it (``shape``, ``population``, ``data``, ``host``):

* *shape* fields decide the compiled programs (task, algorithm, sizes, network widths,
  updates per step); the programs see them alone, through ``ProgramConfig``;
* *population* fields (``seeds``, ``vary``) say which members one program trains;
* *data* fields (the seed, learning rates, gamma, tau, reward scale, temperature
  settings, Adam's betas and weight decay) are carried in the TrainState as per-member
  arrays, so changing them never recompiles and they may differ across members;
* *host-only* fields never reach the device.

Every set of fields by kind (``HOST_ONLY``, ``DATA``, ``VARIABLE``, ``RESUMABLE``,
``HPARAMS``, ``OPTIMIZER_SETTINGS``) is derived from the declarations. A run is a
population of members (``seeds`` x the grid of ``vary``); one member is an ordinary run.
Derived sizes are properties, and ``validate`` refuses impossible settings before
anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from mjxsac import __version__

ALGOS = ("sac-v2", "sac-v1")
FORMAT_VERSION = 1
"""The layout of what a run saves (its config, the checkpoint items, the TrainState's
tree). Written with every config and checkpoint; one of another version is refused,
naming both (no code is kept to read older layouts). Raise it with any such change."""
# More members than one program should step (the list of members alone would not fit long
# before the replay buffers do): refused before anything is built.
MAX_MEMBERS = 10_000


# ---- a field's kind, declared on the field ----------------------------------------------------
# Everything that treats fields by kind (what the compiled programs see, what a population
# varies, what a resume may change, the TrainState's hyperparameters and optimizer
# settings) is derived from these declarations, after the class.


def shape(default: Any, *, resumable: bool = False) -> Any:
    """A field the compiled programs are built for (a size, a choice of code); a resume
    keeps it unless ``resumable`` (a program it changes is compiled anew)."""
    return dataclasses.field(default=default, metadata={"kind": "shape", "resumable": resumable})


def population(default: Any) -> Any:
    """A field that says which members one program trains (their number is a shape)."""
    return dataclasses.field(default=default, metadata={"kind": "population", "resumable": False})


def data(
    default: Any,
    *,
    into: str = "",
    optimizer: str = "",
    of: tuple[str, ...] = (),
    vary: bool = True,
    resumable: bool = True,
) -> Any:
    """A per-member value carried in the TrainState as an array: ``into`` "hparams" (the
    state's hyperparameters) or "keys" (the seed), or ``optimizer``: the name of an optax
    setting held in the optimizer states ``of`` (every one that has it when empty)."""
    meta = {"kind": "data", "into": "optimizer" if optimizer else into, "setting": optimizer,
            "of": of, "vary": vary, "resumable": resumable}  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


def host(default: Any) -> Any:
    """A field the compiled programs never read: the run around them."""
    return dataclasses.field(default=default, metadata={"kind": "host", "resumable": True})


class FormatVersionError(ValueError):
    """A saved config (so its run or checkpoint) of another format version."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs; ``mjxsac-train --help`` lists it."""

    # ---- shape: the task and its envs (the compiled programs depend on these) ----------------
    env: str = shape("InvertedPendulum")
    """Task name: InvertedPendulum, Hopper, Walker2d, HalfCheetah, Ant, Humanoid, Swimmer."""
    algo: Literal["sac-v2", "sac-v1"] = shape("sac-v2")
    """sac-v2: twin target Qs, automatic temperature (2018b). sac-v1: soft V network with a
    target V, twin Q, fixed temperature expressed as a reward scale (2018a)."""
    episode_length: int = shape(1000)
    """Time limit in env steps (Gymnasium's v5 tasks: 1000); truncation bootstraps."""
    env_options: str = shape("")
    """Task options as 'key=value,...': Gymnasium's keyword arguments of the task (e.g.
    'ctrl_cost_weight=0.1') or simulator speed options (e.g.
    'integrator=euler'; docs/ENVIRONMENTS.md gives their measured fidelity cost). Empty:
    Gymnasium's defaults, its XML, and the task's measured solver caps;
    'iterations=xml,ls_iterations=xml' restores the XML's solver settings."""
    num_envs: int = shape(16)
    """Environments stepped in parallel; each train step adds num_envs transitions."""
    eval_envs: int = shape(10, resumable=True)
    """Episodes per evaluation, run in parallel with the deterministic (mean) action."""

    # ---- shape: sizes and the training loop --------------------------------------------------
    warmup_steps: int = shape(2_000)
    """Environment steps with uniform random actions before the policy acts; SAC updates
    start then too, unless ``learning_starts`` says otherwise."""
    updates_per_step: int = shape(4)
    """SAC gradient updates per train step (one train step = one step of every env);
    0 collects data only (for throughput measurements)."""
    batch_size: int = shape(256)
    """Transitions per gradient update."""
    buffer_size: int = shape(1_000_000)
    """Replay capacity in transitions."""
    hidden_sizes: tuple[int, ...] = shape((256, 256))
    """Hidden layer widths of the actor, critics and V network."""
    activation: Literal["relu", "elu", "gelu", "silu", "tanh"] = shape("relu")
    """Hidden activation."""
    critic_layer_norm: bool = shape(False)
    """LayerNorm after each hidden layer of the critics (and V network)."""
    steps_per_chunk: int = shape(100)
    """Train steps fused into one compiled ``lax.scan``; the host logs between chunks."""
    learning_starts: int | None = shape(None)
    """Env steps (transitions in the buffer) before SAC updates start, apart from the
    random-action warm-up (``warmup_steps``), as in the authors' code (1,000 random steps,
    updates from 1,000 stored samples). At least batch_size and at most buffer_size. None:
    max(warmup_steps, batch_size)."""
    n_step: int = shape(1)
    """Return horizon of the critic targets: the discounted sum of up to n rewards of one
    env, then gamma^k times the bootstrap value. A window stops at a termination (no
    bootstrap), at a truncation (bootstrap from the final observation), and at the newest
    stored step; it never crosses an auto-reset. 1: one-step targets."""
    desync_episodes: bool = shape(False)
    """Start each training env's time-limit counter at a random step in [0,
    episode_length), so that the envs do not all truncate on the same step (only each env's
    first episode is shortened). Evaluation envs always run full episodes."""

    # ---- shape: the policy, the critics and their optimizers (the FastSAC recipe's options too)
    log_std_min: float = shape(-5.0)
    """Lower bound of the policy's log standard deviation."""
    log_std_max: float = shape(2.0)
    """Upper bound of the policy's log standard deviation."""
    log_std_clamp: Literal["smooth", "hard"] = shape("smooth")
    """How the policy's log standard deviation is bounded: 'smooth' maps the network's
    output through tanh onto [log_std_min, log_std_max] (gradients never vanish; an output
    of 0 is the interval's midpoint); 'hard' clips it as the authors' code does (haarnoja/sac,
    softlearning: [-20, 2]; an output of 0 is log std 0, and gradients vanish outside)."""
    normalize_obs: bool = shape(True)
    """Normalize observations with running mean/variance from the collected data."""
    critic: Literal["mse", "c51"] = shape("mse")
    """mse: each critic regresses a scalar Q onto the soft Bellman target (the papers).
    c51: twin categorical critics, ``num_atoms`` logits each over the support [v_min,
    v_max]; the target distribution (the target critic with the lower expected value, its
    atoms shifted by the soft Bellman backup) is projected onto the support and learned by
    cross-entropy; the actor maximizes the expected value. Size the support to the task's
    returns times reward_scale (docs/DESIGN.md)."""
    num_atoms: int = shape(101)
    """Atoms of the c51 critics' support."""
    v_min: float = shape(-1_500.0)
    """Lowest atom of the c51 support, a Q value (so in units of reward_scale * reward).
    An untrained critic predicts the support's midpoint: keep it near 0."""
    v_max: float = shape(1_500.0)
    """Highest atom of the c51 support; targets beyond the ends land on the end atoms."""
    actor_q: Literal["min", "mean"] = shape("min")
    """How the actor combines the twin critics' Q estimates: min (the papers) or mean
    (FastSAC, FastTD3 without clipped double Q). The critic target keeps the minimum."""
    policy_delay: int = shape(1)
    """The actor and the temperature are updated on every policy_delay-th critic update
    (the target networks on every update); 1: on every update."""
    optimizer: Literal["adam", "adamw"] = shape("adam")
    """adam, or adamw: Adam with decoupled weight decay (``weight_decay``) on the actor,
    critics and V network (never on log(alpha))."""
    max_grad_norm: float | None = shape(None)
    """Clip each network's gradient to this global norm before the optimizer (not
    log(alpha)'s); None or 0: no clipping."""
    compute_dtype: Literal["float32", "bfloat16"] = shape("float32")
    """Dtype of the networks' matrix products. Parameters and optimizer states stay
    float32, LayerNorm and the network outputs are float32, and so are the losses, the
    Gaussian log-probability and the tanh correction."""

    # ---- population: which members one program trains (its size is a shape) ------------------
    seeds: str = population("")
    """A population's seeds: '0-7' or '0,3,5'. Empty: the one ``seed``."""
    vary: tuple[str, ...] = population(())
    """Data fields varied across the population, each 'field=v1,v2,...' (e.g.
    'critic_lr=1e-4,3e-4'); the population is the grid of the values times the seeds. On
    the command line: ``--vary critic_lr=1e-4,3e-4 --vary gamma=0.97,0.99``."""

    # ---- data: per member, carried in the TrainState (never recompiles; --vary may vary them)
    seed: int = data(0, into="keys", vary=False, resumable=False)
    """Seeds everything: network init, exploration, env resets, replay sampling."""
    gamma: float = data(0.99, into="hparams")
    """Discount factor."""
    tau: float = data(0.005, into="hparams")
    """Polyak averaging rate of the target networks."""
    actor_lr: float = data(3e-4, optimizer="learning_rate", of=("actor_opt",))
    """Adam learning rate of the policy."""
    critic_lr: float = data(3e-4, optimizer="learning_rate", of=("critic_opt", "value_opt"))
    """Adam learning rate of the Q networks (and the V network of sac-v1)."""
    alpha_lr: float = data(3e-4, optimizer="learning_rate", of=("alpha_opt",))
    """Adam learning rate of log(alpha) (sac-v2)."""
    init_alpha: float = data(1.0, into="hparams")
    """Initial temperature (sac-v2); sac-v1 keeps alpha = 1 and scales rewards instead."""
    target_entropy: float | None = data(None, into="hparams")
    """Target policy entropy for sac-v2 in nats of the [-1, 1] action box; None: -|A|."""
    reward_scale: float = data(1.0, into="hparams")
    """Multiplies rewards in the critic targets. In sac-v1 it is the inverse temperature
    (the paper used 5 for most tasks and 20 for Humanoid)."""
    weight_decay: float = data(0.001, optimizer="weight_decay")
    """AdamW's decoupled weight decay (optimizer adamw only; adam has none)."""
    adam_b1: float = data(0.9, optimizer="b1")
    """Adam's first-moment decay (all optimizers, the temperature's too)."""
    adam_b2: float = data(0.999, optimizer="b2")
    """Adam's second-moment decay (all optimizers; FastSAC uses 0.95)."""

    # ---- host-only: the run around the programs (a resume may change them) -------------------
    preset: str = host("default")
    """Which preset of ``mjxsac/presets.py`` supplied the defaults (recorded for the run)."""
    total_steps: int = host(20_000)
    """Environment steps to train for (rounded up to whole chunks)."""
    eval_every: int = host(5)
    """Evaluate every this many chunks (and after the last)."""
    run_dir: str = host("")
    """Where to write the run (config, metrics, curve, checkpoints). Empty: runs/<name>."""
    checkpoint_every: int = host(10)
    """Save a checkpoint every this many chunks (and at the end, and on SIGINT/SIGTERM)."""
    keep_checkpoints: int = host(3)
    """Keep the latest this many checkpoints (plus the best by eval return)."""
    save_buffer: bool = host(False)
    """Put the replay buffer into checkpoints, so that a resumed run continues exactly."""
    wandb: bool = host(False)
    """Log to Weights & Biases (offline or disabled through WANDB_MODE)."""
    wandb_project: str = host("mjxsac")
    """wandb project name."""
    wandb_entity: str | None = host(None)
    """wandb entity (user or team); None: wandb's default."""
    devices: int | None = host(None)
    """Devices the run spreads over (the first this many of JAX's default platform):
    members over devices, and with fewer members than devices each member's envs, replay
    rows and batch (data parallel). None: every device (the ``jax_default_device`` alone
    if one is set)."""

    # ---- derived -----------------------------------------------------------------------------

    @property
    def env_steps_per_chunk(self) -> int:
        return self.num_envs * self.steps_per_chunk

    @property
    def num_chunks(self) -> int:
        return max(1, math.ceil(self.total_steps / self.env_steps_per_chunk))

    @property
    def update_start(self) -> int:
        """Transitions the buffer must hold before updates start (``learning_starts``)."""
        if self.learning_starts is None:
            return max(self.warmup_steps, self.batch_size)
        return self.learning_starts

    def validate(self) -> Config:
        """Refuse impossible settings with a message naming the field."""
        import envs

        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            _check_type(field.name, getattr(self, field.name), hints[field.name])
        if self.env not in envs.NAMES:
            raise ValueError(f"unknown env {self.env!r}; valid: {', '.join(envs.NAMES)}")
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}; valid: {', '.join(ALGOS)}")
        positive = (
            "num_envs total_steps batch_size buffer_size steps_per_chunk "
            "eval_every eval_envs episode_length checkpoint_every keep_checkpoints n_step"
        )
        for name in positive.split():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.devices is not None and (isinstance(self.devices, bool) or self.devices < 1):
            raise ValueError(f"devices must be a positive integer, got {self.devices!r}")
        for name in ("warmup_steps", "updates_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive widths, got {self.hidden_sizes}")
        if self.n_step > self.episode_length:
            raise ValueError(
                f"n_step ({self.n_step}) exceeds episode_length ({self.episode_length}): a "
                "window never crosses an episode's end; lower n_step"
            )
        if self.n_step * self.num_envs > self.buffer_size:
            raise ValueError(
                f"n_step ({self.n_step}) windows span n_step x num_envs = "
                f"{self.n_step * self.num_envs:,} rows of the buffer, more than buffer_size "
                f"({self.buffer_size:,}): lower n_step or raise buffer_size"
            )
        _check_data(self, "")
        if isinstance(self.num_atoms, bool) or self.num_atoms < 2:
            raise ValueError(f"num_atoms must be an integer >= 2, got {self.num_atoms!r}")
        if self.v_min >= self.v_max:
            raise ValueError(f"v_min ({self.v_min}) must be below v_max ({self.v_max})")
        if isinstance(self.policy_delay, bool) or self.policy_delay < 1:
            raise ValueError(f"policy_delay must be a positive integer, got {self.policy_delay!r}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(
                f"max_grad_norm must be >= 0 (0 or None: off), got {self.max_grad_norm}"
            )
        if self.optimizer == "adam" and "weight_decay" in self.varied():
            raise ValueError("--vary weight_decay needs optimizer adamw (adam has no weight decay)")
        if self.log_std_min >= self.log_std_max:
            raise ValueError("log_std_min must be below log_std_max")
        if self.num_envs > self.buffer_size:
            raise ValueError(
                f"buffer_size ({self.buffer_size}) is smaller than one step of all envs "
                f"(num_envs {self.num_envs})"
            )
        if self.warmup_steps > self.buffer_size:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) exceeds the replay capacity "
                f"({self.buffer_size} transitions): raise buffer_size or lower warmup_steps"
            )
        if self.batch_size > self.buffer_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) exceeds the replay capacity ({self.buffer_size})"
            )
        starts = self.learning_starts
        if starts is not None and not self.batch_size <= starts <= self.buffer_size:
            raise ValueError(
                f"learning_starts ({starts}) must be between batch_size ({self.batch_size}) "
                f"and buffer_size ({self.buffer_size})"
            )
        envs.check_options(self.env, self.env_kwargs())
        members = self.member_configs()  # --vary values: checked as each member's
        for i, member in enumerate(members):
            _check_data(member, f"member {i}" if len(members) > 1 else "")
        return self

    def check_run(self) -> Config:
        """Refuse a run that would train in vain: updates that never start."""
        run_steps = self.num_chunks * self.env_steps_per_chunk
        if self.updates_per_step > 0 and run_steps < self.update_start:
            starts = "learning_starts" if self.learning_starts is not None else "warmup_steps"
            raise ValueError(
                f"no update would ever happen: updates start after {self.update_start:,} env "
                f"steps ({starts}), but the run has {run_steps:,} (total_steps, in whole "
                f"chunks of {self.env_steps_per_chunk:,}): raise total_steps or lower {starts}"
            )
        return self

    def env_kwargs(self) -> dict[str, int | float | bool | str | tuple]:
        """Parse ``env_options`` ('key=value,...') into ``envs.make`` keyword arguments. A
        tuple option takes several values: 'healthy_z_range=0.5,inf' (or '=(0.5, inf)');
        an item without '=' continues the value before it."""
        values: dict[str, list[str]] = {}
        key = None
        for item in filter(None, (s.strip() for s in self.env_options.split(","))):
            name, sep, value = item.partition("=")
            if sep:
                key = name.strip()
                if not key:
                    raise ValueError(f"env option {item!r} must look like key=value")
                values[key] = [value]
            elif key is None:
                raise ValueError(f"env option {item!r} must look like key=value")
            else:
                values[key].append(item)
        out: dict[str, int | float | bool | str | tuple] = {}
        for key, parts in values.items():
            text = ",".join(parts).strip()
            bracketed = text[:1] in "([" and text[-1:] in ")]"
            items = [p.strip() for p in (text[1:-1] if bracketed else text).split(",")]
            if bracketed or len(items) > 1:
                out[key] = tuple(parse_scalar(p) for p in items)
            else:
                out[key] = parse_scalar(items[0])
        return out

    def compiled_identity(self) -> tuple[Config, int]:
        """What the compiled programs depend on: this config with only its shape fields
        (the others at their defaults), and the population's size."""
        reset = FIELDS_BY_KIND["host"] | FIELDS_BY_KIND["data"] | FIELDS_BY_KIND["population"]
        return dataclasses.replace(self, **{f: _DEFAULTS[f] for f in reset}), len(self.members())

    def program_view(self) -> ProgramConfig:
        """The config as the compiled programs see it (``ProgramConfig``)."""
        return ProgramConfig(self)

    # ---- the population ------------------------------------------------------------------

    def seed_list(self) -> list[int]:
        """The seeds of ``seeds`` ('0-7', '0,3,5', '1-3,8'), or ``[seed]``."""
        if not self.seeds.strip():
            return [self.seed]
        parts: list[range] = []
        for part in filter(None, (p.strip() for p in self.seeds.split(","))):
            low, sep, high = part.partition("-")
            try:
                values = range(int(low), int(high) + 1) if sep else range(int(low), int(low) + 1)
            except ValueError:
                raise ValueError(f"seeds must look like 0-7 or 0,3,5, got {self.seeds!r}") from None
            if not values:
                raise ValueError(f"seeds range {part!r} is empty")
            parts.append(values)
        count = sum(len(r) for r in parts)
        if count > MAX_MEMBERS:
            raise ValueError(
                f"seeds {self.seeds!r} make {count:,} members; a population holds at most "
                f"{MAX_MEMBERS:,} (one program steps them all)"
            )
        out = [s for r in parts for s in r]
        if len(set(out)) != len(out):
            raise ValueError(f"seeds repeat a seed: {self.seeds!r}")
        return out

    def varied(self) -> dict[str, list[float]]:
        """``vary`` parsed: field -> values, in the order given."""
        out: dict[str, list[float]] = {}
        for item in self.vary:
            name, sep, values = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or not values.strip():
                raise ValueError(f"--vary {item!r} must look like field=v1,v2")
            if name not in VARIABLE:
                kind = "the population's seeds (use seeds)" if name == "seed" else (
                    "a shape of the program: run separate populations" if name in _FIELDS
                    else "not a config field")  # fmt: skip
                raise ValueError(
                    f"--vary {name}: {kind}; variable fields: {', '.join(sorted(VARIABLE))}"
                )
            if name in out:
                raise ValueError(f"--vary {name} is given twice")
            try:
                out[name] = [float(v) for v in values.split(",")]
            except ValueError:
                raise ValueError(f"--vary {item!r}: values must be numbers") from None
            if not all(map(math.isfinite, out[name])):
                raise ValueError(f"--vary {item!r}: values must be finite numbers")
        return out

    def members(self) -> list[dict]:
        """Each member's index, seed and varied values: the grid of ``vary`` (first field
        slowest) times the seeds (fastest)."""
        varied = self.varied()
        seeds = self.seed_list()
        count = len(seeds) * math.prod(len(v) for v in varied.values())
        if count > MAX_MEMBERS:
            raise ValueError(
                f"seeds and vary make {count:,} members; a population holds at most "
                f"{MAX_MEMBERS:,} (one program steps them all)"
            )
        grid: list[dict] = [{}]
        for name, values in varied.items():
            grid = [{**g, name: v} for g in grid for v in values]
        rows = [{"seed": s, **g} for g in grid for s in seeds]
        return [{"index": i, **row} for i, row in enumerate(rows)]

    def member(self, index: int) -> Config:
        """The ordinary (one-member) run that member ``index`` of this population is."""
        return self._member(self.members()[index])

    def member_configs(self) -> list[Config]:
        """Every member's ``member(index)``, the members listed once."""
        return [self._member(row) for row in self.members()]

    def _member(self, row: dict) -> Config:
        values = {k: v for k, v in row.items() if k != "index"}
        return dataclasses.replace(self, seeds="", vary=(), **values)

    @property
    def population_size(self) -> int:
        return len(self.members())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        d["vary"] = list(self.vary)
        return d

    def to_saved(self) -> dict:
        """``to_dict`` with the format version: what a run writes (config.json, the
        checkpoints' config item)."""
        return {"format_version": FORMAT_VERSION, **self.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Inverse of ``to_dict``; unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(hints[k], v) for k, v in d.items()})

    @classmethod
    def from_saved(cls, d: dict) -> Config:
        """``from_dict`` for a config a run wrote: every field must be there (a config item
        that lost fields is damaged, not a request for the defaults)."""
        if not isinstance(d, dict):
            raise ValueError(f"the saved config is not a JSON object: {d!r:.80}")
        d = dict(d)
        version = d.pop("format_version", None)
        # Without a version, only a whole config is an older layout; a part is damage.
        if version != FORMAT_VERSION and (version is not None or {"env", "algo"} <= set(d)):
            written = "no format version (written before versions)" if version is None else (
                f"format version {version!r}"
            )  # fmt: skip
            raise FormatVersionError(
                f"it has {written}; this mjxsac {__version__} reads format version "
                f"{FORMAT_VERSION} only: train anew, or use the mjxsac that wrote it"
            )
        missing = sorted({f.name for f in dataclasses.fields(cls)} - set(d))
        if missing:
            named = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            raise ValueError(f"the saved config lacks {len(missing)} fields ({named})")
        return cls.from_dict(d)


FIELDS_BY_KIND: dict[str, frozenset[str]] = {
    kind: frozenset(f.name for f in dataclasses.fields(Config) if f.metadata["kind"] == kind)
    for kind in ("shape", "population", "data", "host")
}
_META = {f.name: f.metadata for f in dataclasses.fields(Config)}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
HOST_ONLY = FIELDS_BY_KIND["host"]
"""Fields the compiled programs never read: two configs that differ only here compile to
the same programs."""
DATA = FIELDS_BY_KIND["data"]
"""Fields the TrainState carries as per-member arrays (``Config.members``)."""
VARIABLE = frozenset(name for name in DATA if _META[name]["vary"])
"""Data fields a population may vary (``--vary``); the seed varies through ``seeds``."""
RESUMABLE = frozenset(name for name, meta in _META.items() if meta["resumable"])
"""Fields a resume may change."""
HPARAMS = tuple(name for name, meta in _META.items() if meta.get("into") == "hparams")
"""The TrainState's ``hparams``: one array per member each (``Trainer.data``)."""
OPTIMIZER_SETTINGS = tuple(
    (name, meta["setting"], meta["of"])
    for name, meta in _META.items()
    if meta.get("into") == "optimizer"
)
"""(field, optax setting, the optimizer states that take it, or () for every one that has
it): set in the optimizer states per member (``sac.set_optimizer_data``)."""
PROGRAM_DERIVED = frozenset({"env_steps_per_chunk", "update_start", "env_kwargs"})
"""What a ``ProgramConfig`` offers besides the shape fields: derived from shapes alone."""


class ProgramConfig:
    """The config as the compiled programs see it: its shape fields and what is derived
    from them alone. Reading a data, population or host-only field raises, so a value
    that a program must take as data (or never read) cannot be baked into a program that
    jit then reuses for another value. Equal (and hashed alike) for configs whose
    programs are the same (``Config.compiled_identity``)."""

    __slots__ = ("_config", "_identity")

    def __init__(self, config: Config) -> None:
        object.__setattr__(self, "_identity", config.compiled_identity())
        object.__setattr__(self, "_config", self._identity[0])

    def __getattr__(self, name: str) -> Any:
        kind = _META[name]["kind"] if name in _META else None
        if kind == "shape" or name in PROGRAM_DERIVED:
            return getattr(self._config, name)
        if kind is None:
            raise AttributeError(f"a program's config has no {name!r}")
        where = {
            "data": "it is per-member data: read it from the TrainState (hparams, keys or "
            "optimizer states)",
            "population": "the population is the host's; a program sees its member axis",
            "host": "it is host-only: the host loop reads it",
        }[kind]
        raise AttributeError(f"config.{name} is not for compiled programs: {where}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a program's config is read-only")

    def __hash__(self) -> int:
        return hash(self._identity)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProgramConfig) and self._identity == other._identity

    def __repr__(self) -> str:
        return f"ProgramConfig({self._identity[0]!r}, members={self._identity[1]})"


def _check_data(config: Config, who: str) -> None:
    where = f" ({who})" if who else ""
    for name in ("gamma", "tau"):
        value = getattr(config, name)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}{where}")
    for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha", "reward_scale"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}{where}")
    for name in ("adam_b1", "adam_b2"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}{where}")
    if not config.weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}{where}")


def _check_type(name: str, value, kind) -> None:
    """Refuse a value of the wrong type (JSON and wandb hand over untyped values)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name} must be one of {', '.join(args)}, got {value!r}")
        ok = True
    elif origin is tuple:
        item = args[0]
        ok = isinstance(value, tuple) and all(_type_ok(v, item) for v in value)
    elif origin in (typing.Union, types.UnionType):
        ok = any(_type_ok(value, k) for k in args)
    else:
        ok = _type_ok(value, kind)
    if not ok:
        raise ValueError(f"{name} must be of type {kind}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _type_ok(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _coerce(kind, value):
    """Bring a value from JSON or a wandb sweep to the field's type (lists to tuples,
    whole floats to ints, 'true'/'false' to booleans)."""
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if typing.get_origin(kind) is tuple and isinstance(value, list | tuple):
        item = typing.get_args(kind)[0]
        return tuple(int(v) if item is int else v for v in value)
    return value


def parse_scalar(text: str) -> int | float | bool | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))
