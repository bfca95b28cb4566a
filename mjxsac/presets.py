"""Per-task presets: the defaults a run starts from before command-line overrides.

* ``paper``: the SAC papers' settings as the authors' code ran them (Adam 3e-4, gamma 0.99,
  tau 0.005, batch 256, two hidden layers of 256 ReLU units, a buffer of 1e6, one
  environment and one update per environment step, the policy's log standard deviation
  hard-clipped to [-20, 2]). SAC v1 follows haarnoja/sac's ICML-2018 configuration
  (1,000 uniform random steps, 10,000 for HalfCheetah and Ant, with updates from 1,000
  stored transitions on; reward scale 5, Humanoid 20; Walker2d for 1M steps); SAC v2
  follows softlearning's of the 2018b paper (10,000 uniform random steps before any
  update, initial temperature 1, target entropy -|A|). docs/BENCHMARKS.md and the README
  say what still differs.
* ``parallel``: thousands of environments on one GPU, large batches, several updates per
  step, LayerNorm critics (the FastTD3 / FastSAC recipe). Starting values from that line
  of work; docs/BENCHMARKS.md records what has been measured with them.
* ``fast``: the FastSAC recipe in full (``FAST``: C51 critics, mean of the critics for the
  actor, delayed policy updates, AdamW with beta2 0.95, SiLU and LayerNorm, bf16 matmuls,
  a small initial temperature, desynchronized episodes), adapted to our tasks: each
  task's C51 support is sized to its returns. Untuned: the GPU issue tunes it by
  measurement.
* ``cpu``: a small budget that finishes in minutes on a CPU-only machine. SAC v1 gets
  twice v2's updates per env step there (``CPU_V1_UPDATES``): its bootstrap goes through a
  second lagging estimate (the V network and its Polyak target), and at v2's 4,500
  updates in 20,000 env steps only 10 of 16 seeds solved InvertedPendulum
  (docs/BENCHMARKS.md, "SAC v1 on InvertedPendulum").
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
# SAC v1's reward scale (its inverse temperature), from the 2018a paper's table and
# haarnoja/sac's variants (Humanoid-v1 20; its Swimmer was rllab's, with scale 25).
V1_REWARD_SCALE = {"Humanoid": 20.0}
V1_DEFAULT_REWARD_SCALE = 5.0
# haarnoja/sac (ICML-2018 configuration): uniform random steps per task (default 1,000)
# and the training length where it differs from the 2018b paper's (Walker2d: 1M).
V1_WARMUP = {"HalfCheetah": 10_000, "Ant": 10_000}
V1_PAPER_STEPS = {"Walker2d": 1_000_000}

# SAC v1's updates per train step in the ``cpu`` preset (v2: 4), see the module doc.
CPU_V1_UPDATES = 8

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
        log_std_clamp="hard",
        log_std_min=-20.0,
        log_std_max=2.0,
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
    "fast": dict(
        # amazon-far/holosoma's FastSAC defaults (fc600e7, config_types/algo.py and
        # fast_sac_agent.py) unless a comment says otherwise.
        num_envs=4_096,
        updates_per_step=8,
        policy_delay=4,  # 2 actor updates per 8 critic updates
        batch_size=8_192,
        buffer_size=4_096 * 1_024,  # 1,024 transitions per env
        hidden_sizes=(768, 384, 192),  # the critic's widths (its actor: 512, 256, 128)
        activation="silu",
        critic_layer_norm=True,  # FastSAC also normalizes the actor's layers; we do not
        critic="c51",
        num_atoms=101,  # v_min / v_max per task: FAST_SUPPORT
        actor_q="mean",
        optimizer="adamw",
        weight_decay=0.001,
        adam_b1=0.9,
        adam_b2=0.95,
        compute_dtype="bfloat16",
        actor_lr=3e-4,
        critic_lr=3e-4,
        alpha_lr=3e-4,
        gamma=0.99,  # FastSAC's 0.97 is for its humanoid robots; Gymnasium's returns use 0.99
        tau=0.125,
        init_alpha=0.001,
        target_entropy=0.0,  # FastSAC measures log pi in joint units; ours are the [-1, 1] box
        warmup_steps=0,  # no uniform random phase: the policy acts from the first step
        learning_starts=10 * 4_096,  # 10 iterations of all envs
        desync_episodes=True,  # ours (this preset's envs would otherwise truncate together)
        normalize_obs=True,
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


# The C51 support of the ``fast`` preset, per task, in units of Q = reward_scale x the
# discounted return (FastSAC's [-20, 20] suits its rewards, which it multiplies by the
# control period; Gymnasium's per-step rewards at gamma 0.99 give Q of about 100 x the
# per-step reward: ~1 for InvertedPendulum, 3-5 for Hopper and Walker2d, up to ~15 for a
# HalfCheetah at 15,000, ~7 for Ant and ~8 for Humanoid, ~0.35 for Swimmer). Symmetric
# about 0: an untrained categorical critic predicts the support's midpoint, and on
# InvertedPendulum supports centred well above 0 (e.g. [-10, 110]) stalled seeds that
# [-100, 100] solved (docs/DESIGN.md).
FAST_SUPPORT = {
    "InvertedPendulum": (-110.0, 110.0),
    "Hopper": (-500.0, 500.0),
    "Walker2d": (-700.0, 700.0),
    "HalfCheetah": (-1_700.0, 1_700.0),
    "Ant": (-900.0, 900.0),
    "Humanoid": (-1_100.0, 1_100.0),
    "Swimmer": (-60.0, 60.0),
}


def config_for(env: str, algo: str = "sac-v2", preset: str = "cpu") -> Config:
    """The preset's ``Config`` for ``env`` and ``algo``; a ``ValueError`` names the valid
    presets."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    fields = dict(PRESETS[preset])
    v1 = algo == "sac-v1"
    if v1:
        fields["reward_scale"] = V1_REWARD_SCALE.get(env, V1_DEFAULT_REWARD_SCALE)
    if preset == "paper":
        fields["total_steps"] = PAPER_STEPS.get(env, 1_000_000)
        if v1:  # haarnoja/sac: updates from 1,000 stored transitions, during the warm-up
            fields["total_steps"] = V1_PAPER_STEPS.get(env, fields["total_steps"])
            fields["warmup_steps"] = V1_WARMUP.get(env, 1_000)
            fields["learning_starts"] = 1_000
        else:  # softlearning: 10,000 random steps, then the updates
            fields["warmup_steps"] = 10_000
    elif preset == "cpu" and v1:
        fields["updates_per_step"] = CPU_V1_UPDATES
    elif preset in ("parallel", "fast"):
        fields["total_steps"] = PARALLEL_STEPS.get(env, 20_000_000)
    if preset == "fast" and env in FAST_SUPPORT:  # (another env keeps Config's support)
        low, high = FAST_SUPPORT[env]
        scale = fields.get("reward_scale", 1.0)
        fields["v_min"], fields["v_max"] = low * scale, high * scale
    return dataclasses.replace(Config(env=env, algo=algo, preset=preset), **fields)
