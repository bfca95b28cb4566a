"""``mjxsac-eval``: score a checkpoint's deterministic policy, in MJX or in Gymnasium's own
simulator.

    mjxsac-eval runs/<run>                          # 10 episodes in MJX -> runs/<run>/eval_mjx.json
    mjxsac-eval runs/<run> --gymnasium --video hopper.mp4   # in Gymnasium's <Task>-v5 (C MuJoCo)

MJX is what training reports; Gymnasium's env of the same task (C MuJoCo, float64) is the
simulator the SAC papers' returns come from. The task's ``--env-options`` go to Gymnasium
as its keyword arguments; options Gymnasium has no equivalent for (the solver caps and the
other speed options) are refused. The observation normalization saved with the policy is
applied in both.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: Gymnasium's videos

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

import envs
from mjxsac import render
from mjxsac.checkpoint import find_checkpoints
from mjxsac.cli import (
    UserError,
    debug_requested,
    one_line_errors,
    probe_writable,
    quiet_libraries,
    write,
    write_atomic,
)
from mjxsac.config import Config
from mjxsac.policy import Loaded, jit_act, load
from mjxsac.sac import Trainer

PROG = "mjxsac-eval"
INSTALL_EVAL = 'pip install -e ".[eval]"'


def evaluate_mjx(loaded: Loaded, episodes: int, seed: int) -> tuple[list[float], list[int]]:
    """Returns and lengths of ``episodes`` deterministic episodes in MJX, all in one batch,
    exactly as the trainer evaluates (auto-reset off, up to the run's episode length)."""
    config = dataclasses.replace(loaded.trainer.run_config, eval_envs=episodes)
    trainer = Trainer(config)
    one = jax.tree.map(lambda x: x[None], loaded.policy)  # a member axis of one
    returns, lengths = trainer.run_evaluation(
        one["actor"], one["normalizer"], jax.random.key(seed)[None]
    )
    return np.asarray(returns[0]).tolist(), np.asarray(lengths[0]).tolist()


def gymnasium_kwargs(config: Config) -> dict:
    """The run's ``--env-options`` as Gymnasium's keyword arguments; an option Gymnasium
    has no equivalent for is refused."""
    options = config.env_kwargs()
    speed = sorted(k for k in options if k in envs.PHYSICS_FIELDS)
    if speed:
        given = ", ".join(f"{k}={options[k]}" for k in speed)
        raise UserError(
            f"--gymnasium: the run's --env-options {given} have no equivalent in Gymnasium's "
            f"{config.env}-v5 (they set MJX's simulator); its returns are in MJX only (drop "
            "--gymnasium)"
        )
    return options


def gymnasium_module():
    try:
        import gymnasium
    except ImportError:
        raise UserError(f"--gymnasium needs Gymnasium with MuJoCo: {INSTALL_EVAL}") from None
    return gymnasium


def gymnasium_env(config: Config, video: tuple[int, int] | None = None):
    """Gymnasium's own ``<Task>-v5`` with the run's task options, unwrapped (the episode
    length is counted here, as the run's); ``video``: (width, height) of its renderer."""
    kwargs = gymnasium_kwargs(config)
    if video is not None:
        kwargs.update(render_mode="rgb_array", width=video[0], height=video[1])
    make = gymnasium_module().make
    return make(f"{config.env}-v5", disable_env_checker=True, **kwargs).unwrapped


def evaluate_gymnasium(
    loaded: Loaded,
    episodes: int,
    seed: int,
    video: tuple[int, int] | None = None,
    frames: list | None = None,
    say=print,
) -> tuple[list[float], list[int]]:
    """Returns and lengths of ``episodes`` deterministic episodes in Gymnasium's env
    (episode ``i`` reset with seed ``seed + i``), up to the run's episode length; with
    ``video``, each step's frame is appended to ``frames``."""
    trainer, policy = loaded.trainer, loaded.policy
    env = gymnasium_env(trainer.run_config, video)
    returns, lengths = [], []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            total, steps = 0.0, 0
            if video is not None:  # the first render opens Gymnasium's GL context
                frames.append(render.headless(env.render) if episode == 0 else env.render())
            while steps < trainer.config.episode_length:
                action = np.asarray(jit_act(trainer, policy, obs.astype(np.float32)))
                obs, reward, terminated, _, _ = env.step(action)
                total, steps = total + float(reward), steps + 1
                if video is not None:
                    frames.append(env.render())
                if terminated:
                    break
            returns.append(total)
            lengths.append(steps)
            say(f"  episode {episode}: return {total:,.2f} over {steps} steps")
    finally:
        env.close()
    return returns, lengths


def summary(returns: list[float], lengths: list[int]) -> dict:
    r = np.asarray(returns, np.float64)
    return {
        "return_mean": float(r.mean()),
        "return_std": float(r.std()),
        "return_min": float(r.min()),
        "return_max": float(r.max()),
        "length_mean": float(np.mean(lengths)),
    }


def evaluate_run(
    checkpoint,
    member: int | None = None,
    episodes: int = 10,
    seed: int = 0,
    gymnasium: bool = False,
    video: str | None = None,
    out: str | None = None,
    width: int = 480,
    height: int = 360,
) -> dict:
    """Score the checkpoint's policy; print the result, write it as JSON (default
    ``<run>/eval_mjx.json`` or ``<run>/eval_gymnasium.json``) and return it."""
    for name, value in (("episodes", episodes), ("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    if video is not None and not gymnasium:
        raise UserError(
            "--video records Gymnasium's episodes: add --gymnasium (mjxsac-render writes "
            "videos in MJX)"
        )
    if gymnasium:
        gymnasium_module()
    simulator = "gymnasium" if gymnasium else "mjx"
    run_dir = find_checkpoints(checkpoint)[0].parent
    out_path = Path(out) if out else run_dir / f"eval_{simulator}.json"
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a directory: give a file name such as eval.json")
    # Fail before the episodes, not after them.
    write(probe_writable, out_path, what=f"writing {out_path}")
    if video is not None:
        render.check_writable(Path(video))
    loaded = load(checkpoint, member, prog=PROG)
    trainer = loaded.trainer
    if gymnasium:
        gymnasium_kwargs(trainer.run_config)  # refuse before any episode runs
    who = f" member {loaded.member}" if trainer.population_size > 1 else ""
    where = f"Gymnasium's {trainer.config.env}-v5" if gymnasium else "MJX"
    print(f"{trainer.config.env}{who} at env step {loaded.step:,}: {episodes} deterministic "
          f"episodes in {where} (seed {seed})", flush=True)  # fmt: skip
    start, frames = time.monotonic(), []
    if gymnasium:
        size = (width, height) if video is not None else None
        returns, lengths = evaluate_gymnasium(loaded, episodes, seed, size, frames)
    else:
        returns, lengths = evaluate_mjx(loaded, episodes, seed)
    result = {
        "env": trainer.config.env,
        "simulator": simulator,
        "checkpoint_step": loaded.step,
        "member": loaded.member,
        "episodes": episodes,
        "seed": seed,
        "env_options": trainer.run_config.env_options,
        **summary(returns, lengths),
        "returns": returns,
        "lengths": lengths,
        "wall_s": round(time.monotonic() - start, 2),
    }
    s = result
    print(f"return mean {s['return_mean']:,.2f} std {s['return_std']:,.2f} "
          f"min {s['return_min']:,.2f} max {s['return_max']:,.2f}; "
          f"episode length mean {s['length_mean']:,.1f}")  # fmt: skip
    text = json.dumps(result, indent=1) + "\n"
    write(write_atomic, out_path, text, what=f"writing {out_path}")
    print(f"wrote {out_path}")
    if video is not None:
        fps = 1.0 / trainer.env.dt
        print(f"wrote {render.write_video(frames, Path(video), fps)} ({len(frames)} frames)")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ or one step")
    parser.add_argument("--member", type=int, help="population member; default: the best")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="episode i resets with seed+i")
    parser.add_argument("--gymnasium", action="store_true",
                        help="in Gymnasium's own <Task>-v5 (C MuJoCo) instead of MJX")  # fmt: skip
    parser.add_argument("--video", help="with --gymnasium: write its episodes (.mp4, .gif)")
    parser.add_argument("--width", type=int, default=480, help="video width")
    parser.add_argument("--height", type=int, default=360, help="video height")
    parser.add_argument("--out", help="JSON path; default <run>/eval_<mjx|gymnasium>.json")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    args = parser.parse_args(argv)
    debug = args.debug or debug_requested([])
    quiet_libraries(debug)
    with one_line_errors(PROG, debug):
        evaluate_run(
            args.checkpoint, args.member, args.episodes, args.seed, args.gymnasium,
            args.video, args.out, args.width, args.height,
        )  # fmt: skip


if __name__ == "__main__":
    main()
