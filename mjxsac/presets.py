"""Per-task presets: the defaults a run starts from before command-line overrides.

* ``paper``: the SAC papers' table (Adam 3e-4, gamma 0.99, tau 0.005, batch 256, two
  hidden layers of 256 ReLU units, a buffer of 1e6, one environment and one update per
  environment step), with the papers' step budgets and, for SAC v1, their reward scales.
* ``parallel``: thousands of environments on one GPU, large batches, several updates per
  step, LayerNorm critics (the FastTD3 / FastSAC recipe). Starting values from that line
  of work; docs/BENCHMARKS.md records what has been measured with them.
* ``cpu``: a small budget that finishes in minutes on a CPU-only machine.
"""

from __future__ import annotations

import dataclasses

from mjxsac.config import Config

# Environment steps in the SAC papers' learning curves (InvertedPendulum and Swimmer,
# absent there, get budgets that solve them).
PAPER_STEPS = {
    "InvertedPendulum": 50_000,
    "Hopper": 1_000_000,
    "Walker2d": 3_000_000,
    "HalfCheetah": 3_000_000,
    "Ant": 3_000_000,
    "Humanoid": 10_000_000,
    "Swimmer": 1_000_000,
}
# SAC v1's reward scale (its inverse temperature), from the 2018a paper's table.
V1_REWARD_SCALE = {"Humanoid": 20.0}
V1_DEFAULT_REWARD_SCALE = 5.0

PARALLEL_STEPS = {
    "InvertedPendulum": 2_000_000,
    "Hopper": 20_000_000,
    "Walker2d": 30_000_000,
    "HalfCheetah": 30_000_000,
    "Ant": 50_000_000,
    "Humanoid": 100_000_000,
    "Swimmer": 20_000_000,
}

PRESETS: dict[str, dict] = {
    "paper": dict(
        num_envs=1,
        updates_per_step=1,
        batch_size=256,
        buffer_size=1_000_000,
        hidden_sizes=(256, 256),
        actor_lr=3e-4,
        critic_lr=3e-4,
        alpha_lr=3e-4,
        gamma=0.99,
        tau=0.005,
        warmup_steps=10_000,
        normalize_obs=False,
        critic_layer_norm=False,
        steps_per_chunk=1_000,
        eval_every=5,
        eval_envs=10,
    ),
    "parallel": dict(
        num_envs=1_024,
        updates_per_step=8,
        batch_size=8_192,
        buffer_size=4_000_000,
        hidden_sizes=(512, 512),
        actor_lr=3e-4,
        critic_lr=3e-4,
        alpha_lr=3e-4,
        gamma=0.99,
        tau=0.005,
        warmup_steps=100_000,
        normalize_obs=True,
        critic_layer_norm=True,
        steps_per_chunk=50,
        eval_every=10,
        eval_envs=32,
    ),
    "cpu": dict(
        num_envs=16,
        updates_per_step=4,
        batch_size=256,
        buffer_size=100_000,
        hidden_sizes=(256, 256),
        warmup_steps=2_000,
        normalize_obs=True,
        steps_per_chunk=125,
        total_steps=20_000,
        eval_every=2,
        eval_envs=10,
    ),
}


def config_for(env: str, algo: str = "sac-v2", preset: str = "cpu") -> Config:
    """The preset's ``Config`` for ``env`` and ``algo``; a ``ValueError`` names the valid
    presets."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    fields = dict(PRESETS[preset])
    if preset == "paper":
        fields["total_steps"] = PAPER_STEPS.get(env, 1_000_000)
    elif preset == "parallel":
        fields["total_steps"] = PARALLEL_STEPS.get(env, 20_000_000)
    if algo == "sac-v1":
        fields["reward_scale"] = V1_REWARD_SCALE.get(env, V1_DEFAULT_REWARD_SCALE)
    return dataclasses.replace(Config(env=env, algo=algo, preset=preset), **fields)
