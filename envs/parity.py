"""Parity harness: our MJX ports against Gymnasium's own v5 environments (C MuJoCo).

Gymnasium (``pip install -e ".[test]"``) is the reference no one here wrote. Two checks:

* one-step parity: along a Gymnasium trajectory with random actions, put both simulators in
  the same (qpos, qvel) -- Gymnasium's ``set_state``, our ``reset_to`` -- apply the same
  action once and compare observation, reward, termination and reward terms;
* trajectory parity: start both from the same reset state and let each run on its own
  under the same actions;
* return parity (``--episodes N``): episode returns under the same open-loop actions,
  beside Gymnasium against itself with perturbed initial velocities (the scale of chaos).

Comparisons are meaningful in float64: enable ``jax_enable_x64`` before building the env.
From the command line (x64 is switched on for you)::

    python -m envs.parity --env Ant --steps 200
    python -m envs.parity --env Ant --integrator euler --cone elliptic
    python -m envs.parity --env Ant --episodes 20 [--float32] [--faithful false]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable

import jax
import numpy as np

from envs.base import Env, PhysicsOptions, add_physics_arguments, physics_from_arguments


@dataclasses.dataclass
class GymStep:
    """One recorded Gymnasium transition from a known (qpos, qvel)."""

    qpos: np.ndarray
    qvel: np.ndarray
    warmstart: np.ndarray
    action: np.ndarray
    obs: np.ndarray
    reward: float
    terminated: bool
    info: dict[str, float]


def gym_env(name: str, physics: PhysicsOptions | None = None):
    """Gymnasium's own ``<name>-v5``, without wrappers. ``physics`` changes the reference's
    solver options too, to tell MJX's differences from those of the options themselves."""
    try:
        import gymnasium
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError('the parity harness needs Gymnasium: pip install -e ".[test]"') from e
    env = gymnasium.make(f"{name}-v5", disable_env_checker=True).unwrapped
    if physics is not None:
        physics.apply(env.model)
    return env


Policy = Callable[[np.ndarray, np.random.Generator], np.ndarray]
"""Chooses an action (in the control range) from Gymnasium's observation."""


def record_one_step(
    name: str,
    steps: int,
    seed: int = 0,
    physics: PhysicsOptions | None = None,
    policy: Policy | None = None,
) -> list[GymStep]:
    """Run Gymnasium with uniform random actions (or ``policy``'s); before each step,
    ``set_state`` the current (qpos, qvel) so that the step starts from exactly what
    ``reset_to`` builds. An episode ends at a termination or at the time limit (1,000
    steps, Gymnasium's ``TimeLimit``); the next starts from a reset with a fresh seed."""
    import envs

    env = gym_env(name, physics)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    low, high = env.action_space.low, env.action_space.high
    limit = envs.env_class(name).episode_length
    out, episode_steps = [], 0
    for _ in range(steps):
        qpos, qvel = env.data.qpos.copy(), env.data.qvel.copy()
        env.set_state(qpos, qvel)
        warmstart = env.data.qacc_warmstart.copy()
        if policy is None:
            action = rng.uniform(low, high).astype(np.float64)
        else:
            action = np.asarray(policy(obs, rng), np.float64)
        obs, reward, terminated, _, info = env.step(action)
        out.append(GymStep(qpos, qvel, warmstart, action, obs, float(reward), terminated, info))
        episode_steps += 1
        if terminated or episode_steps == limit:
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            episode_steps = 0
    return out


@functools.cache
def compiled(env: Env) -> tuple[Callable, Callable]:
    """``env.reset_to`` and ``env.step``, jitted once per env for both checks."""
    return jax.jit(env.reset_to), jax.jit(env.step)


@functools.cache
def compiled_one_step(env: Env) -> Callable:
    """From a batch of (qpos, qvel, warmstart, action): ``reset_to``, the warmstart, one
    ``step``; jitted once per env and batch shape."""

    def one(qpos, qvel, warmstart, action):
        state = env.reset_to(qpos, qvel)
        warmstart = warmstart.astype(state.data.qacc_warmstart.dtype)  # (Warp: float32)
        state = state.replace(data=state.data.replace(qacc_warmstart=warmstart))
        state = env.step(state, action)
        return state.obs, state.reward, state.terminated, state.metrics

    return jax.jit(jax.vmap(one))


def one_step_outputs(
    env: Env, record: list[GymStep], batch_size: int = 1000
) -> dict[str, np.ndarray]:
    """Our ``obs``, ``reward``, ``terminated`` and reward terms after one step from each
    recorded state. The steps are independent, so they run vmapped, ``batch_size`` at a
    time (the last batch padded, as is a record shorter than a batch, to a power of two):
    one compiled program per env for a whole record. A vmapped solve freezes each env when
    its own solve converges, as one env alone would."""
    n = len(record)
    size = min(batch_size, 1 << (n - 1).bit_length())  # a power of two: few programs
    env.reserve(size)  # (Warp's contact budget: every world of the batch)
    step = compiled_one_step(env)
    fields = ("qpos", "qvel", "warmstart", "action")
    inputs = [np.stack([getattr(r, f) for r in record]) for f in fields]
    names = ("obs", "reward", "terminated", *env.metric_names)
    out: dict[str, list] = {k: [] for k in names}
    for start in range(0, n, size):
        rows = np.minimum(np.arange(start, start + size), n - 1)  # pad with the last step
        obs, reward, terminated, metrics = step(*(x[rows] for x in inputs))
        keep = min(size, n - start)
        values = (obs, reward, terminated, *(metrics[k] for k in env.metric_names))
        for k, v in zip(names, values, strict=True):
            out[k].append(np.asarray(v)[:keep])
    return {k: np.concatenate(v) for k, v in out.items()}


def one_step_parity(
    env: Env, record: list[GymStep], batch_size: int = 1000
) -> dict[str, np.ndarray]:
    """Per-step absolute differences of our step against the recorded Gymnasium steps."""
    return compare(env, one_step_outputs(env, record, batch_size), record)


def compare(env: Env, ours: dict[str, np.ndarray], record: list[GymStep]) -> dict:
    """``one_step_outputs`` against the record: absolute differences per step."""
    diffs = {
        "obs": np.abs(ours["obs"] - np.stack([r.obs for r in record])),
        "reward": np.abs(ours["reward"] - np.array([r.reward for r in record])),
        "terminated": ours["terminated"] != np.array([r.terminated for r in record]),
    }
    for k in env.metric_names:
        diffs[k] = np.abs(ours[k] - np.array([float(r.info[k]) for r in record]))
    return diffs


def trajectory_parity(
    env: Env, name: str, steps: int, seed: int = 0, physics: PhysicsOptions | None = None
) -> dict[str, np.ndarray]:
    """Both start from Gymnasium's reset state; each then runs freely under the same
    actions. Returns per-step |obs| differences (row 0: the reset observation) and the
    number of steps run before either terminated."""
    gym = gym_env(name, physics)
    rng = np.random.default_rng(seed)
    obs0, _ = gym.reset(seed=seed)
    reset_to, step = compiled(env)
    state = reset_to(gym.data.qpos.copy(), gym.data.qvel.copy())
    obs_diff = [np.abs(np.asarray(state.obs) - obs0)]
    reward_diff = []
    for _ in range(steps):
        action = rng.uniform(gym.action_space.low, gym.action_space.high).astype(np.float64)
        obs, reward, terminated, _, _ = gym.step(action)
        state = step(state, action)
        obs_diff.append(np.abs(np.asarray(state.obs) - obs))
        reward_diff.append(abs(float(state.reward) - float(reward)))
        if terminated or bool(state.terminated):
            break
    return {"obs": np.asarray(obs_diff), "reward": np.asarray(reward_diff)}


def _gym_episode(name, seed, actions, physics=None, dqvel=0.0):
    gym = gym_env(name, physics)
    gym.reset(seed=seed)
    qpos, qvel = gym.data.qpos.copy(), gym.data.qvel.copy()
    if dqvel:
        gym.set_state(qpos, qvel + dqvel)
    total = 0.0
    for action in actions:
        _, reward, terminated, _, _ = gym.step(action)
        total += float(reward)
        if terminated:
            break
    return total, qpos, qvel


def return_parity(
    env: Env, name: str, episodes: int = 20, steps: int = 200, seed: int = 0,
    perturbations: tuple[float, ...] = (1e-9, 1e-6),
) -> dict[str, np.ndarray]:  # fmt: skip
    """What matters for RL: episode returns from Gymnasium's reset states under the same
    open-loop random actions, each simulator running until its own termination. For scale,
    Gymnasium against itself with the initial qvel perturbed (chaos baselines)."""
    reset_to, step = compiled(env)
    gym, ours = [], []
    perturbed: dict[float, list] = {p: [] for p in perturbations}
    for episode in range(episodes):
        rng = np.random.default_rng(seed + 1000 + episode)
        actions = rng.uniform(env.action_low, env.action_high, (steps, env.action_size))
        total, qpos, qvel = _gym_episode(name, seed + episode, actions)
        gym.append(total)
        for p in perturbations:
            perturbed[p].append(_gym_episode(name, seed + episode, actions, dqvel=p)[0])
        state, mine = reset_to(qpos, qvel), 0.0
        for action in actions:
            state = step(state, action)
            mine += float(state.reward)
            if bool(state.terminated):
                break
        ours.append(mine)
    out = {"gym": np.asarray(gym), "ours": np.asarray(ours)}
    out |= {f"gym_qvel+{p:g}": np.asarray(v) for p, v in perturbed.items()}
    return out


def relative_return_gaps(returns: dict[str, np.ndarray]) -> dict[str, float]:
    """Median |R - R_gym| / |R_gym| of every variant against Gymnasium."""
    gym = returns["gym"]
    return {
        k: float(np.median(np.abs(v - gym) / np.maximum(np.abs(gym), 1e-9)))
        for k, v in returns.items()
        if k != "gym"
    }


def summarize(diffs: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest difference per quantity (mismatch count for termination)."""
    return {
        k: int(v.sum()) if v.dtype == bool else float(np.max(v, initial=0.0))
        for k, v in diffs.items()
    }


def main(argv: list[str] | None = None) -> None:
    import envs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", required=True, choices=envs.NAMES)
    parser.add_argument("--steps", type=int, default=200, help="one-step parity steps")
    parser.add_argument("--trajectory", type=int, default=100, help="trajectory steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=0, help="also compare episode returns")
    parser.add_argument("--float32", action="store_true", help="run ours in float32")
    add_physics_arguments(parser)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", not args.float32)
    physics = physics_from_arguments(args)
    env = envs.make(args.env, **physics)
    report = {
        "env": args.env,
        "physics": physics,
        "one_step": summarize(
            one_step_parity(env, record_one_step(args.env, args.steps, args.seed))
        ),
    }
    traj = trajectory_parity(env, args.env, args.trajectory, args.seed)
    report["trajectory"] = {
        "steps": len(traj["reward"]),
        "max_obs_diff_per_step": [float(x) for x in traj["obs"].max(axis=1)],
    }
    if args.episodes:
        returns = return_parity(env, args.env, args.episodes, seed=args.seed)
        report["returns"] = {k: v.tolist() for k, v in returns.items()}
        report["median_relative_return_gap"] = relative_return_gaps(returns)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
