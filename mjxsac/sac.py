"""The fused SAC pipeline: acting, env stepping, replay and updates in one ``lax.scan``.

A run is a population of P members (P = 1 is an ordinary run, through the same code):
every leaf of the ``TrainState`` has a leading member axis, and each member has its own
seed, parameters, optimizer states, temperature, normalizer, buffer, envs, keys and data
hyperparameters (``dict[str, jax.Array]``, and the learning rates, betas and weight decay inside the
optimizer states). Three
levels, each short:

* ``update(state, key)``: one SAC gradient update (v1 or v2) of one member;
* ``train_step(state)``: every member acts on all its envs (``act``, vmapped), all
  members' envs step as one batch (``step_envs``), every member inserts (``record``),
  then ``updates_per_step`` updates (vmapped) once the buffers
  hold ``learning_starts`` transitions (by default the warm-up's);
* ``train_chunk = jit(scan(train_step))``: ``steps_per_chunk`` train steps without
  leaving the device. The host sees the ``TrainState`` only between chunks.

Over several devices (``make_mesh``: members spread, or a member's envs split, data
parallel) each level runs per device on its own block (``shard_map``): the same code, with
the local sizes (``local_envs``, ``local_batch``, ...) and, over a member's devices only,
the gradients, normalizer statistics and metrics averaged (docs/DESIGN.md, "Scale-out").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import envs
from envs import scale_action
from mjxsac import buffer as replay
from mjxsac import normalizer as obs_norm
from mjxsac.config import HPARAMS, OPTIMIZER_SETTINGS, Config
from mjxsac.losses import (
    ACTOR_METRICS,
    Nets,
    Support,
    Transition,
    actor_loss,
    alpha_loss,
    categorical_critic_loss_v1,
    categorical_critic_loss_v2,
    critic_loss_v1,
    critic_loss_v2,
    gradient_step,
    polyak,
    value_loss_v1,
)
from mjxsac.networks import Actor, DoubleQ, Value, deterministic_action, sample_action

Params = Any
MEMBER, ENV = "member", "env"
"""The mesh's axes: members over devices, and one member's envs over devices."""
# CPU backends cannot reuse donated buffers; the donation still matters on GPU.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


@struct.dataclass
class TrainState:
    """Everything that changes during training, carried through ``lax.scan``; in a run,
    every leaf has a leading member axis."""

    actor: Params
    critic: Params
    target_critic: Params
    value: Params | None
    """SAC v1 only."""
    target_value: Params | None
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    value_opt: optax.OptState | None
    alpha_opt: optax.OptState | None
    """SAC v2 only."""
    log_alpha: jax.Array
    normalizer: obs_norm.Normalizer
    buffer: replay.ReplayBuffer
    env_state: envs.State
    episode_return: jax.Array
    """Return so far of each env's current episode."""
    key: jax.Array
    env_steps: jax.Array
    updates: jax.Array
    hparams: dict[str, jax.Array]
    """A member's data hyperparameters (``config.HPARAMS``), as arrays: changing them never
    recompiles. (The optimizer settings live in the optimizer states, through
    ``optax.inject_hyperparams``.)"""


OPTIMIZER_STATES = ("actor_opt", "critic_opt", "value_opt", "alpha_opt")


class Trainer:
    """The static half of a run: config, envs, networks, optimizers, compiled functions."""

    def __init__(self, config: Config, devices: Sequence[jax.Device] | None = None):
        self.run_config = config.validate()
        """The whole config, for the host: members, data, checkpoints, logs."""
        self.config = c = config.program_view()
        """What the compiled programs may read: the shape fields (``ProgramConfig``)."""
        self.members = config.member_configs()
        devices = list(devices) if devices else [default_device()]
        self.mesh = make_mesh(devices, len(self.members), c)
        """Members over the ``member`` axis, each member's envs (with their replay rows and
        evaluation episodes) over the ``env`` axis; every program runs per device
        (``shard_map``), the same program on one device as on many."""
        self.env_shards = shards = self.mesh.shape[ENV]
        self.local_envs, self.local_capacity = c.num_envs // shards, c.buffer_size // shards
        self.local_batch, self.local_eval_envs = c.batch_size // shards, c.eval_envs // shards
        self.env = envs.make(c.env, **c.env_kwargs())
        # Every physics call steps all of a device's members' envs as one batch.
        local_members = len(self.members) // self.mesh.shape[MEMBER]
        self.env.reserve(local_members * max(self.local_envs, self.local_eval_envs))
        self.train_env = envs.wrap(self.env, self.local_envs, c.episode_length, compact=True)
        limited = envs.TimeLimit(self.env, c.episode_length)
        self.eval_env = envs.VmapEnv(limited, self.local_eval_envs, compact=True)
        self.obs_size, self.action_size = self.env.observation_size, self.env.action_size
        hidden, dtype = tuple(c.hidden_sizes), c.compute_dtype
        self.actor = Actor(hidden, self.action_size, c.activation, c.log_std_min, c.log_std_max,
                           log_std_clamp=c.log_std_clamp, dtype=dtype)  # fmt: skip
        atoms = c.num_atoms if c.critic == "c51" else 1
        self.critic = DoubleQ(hidden, c.activation, c.critic_layer_norm, num_atoms=atoms,
                              dtype=dtype)  # fmt: skip
        self.value = Value(hidden, c.activation, c.critic_layer_norm, dtype) if self.v1 else None
        self.nets = Nets(
            actor=self.actor.apply,
            critic=self.critic.apply,
            value=self.value.apply if self.value else None,
            support=Support(c.v_min, c.v_max, c.num_atoms) if c.critic == "c51" else None,
        )
        self.actor_opt = self.critic_opt = make_optimizer(c, network=True)
        self.alpha_opt = make_optimizer(c, network=False)
        self.learner = Learner(
            nets=self.nets, actor_opt=self.actor_opt, critic_opt=self.critic_opt,
            alpha_opt=self.alpha_opt, critic_loss=CRITIC_LOSSES[c.algo, c.critic],
            actor_q=c.actor_q, policy_delay=c.policy_delay,
            data_axis=ENV if shards > 1 else None,
        )  # fmt: skip

    # Trainers with equal program configs and meshes compile to the same programs: jit's
    # cache (keyed on the static trainer's hash) then serves a second trainer, e.g. a
    # resumed run's.
    def __hash__(self) -> int:
        return hash((self.config, self.mesh))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Trainer) and self.config == other.config and self.mesh == other.mesh
        )

    @property
    def population_size(self) -> int:
        return len(self.members)

    def data(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Each member's data hyperparameters (``HPARAMS``), and the optimizer settings
        (``OPTIMIZER_SETTINGS``: learning rates, Adam's betas, weight decay) by config
        field, stacked (host values)."""

        def stack(name: str) -> jax.Array:
            values = [getattr(m, name) for m in self.members]
            if name == "target_entropy":  # None: -|A|
                values = [-float(self.action_size) if v is None else v for v in values]
            return jnp.asarray(np.array(values, np.float32))

        settings = {name: stack(name) for name, _, _ in OPTIMIZER_SETTINGS}
        return {name: stack(name) for name in HPARAMS}, settings

    def init_args(self) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
        """The arguments of a fresh population: each member's training key (its seed's
        training branch, see ``run_keys``) and data."""
        keys = jnp.stack([run_keys(m.seed)[0] for m in self.members])
        return self.by_member((keys, *self.data()))

    def init(self) -> TrainState:
        """A fresh TrainState: initial parameters, empty buffers, reset envs."""
        return self.place(_jit_init(self, *self.init_args()))

    def set_data(self, state: TrainState) -> TrainState:
        """``state`` with this config's data hyperparameters and optimizer settings (a
        resumed run may change them)."""
        hparams, opt_data = self.by_member(self.data())
        return self.place(state.replace(hparams=hparams, **_with_optimizer_data(state, opt_data)))

    # ---- placement over the devices ------------------------------------------------------------

    def state_specs(self) -> TrainState:
        """How each field of the TrainState is split over the mesh (a prefix of its tree):
        everything by member; a member's envs, episode returns and replay rows also over
        the ``env`` axis (each device keeps its own envs' rows)."""
        member, spread = self.spec(MEMBER), self.spec(MEMBER, ENV)
        v1, v2 = (member, None) if self.v1 else (None, member)
        done = spread if self.config.n_step > 1 else None
        return TrainState(
            actor=member, critic=member, target_critic=member, value=v1, target_value=v1,
            actor_opt=member, critic_opt=member, value_opt=v1, alpha_opt=v2,
            log_alpha=member, normalizer=member, episode_return=spread, env_state=spread,
            buffer=replay.ReplayBuffer(data=spread, index=member, size=member, done=done),
            key=member, env_steps=member, updates=member, hparams=member,
        )  # fmt: skip

    def spec(self, *axes: str | None) -> P:
        """``PartitionSpec(*axes)`` as jit writes it back: without the mesh axes of size 1
        (and trailing Nones). Placed states then carry the very shardings a chunk
        returns, so the second chunk finds the first one's program."""
        names = [a if a is not None and self.mesh.shape[a] > 1 else None for a in axes]
        while names and names[-1] is None:
            names.pop()
        return P(*names)

    def shardings(self, tree: TrainState) -> Any:
        """A ``NamedSharding`` for every array of ``tree`` (a TrainState, or its shapes);
        an empty array replicated, as jit returns it."""

        def of(spec: P, x: Any) -> NamedSharding:
            return NamedSharding(self.mesh, spec if math.prod(x.shape) else P())

        return jax.tree.map(
            lambda spec, part: jax.tree.map(lambda x: of(spec, x), part),
            self.state_specs(), tree, is_leaf=lambda x: isinstance(x, P) or x is None,
        )  # fmt: skip

    def by_member(self, tree: Any) -> Any:
        """Host values with a leading member axis (the same in every process), as arrays
        spread over the devices by member (over several processes too: each process
        fills its own devices' blocks)."""
        sharding = NamedSharding(self.mesh, self.spec(MEMBER))

        def spread(x: Any) -> jax.Array:
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda block: x[block])

        return jax.tree.map(spread, tree)

    def place(self, state: TrainState) -> TrainState:
        """Commit every array to its devices. Fresh and restored states then look alike to
        ``jit`` (committed, equally sharded), so a resumed state reuses the compiled chunk."""
        return jax.device_put(state, self.shardings(state))

    def per_device(self, function: Callable, in_specs: Any, out_specs: Any) -> Callable:
        """``function`` run on every device on its own block of the arrays (``shard_map``);
        the only communication is what it asks for over the ``env`` axis."""
        return jax.shard_map(
            function, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def shard_key(self, key: jax.Array) -> jax.Array:
        """``key`` made this device's own along the ``env`` axis, for what each device draws
        for its own envs and replay rows (one device: ``key`` itself)."""
        if self.env_shards == 1:
            return key
        return jax.random.fold_in(key, jax.lax.axis_index(ENV))

    def across_envs(self, reduce: Callable, tree: Any) -> Any:
        """``reduce`` (``lax.psum`` or ``lax.pmean``) of ``tree`` over the ``env`` axis."""
        return tree if self.env_shards == 1 else reduce(tree, ENV)

    def train_chunk(self, state: TrainState) -> tuple[TrainState, dict]:
        """``steps_per_chunk`` train steps, compiled once; ``state`` is donated. Metrics
        are stacked (train step, member)."""
        return _jit_train_chunk(self, state)

    def evaluate(self, state: TrainState, chunk: int) -> tuple[jax.Array, jax.Array]:
        """Per-episode returns and lengths, (member, episode), of ``eval_envs``
        deterministic episodes per member, each member on its seed's evaluation keys."""
        return self.run_evaluation(state.actor, state.normalizer, self.eval_keys(chunk))

    def eval_keys(self, chunk: int) -> jax.Array:
        """Each member's evaluation key of ``chunk`` (its seed's evaluation branch)."""
        keys = [jax.random.fold_in(run_keys(m.seed)[1], chunk) for m in self.members]
        return self.by_member(jnp.stack(keys))

    def run_evaluation(self, actor: Params, normalizer: obs_norm.Normalizer, keys: jax.Array):
        return _jit_evaluate(self, actor, normalizer, keys)

    # Ahead-of-time stages (jit's trace -> lower -> compile), for compiling in the
    # background or in another process, and for measuring each stage
    # (launch/bench_compile.py, launch/gpu_check.py).
    def trace_init(self) -> jax.stages.Traced:
        return _jit_init.trace(self, *self.init_args())

    def trace_train_chunk(self, state: TrainState) -> jax.stages.Traced:
        return _jit_train_chunk.trace(self, state)

    def trace_evaluate(self, actor: Params, normalizer: obs_norm.Normalizer, keys: jax.Array):
        return _jit_evaluate.trace(self, actor, normalizer, keys)

    @property
    def v1(self) -> bool:
        return self.config.algo == "sac-v1"

    # ---- state ----------------------------------------------------------------------------

    def _init(self, keys: jax.Array, hparams: dict[str, jax.Array], opt_data: dict) -> TrainState:
        local = self.per_device(self._init_local, self.spec(MEMBER), self.state_specs())
        return local(keys, hparams, opt_data)

    def _init_local(self, keys: jax.Array, hparams: dict, opt_data: dict) -> TrainState:
        state = jax.vmap(self._init_member)(keys, hparams)
        return state.replace(**_with_optimizer_data(state, opt_data))

    def _init_member(self, key: jax.Array, hparams: dict[str, jax.Array]) -> TrainState:
        c = self.config
        k_actor, k_critic, k_value, k_env, key = jax.random.split(key, 5)
        env_state = self.train_env.reset(self.shard_key(k_env))
        if c.desync_episodes:
            key, k_desync = jax.random.split(key)
            env_state = envs.desynchronize(env_state, self.shard_key(k_desync), c.episode_length)
        obs = jnp.zeros((1, self.obs_size))
        act = jnp.zeros((1, self.action_size))
        actor = self.actor.init(k_actor, obs)
        critic = self.critic.init(k_critic, obs, act)
        value = self.value.init(k_value, obs) if self.v1 else None
        return TrainState(
            actor=actor,
            critic=critic,
            target_critic=critic,
            value=value,
            target_value=value,
            actor_opt=self.actor_opt.init(actor),
            critic_opt=self.critic_opt.init(critic),
            value_opt=self.critic_opt.init(value) if self.v1 else None,
            alpha_opt=None if self.v1 else self.alpha_opt.init(jnp.zeros(())),
            log_alpha=jnp.zeros((), jnp.float32) if self.v1 else jnp.log(hparams["init_alpha"]),
            normalizer=obs_norm.init(self.obs_size, c.normalize_obs),
            buffer=self.empty_buffer(),
            env_state=env_state,
            episode_return=jnp.zeros((self.local_envs,), jnp.float32),
            key=key,
            env_steps=jnp.zeros((), jnp.int32),
            updates=jnp.zeros((), jnp.int32),
            hparams=hparams,
        )

    def empty_buffer(self, capacity: int | None = None) -> replay.ReplayBuffer:
        """One member's empty replay buffer (with episode ends for n-step returns), of this
        device's rows by default (``capacity``: all the member's rows, e.g. ``buffer_size``)."""
        capacity = self.local_capacity if capacity is None else capacity
        return replay.init(capacity, self.obs_size, self.action_size, self.config.n_step > 1)

    # ---- level 1: one SAC update -------------------------------------------------------------

    def update(
        self, state: TrainState, key: jax.Array, number: jax.Array | None = None
    ) -> tuple[TrainState, dict]:
        """One gradient update of every network of one member from a uniformly replayed
        batch: ``update_v2`` or ``update_v1``. ``number``: the updates made before this
        one; pass it unbatched (the same for every member) so that a skipped actor update
        (``policy_delay``) is a real branch, not a select computing both."""
        k_batch, k_critic, k_actor, k_value = map(self.shard_key, jax.random.split(key, 4))
        batch, gamma = self.sample(state, k_batch)
        number = state.updates if number is None else number
        update = update_v1 if self.v1 else update_v2
        return update(self.learner, state, batch, gamma, (k_critic, k_actor, k_value), number)

    def sample(self, state: TrainState, key: jax.Array) -> tuple[Transition, jax.Array]:
        """A normalized batch of one member's buffer and each row's bootstrap discount
        (``gamma``, or ``gamma ** k`` for an n-step window of k rows)."""
        c, hp = self.config, state.hparams
        if c.n_step == 1:
            batch, gamma = replay.sample(state.buffer, key, self.local_batch), hp["gamma"]
        else:
            batch, k = replay.sample_n_step(
                state.buffer, key, self.local_batch, c.n_step, self.local_envs, hp["gamma"]
            )
            gamma = hp["gamma"] ** k
        normalized = batch.replace(
            obs=obs_norm.normalize(state.normalizer, batch.obs),
            next_obs=obs_norm.normalize(state.normalizer, batch.next_obs),
        )
        return normalized, gamma

    # ---- level 2: one step of every env of every member, then the updates ---------------------

    def act(self, state: TrainState) -> tuple[jax.Array, jax.Array]:
        """One member's actions on all its envs (uniform random during the warm-up) and
        its next key."""
        key, k_policy, k_random = jax.random.split(state.key, 3)
        k_policy, k_random = self.shard_key(k_policy), self.shard_key(k_random)
        obs = state.env_state.obs
        mean, log_std = self.actor.apply(state.actor, obs_norm.normalize(state.normalizer, obs))
        policy_action, _ = sample_action(mean, log_std, k_policy)
        random_action = jax.random.uniform(k_random, policy_action.shape, minval=-1, maxval=1)
        warming_up = state.env_steps < self.config.warmup_steps
        return jnp.where(warming_up, random_action, policy_action), key

    def record(
        self, state: TrainState, action: jax.Array, env_state: envs.State, key: jax.Array
    ) -> tuple[TrainState, dict]:
        """One member's step after its envs moved to ``env_state``: insert the
        transitions, update the normalizer and the episode returns."""
        c = self.config
        obs = state.env_state.obs
        rows = Transition(
            obs=obs,
            action=action,
            reward=env_state.reward,
            next_obs=env_state.final_obs,
            terminated=env_state.terminated,
        )
        done = env_state.terminated | env_state.truncated
        episode_return = state.episode_return + env_state.reward
        state = state.replace(
            buffer=replay.insert(state.buffer, rows, done if c.n_step > 1 else None),
            normalizer=obs_norm.update(state.normalizer, obs, ENV if self.env_shards > 1 else None),
            env_state=env_state,
            episode_return=jnp.where(done, 0.0, episode_return),
            key=key,
            env_steps=state.env_steps + c.num_envs,
        )
        sums = {
            "episodes": jnp.sum(done),
            "episode_return_sum": jnp.sum(jnp.where(done, episode_return, 0.0)),
        }
        if envs.OVERFLOW in env_state.metrics:  # Warp: steps that overflowed a budget
            sums[envs.OVERFLOW] = jnp.sum(env_state.metrics[envs.OVERFLOW])
        mean_reward = self.across_envs(jax.lax.pmean, jnp.mean(env_state.reward))
        return state, {**self.across_envs(jax.lax.psum, sums), "reward": mean_reward}

    def train_step(self, state: TrainState, _: Any = None) -> tuple[TrainState, dict]:
        c = self.config
        action, key = jax.vmap(self.act)(state)
        env_state = self.step_envs(self.train_env, state.env_state, scale_action(self.env, action))
        state, metrics = jax.vmap(self.record)(state, action, env_state, key)
        if c.updates_per_step == 0:  # data collection only (throughput benchmarks)
            return state, {**metrics, "updated": jnp.zeros_like(metrics["reward"])}
        # Updates start once the buffer holds ``update_start`` transitions (after a resume
        # without a saved buffer they wait until it has refilled that far). Every member's
        # buffer holds the same number of rows, so the condition is one scalar: a real branch.
        ready = state.buffer.size[0] * self.env_shards >= c.update_start
        state, update_metrics = jax.lax.cond(ready, self._member_updates, self._no_updates, state)
        return state, {**metrics, **update_metrics}

    def step_envs(self, stack: envs.VmapEnv, state: envs.State, action: jax.Array) -> envs.State:
        """One step of every member's envs, ``stack`` (the training or evaluation envs),
        (member, env, ...), as one batch: the member and env axes merged, stepped, split
        again. Per env the same arithmetic as a vmap over the members of the vmapped step,
        but that nests two batch axes around the physics, which ran it at half the env
        steps/s on the CPU (HalfCheetah, 128 envs: 2,746 against 5,099) and made vmap batch
        the physics' program once per level while tracing."""
        members, per_member = action.shape[:2]
        merge = lambda x: x.reshape(members * per_member, *x.shape[2:])  # noqa: E731
        state = stack.step(jax.tree.map(merge, state), merge(action))
        return jax.tree.map(lambda x: x.reshape(members, per_member, *x.shape[1:]), state)

    def _member_updates(self, state: TrainState) -> tuple[TrainState, dict]:
        """Every member's updates, vmapped. The update count (every member has made the
        same number) enters unbatched, so policy_delay's branch stays a real branch."""
        return jax.vmap(self._updates, in_axes=(0, None))(state, state.updates[0])

    def _updates(self, state: TrainState, count: jax.Array) -> tuple[TrainState, dict]:
        n = self.config.updates_per_step
        key, k_update = jax.random.split(state.key)
        keys = jax.random.split(k_update, n)
        numbers = count + jnp.arange(n, dtype=count.dtype)
        state, metrics = jax.lax.scan(self._scan_update, state.replace(key=key), (keys, numbers))
        actor_updates = metrics.pop("actor_updates")
        made = jnp.sum(actor_updates)
        metrics = {
            k: jnp.sum(v * actor_updates) / jnp.maximum(made, 1.0) if k in ACTOR_METRICS
            else jnp.mean(v)
            for k, v in metrics.items()
        }  # fmt: skip
        metrics["actor_updates"] = made
        metrics["updated"] = jnp.ones((), jnp.float32)
        return state, self.across_envs(jax.lax.pmean, metrics)

    def _scan_update(self, state: TrainState, xs: tuple) -> tuple[TrainState, dict]:
        return self.update(state, *xs)

    def _no_updates(self, state: TrainState) -> tuple[TrainState, dict]:
        shapes = jax.eval_shape(self._member_updates, state)[1]
        return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    # ---- level 3: a compiled chunk ---------------------------------------------------------------

    def _train_chunk(self, state: TrainState) -> tuple[TrainState, dict]:
        specs = self.state_specs()
        metrics = self.spec(None, MEMBER)  # (train step, member)
        return self.per_device(self._local_chunk, (specs,), (specs, metrics))(state)

    def _local_chunk(self, state: TrainState) -> tuple[TrainState, dict]:
        return jax.lax.scan(self.train_step, state, None, length=self.config.steps_per_chunk)

    # ---- evaluation -------------------------------------------------------------------------

    def _evaluate(self, actor: Params, normalizer: obs_norm.Normalizer, keys: jax.Array):
        spread = self.spec(MEMBER, ENV)
        local = self.per_device(self._evaluate_local, self.spec(MEMBER), (spread, spread))
        return local(actor, normalizer, keys)

    def _evaluate_local(self, actor: Params, normalizer: obs_norm.Normalizer, keys: jax.Array):
        """Full episodes on ``eval_envs`` fresh envs per member with the deterministic mean
        action. Returns per-episode returns and lengths, (member, episode).

        One while loop runs every member's envs until all episodes have ended, its body
        vmapped over the members (the same arithmetic as a vmapped loop per member: a
        finished episode adds nothing). Vmapping the loop instead would batch the env
        step's program up to three times over while vmap finds which loop values vary
        by member (the counters start as constants, then the condition varies too),
        which made tracing evaluation cost more than tracing the train chunk."""
        state = jax.vmap(self.eval_env.reset)(jax.vmap(self.shard_key)(keys))
        shape = (keys.shape[0], self.local_eval_envs)
        carry = (state, jnp.zeros(shape), jnp.zeros(shape, jnp.int32), jnp.ones(shape, bool))

        def running(carry):
            return jnp.any(carry[3])

        def act(actor: Params, normalizer: obs_norm.Normalizer, obs: jax.Array) -> jax.Array:
            mean, _ = self.actor.apply(actor, obs_norm.normalize(normalizer, obs))
            return scale_action(self.env, deterministic_action(mean))

        def step(carry):
            state, returns, lengths, alive = carry
            action = jax.vmap(act)(actor, normalizer, state.obs)
            state = self.step_envs(self.eval_env, state, action)
            returns = returns + jnp.where(alive, state.reward, 0.0)
            lengths = lengths + alive
            alive = alive & ~(state.terminated | state.truncated)
            return state, returns, lengths, alive

        _, returns, lengths, _ = jax.lax.while_loop(running, step, carry)
        return returns, lengths


# ---- the SAC updates: pure functions of (learner, member state, batch) ----------------------


@struct.dataclass
class Learner:
    """What an update needs besides the member's state and its batch (static): the
    networks' apply functions, the optimizers, the critic's loss and the actor's rules."""

    nets: Nets = struct.field(pytree_node=False)
    actor_opt: optax.GradientTransformation = struct.field(pytree_node=False)
    critic_opt: optax.GradientTransformation = struct.field(pytree_node=False)
    alpha_opt: optax.GradientTransformation = struct.field(pytree_node=False)
    critic_loss: Callable = struct.field(pytree_node=False)
    """v2: ``critic_loss_v2`` or the C51 one; v1: ``critic_loss_v1`` or its C51 one."""
    actor_q: str = struct.field(pytree_node=False)
    policy_delay: int = struct.field(pytree_node=False)
    data_axis: str | None = struct.field(pytree_node=False, default=None)
    """The mesh axis a member's batch is split over (data parallel): gradients are averaged
    over it before each optimizer step. None: one device per member."""


CRITIC_LOSSES = {
    ("sac-v2", "mse"): critic_loss_v2,
    ("sac-v2", "c51"): categorical_critic_loss_v2,
    ("sac-v1", "mse"): critic_loss_v1,
    ("sac-v1", "c51"): categorical_critic_loss_v1,
}


def update_v2(learner: Learner, state: TrainState, batch: Transition, gamma: jax.Array,
              keys: tuple, number: jax.Array) -> tuple[TrainState, dict]:  # fmt: skip
    """SAC v2: the twin critics against the target critics' soft value, then (on the
    policy's turn) the actor and the temperature, then the target critics' Polyak step."""
    k_critic, k_actor, _ = keys
    hp = state.hparams
    critic, critic_opt, metrics = gradient_step(
        learner.critic_loss, state.critic, state.critic_opt, learner.critic_opt,
        state.target_critic, state.actor, state.log_alpha, batch, k_critic,
        nets=learner.nets, gamma=gamma, reward_scale=hp["reward_scale"],
        mean_over=learner.data_axis,
    )  # fmt: skip
    policy, m = on_policy_turn(learner, number, policy_step, state, critic, batch.obs, k_actor)
    state = state.replace(
        critic=critic, critic_opt=critic_opt, **policy, updates=state.updates + 1,
        target_critic=polyak(state.target_critic, critic, hp["tau"]),
    )  # fmt: skip
    return state, metrics | m


def update_v1(learner: Learner, state: TrainState, batch: Transition, gamma: jax.Array,
              keys: tuple, number: jax.Array) -> tuple[TrainState, dict]:  # fmt: skip
    """SAC v1: the soft V network against the critics and the policy, the critics against
    the target V (scaled rewards), then (on the policy's turn) the actor at temperature 1,
    then the target V's Polyak step."""
    _, k_actor, k_value = keys  # the critic's key is v2's (its target samples actions)
    hp = state.hparams
    value, value_opt, metrics = gradient_step(
        value_loss_v1, state.value, state.value_opt, learner.critic_opt,
        state.actor, state.critic, batch.obs, k_value, nets=learner.nets, alpha=1.0,
        mean_over=learner.data_axis,
    )  # fmt: skip
    critic, critic_opt, m = gradient_step(
        learner.critic_loss, state.critic, state.critic_opt, learner.critic_opt,
        state.target_value, batch, nets=learner.nets, gamma=gamma, reward_scale=hp["reward_scale"],
        mean_over=learner.data_axis,
    )  # fmt: skip
    metrics |= m
    policy, m = on_policy_turn(learner, number, actor_step, state, critic, batch.obs, k_actor)
    state = state.replace(
        value=value, value_opt=value_opt, critic=critic, critic_opt=critic_opt, **policy,
        updates=state.updates + 1, target_value=polyak(state.target_value, value, hp["tau"]),
    )  # fmt: skip
    return state, metrics | m


def actor_step(learner: Learner, state: TrainState, critic: Params, obs: jax.Array,
               key: jax.Array) -> tuple[dict, dict]:  # fmt: skip
    """SAC v1's policy turn: the actor's gradient step against ``critic``."""
    fields, metrics, _ = _actor_gradient_step(learner, state, critic, obs, key)
    return fields, metrics | _one_actor_update()


def policy_step(learner: Learner, state: TrainState, critic: Params, obs: jax.Array,
                key: jax.Array) -> tuple[dict, dict]:  # fmt: skip
    """SAC v2's policy turn: the actor's step, then the temperature's on its log-probs."""
    fields, metrics, log_prob = _actor_gradient_step(learner, state, critic, obs, key)
    log_alpha, alpha_opt, m = gradient_step(
        alpha_loss, state.log_alpha, state.alpha_opt, learner.alpha_opt,
        log_prob, target_entropy=state.hparams["target_entropy"], mean_over=learner.data_axis,
    )  # fmt: skip
    fields |= {"log_alpha": log_alpha, "alpha_opt": alpha_opt}
    return fields, metrics | m | _one_actor_update()


def _actor_gradient_step(learner: Learner, state: TrainState, critic: Params, obs: jax.Array,
                         key: jax.Array) -> tuple[dict, dict, jax.Array]:  # fmt: skip
    """The actor's gradient step: its new fields, its metrics and the batch's log-probs."""
    actor, actor_opt, metrics = gradient_step(
        actor_loss, state.actor, state.actor_opt, learner.actor_opt,
        critic, state.log_alpha, obs, key, nets=learner.nets, actor_q=learner.actor_q,
        mean_over=learner.data_axis,
    )  # fmt: skip
    log_prob = metrics.pop("log_prob")
    return {"actor": actor, "actor_opt": actor_opt}, metrics, log_prob


def _one_actor_update() -> dict:
    return {"actor_updates": jnp.ones((), jnp.float32)}


def on_policy_turn(learner: Learner, number: jax.Array, step: Callable, *args) -> tuple[dict, dict]:
    """``step(learner, *args)`` on every ``policy_delay``-th update (counting ``number``
    from 0), else nothing: the fields it would set unchanged and zero metrics, which the
    averages leave out (``actor_updates`` 0)."""
    if learner.policy_delay == 1:
        return step(learner, *args)

    def skip(learner: Learner, state: TrainState, *rest) -> tuple[dict, dict]:
        fields, metrics = jax.eval_shape(step, learner, state, *rest)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics)
        return {name: getattr(state, name) for name in fields}, zeros

    state, *rest = args  # the branches read the policy's fields: leave the bulk outside
    light = state.replace(buffer=None, env_state=None)
    turn = (number + 1) % learner.policy_delay == 0
    return jax.lax.cond(turn, step, skip, learner, light, *rest)


# jit with the trainer static: its hash and equality are its config's compiled identity,
# and jit tells trainers of different classes apart by type. Across processes JAX's
# persistent cache keys a program by its StableHLO, so a subclass's program is its own.
_jit_init = jax.jit(Trainer._init, static_argnums=0)
_jit_train_chunk = jax.jit(Trainer._train_chunk, static_argnums=0, donate_argnums=1)
_jit_evaluate = jax.jit(Trainer._evaluate, static_argnums=0)


def default_device() -> jax.Device:
    """The device runs use: ``jax_default_device`` if set, else the first one."""
    chosen = jax.config.jax_default_device
    if isinstance(chosen, str):  # a platform name, e.g. "cpu"
        return jax.devices(chosen)[0]
    return chosen or jax.devices()[0]


def run_devices(count: int | None) -> list[jax.Device]:
    """The devices of a run of ``--devices count``: the first ``count`` of the default
    platform; None: all of them, or the ``jax_default_device`` alone if one is set (by
    the user: a run over several processes sets each process's own, and spans them all)."""
    if count is None and jax.config.jax_default_device is not None and jax.process_count() == 1:
        return [default_device()]
    available = jax.devices()
    if count is not None and count > len(available):
        raise ValueError(
            f"--devices {count}: this machine has {len(available)} "
            f"{available[0].platform} device{'s' * (len(available) > 1)}"
        )
    return available if count is None else available[:count]


def make_mesh(devices: list[jax.Device], members: int, config: Any) -> Mesh:
    """The run's mesh, ``member`` x ``env`` devices: members spread over the devices; when
    there are fewer members than devices, each member's envs over the rest (data
    parallel). Sizes that do not split evenly are refused in one line, naming the device
    counts that fit."""
    n = len(devices)
    problem = _split_problem(n, members, config)
    if problem:
        fits = [k for k in range(1, n) if not _split_problem(k, members, config)]
        raise ValueError(f"{problem}: use --devices {' or '.join(map(str, fits[-3:]))}")
    return _mesh(devices, min(members, n), max(n // members, 1))


def _split_problem(n: int, members: int, config: Any) -> str:
    """Why ``members`` cannot split over ``n`` devices ("" when they can)."""
    if members >= n:
        if members % n:
            return f"a population of {members} members does not split over {n} devices"
        return ""
    if n % members:
        return f"{n} devices do not split evenly over a population of {members} members"
    shards = n // members
    sizes = {"num_envs": config.num_envs, "batch_size": config.batch_size,
             "buffer_size": config.buffer_size, "eval_envs": config.eval_envs}  # fmt: skip
    uneven = [f"{k} {v:,}" for k, v in sizes.items() if v % shards]
    if uneven:
        return (
            f"data parallel over {shards} devices per member splits num_envs, batch_size, "
            f"buffer_size and eval_envs evenly: {', '.join(uneven)} "
            f"{'is' if len(uneven) == 1 else 'are'} not a multiple of {shards}"
        )
    return ""


def _mesh(devices: list[jax.Device], members: int, shards: int) -> Mesh:
    grid = np.array(devices, dtype=object).reshape(members, shards)
    return Mesh(grid, (MEMBER, ENV), axis_types=(AxisType.Auto, AxisType.Auto))


def describe_mesh(mesh: Mesh, members: int) -> str:
    """The placement in words, e.g. "2 devices x 4 members each"."""
    n, shards = mesh.size, mesh.shape[ENV]
    if n == 1:
        return f"device {mesh.devices.flat[0]}"
    if shards == 1:
        return f"{n} devices x {members // n} member{'s' * (members > n)} each"
    if members == 1:
        return f"{n} devices, data parallel"
    return f"{n} devices: {members} members x {shards} devices per member (data parallel)"


def make_optimizer(config: Config, network: bool) -> optax.GradientTransformation:
    """Adam, or for a network under ``optimizer adamw`` AdamW, with its numeric settings
    injected as state (``inject_hyperparams``; set per member by ``set_data``); for a
    network under ``max_grad_norm``, global-norm clipping of the gradient first.
    log(alpha)'s optimizer (``network=False``) is Adam with the same betas, unclipped."""
    if network and config.optimizer == "adamw":
        optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=3e-4, weight_decay=0.0)
    else:
        optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=3e-4)
    if network and config.max_grad_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optimizer)
    return optimizer


def injected(opt_state: optax.OptState) -> optax.OptState:
    """The ``inject_hyperparams`` state inside ``opt_state`` (the last of a chain whose
    first element clips the gradient), whose ``hyperparams`` hold the settings."""
    return opt_state if hasattr(opt_state, "hyperparams") else opt_state[-1]


def _with_optimizer_data(state: TrainState, data: dict[str, jax.Array]) -> dict:
    """The optimizer states of ``state`` with their settings set from ``data`` (config
    field -> per-member values, ``OPTIMIZER_SETTINGS``): learning rates, Adam's betas,
    weight decay (where the optimizer has one: adamw, not log(alpha)'s Adam)."""
    out = {}
    for opt_field in OPTIMIZER_STATES:
        opt = getattr(state, opt_field)
        if opt is None:
            continue
        inner = injected(opt)
        hyperparams = dict(inner.hyperparams)
        for field, name, of in OPTIMIZER_SETTINGS:
            if (not of or opt_field in of) and name in hyperparams:
                # a copy each: the state is donated, buffer by buffer
                hyperparams[name] = jnp.array(data[field], hyperparams[name].dtype)
        inner = inner._replace(hyperparams=hyperparams)
        out[opt_field] = inner if hasattr(opt, "hyperparams") else (*opt[:-1], inner)
    return out


def env_steps(state: TrainState) -> int:
    """Env steps taken by each member (all members step alike)."""
    return _first(state.env_steps)


def update_count(state: TrainState) -> int:
    """Updates made by each member (all members make the same number)."""
    return _first(state.updates)


def _first(counters: Any) -> int:
    """The first of per-member counters that are all equal, from this process's devices
    (a run over several processes holds the others' members elsewhere)."""
    if isinstance(counters, jax.Array) and not counters.is_fully_addressable:
        counters = counters.addressable_shards[0].data
    return int(np.asarray(counters).reshape(-1)[0])


def seed_key(seed: int) -> jax.Array:
    """The run's root key (raw uint32 data, which checkpoints store as a plain array)."""
    return jax.random.key_data(jax.random.key(seed))


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The two branches of a run's key tree: training (``Trainer.init`` splits it for the
    parameters, the envs and the TrainState's key) and evaluation (folded with the chunk
    index). Neither branch's keys can equal the other's."""
    train_key, eval_key = jax.random.split(seed_key(seed))
    return train_key, eval_key
