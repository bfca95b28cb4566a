"""``mjxsac-render``: load a policy from a checkpoint and write a video of it.

    mjxsac-render runs/<run>                      # latest checkpoint -> runs/<run>/video.mp4
    mjxsac-render runs/<run>/checkpoints/120000 --out hopper.mp4 --episodes 3 --gif

Runs on a CPU-only machine: the policy and the MJX env run on whatever JAX device there
is, frames come from MuJoCo's own renderer, headless through EGL (default) or OSMesa
(``MUJOCO_GL=osmesa``, needs the system's ``libosmesa6``).
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported

import argparse
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import mujoco
import numpy as np

from envs import scale_action
from mjxsac import normalizer as obs_norm
from mjxsac.checkpoint import find_checkpoints
from mjxsac.cli import (
    UserError,
    debug_requested,
    describe_os_error,
    one_line_errors,
    probe_writable,
    quiet_libraries,
)
from mjxsac.networks import sample_action
from mjxsac.policy import act, load
from mjxsac.sac import Trainer

T = TypeVar("T")


class PolicyRunner:
    """Rolls the policy out in the MJX env and renders each step with MuJoCo."""

    def __init__(self, trainer: Trainer, policy: dict, width: int, height: int):
        self.trainer, self.policy, self.env = trainer, policy, trainer.env
        model = self.env.mj_model
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, height)
        self.renderer = open_renderer(model, height, width)
        self.data = mujoco.MjData(model)
        self.camera = mujoco.MjvCamera()
        mujoco.mjv_defaultFreeCamera(model, self.camera)
        if self.env.camera_tracks:
            self.camera.type = mujoco.mjtCamera.mjCAMERA_TRACKING
            self.camera.trackbodyid = 1
        self.camera.distance = self.env.camera_distance
        self.camera.elevation = -20.0
        self.camera.azimuth = 90.0

    def frame(self, state) -> np.ndarray:
        self.data.qpos[:] = np.asarray(state.data.qpos)
        self.data.qvel[:] = np.asarray(state.data.qvel)
        mujoco.mj_forward(self.env.mj_model, self.data)
        self.renderer.update_scene(self.data, camera=self.camera)
        return self.renderer.render().copy()

    def episode(self, key, stochastic: bool, max_steps: int):
        """Frames and the return of one episode (until termination or the time limit)."""
        reset_key, key = jax.random.split(key)
        state = _reset(self.trainer, reset_key)
        frames, total = [self.frame(state)], 0.0
        for _ in range(max_steps):
            key, act_key = jax.random.split(key)
            state = _act_and_step(self.trainer, stochastic, self.policy, state, act_key)
            total += float(state.reward)
            frames.append(self.frame(state))
            if bool(state.terminated):
                break
        return frames, total


def open_renderer(model: mujoco.MjModel, height: int, width: int) -> mujoco.Renderer:
    """MuJoCo's offscreen renderer; a missing GL library is a one-line error with the fix."""
    return headless(lambda: mujoco.Renderer(model, height, width))


def headless(open_gl: Callable[[], T]) -> T:
    """``open_gl()``, whose failure to find a headless OpenGL (an ImportError,
    AttributeError or mujoco.FatalError, by backend) becomes a one-line error with the
    fix; mjxsac-eval's Gymnasium videos open theirs through it too."""
    backend = os.environ.get("MUJOCO_GL", "egl")
    try:
        return open_gl()
    except Exception as e:
        packages = {"osmesa": "libosmesa6", "egl": "libegl1 libgl1"}.get(backend, "")
        fix = f"install {packages} (Debian) or " if packages else ""
        other = "egl" if backend != "egl" else "osmesa"
        raise UserError(
            f"no headless OpenGL with MUJOCO_GL={backend} ({type(e).__name__}: {e}): "
            f"{fix}try MUJOCO_GL={other}"
        ) from e


VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".gif")
"""What ``write_video`` writes: the MP4 family through ffmpeg (H.264), or a GIF."""


def check_writable(path: Path) -> None:
    """Fail before the rollout, not after it, if the video cannot be written."""
    if path.is_dir():
        raise UserError(
            f"--out {path} is a directory: give a file name such as {path / 'video.mp4'}"
        )
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(
            f"--out {path}: a video needs one of the extensions {', '.join(VIDEO_SUFFIXES)}"
        )
    try:
        probe_writable(path)
    except OSError as e:
        raise UserError(describe_os_error(e, f"writing the video {path}")) from None


# Jitted with the trainer static: trainers of equal configs share the compiled programs.
@functools.partial(jax.jit, static_argnums=0)
def _reset(trainer: Trainer, key: jax.Array):
    return trainer.env.reset(key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _act_and_step(trainer: Trainer, stochastic: bool, policy: dict, state, key: jax.Array):
    """One policy action (sampled or the mean) and one env step."""
    if not stochastic:
        return trainer.env.step(state, act(trainer, policy, state.obs))
    mean, log_std = trainer.actor.apply(
        policy["actor"], obs_norm.normalize(policy["normalizer"], state.obs)
    )
    return trainer.env.step(state, scale_action(trainer.env, sample_action(mean, log_std, key)[0]))


def write_video(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    import imageio.v2 as imageio

    # imageio-ffmpeg starts ffmpeg with fork+exec, which is safe; Python warns anyway.
    warnings.filterwarnings("ignore", message="os.fork\\(\\) was called")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix == ".gif":
        step = max(1, round(fps / 25))  # GIFs play at <= 25 fps; keep their size sane
        imageio.mimsave(tmp, frames[::step], duration=step / float(fps), loop=0)
    else:
        imageio.mimsave(tmp, frames, fps=float(fps), macro_block_size=1)
    tmp.replace(path)
    return path


def render_run(
    checkpoint: str | Path,
    out: str | Path | None = None,
    episodes: int = 1,
    stochastic: bool = False,
    gif: bool = False,
    width: int = 480,
    height: int = 360,
    max_steps: int | None = None,
    seed: int = 0,
    member: int | None = None,
) -> Path:
    """Roll out ``episodes`` of the checkpoint's policy (of ``member`` in a population;
    default the best by the checkpoint's eval returns) and write them as one video;
    returns the MP4's path. Prints each episode's return."""
    for name, value in (("episodes", episodes), ("width", width), ("height", height),
                        ("max_steps", 1 if max_steps is None else max_steps)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    run_dir = find_checkpoints(checkpoint)[0].parent
    out = Path(out) if out else run_dir / "video.mp4"
    check_writable(out)
    if gif:
        check_writable(out.with_suffix(".gif"))
    trainer, policy, step, member = load(checkpoint, member, prog="mjxsac-render")
    runner = PolicyRunner(trainer, policy, width, height)
    max_steps = max_steps if max_steps is not None else trainer.config.episode_length
    key, frames, returns = jax.random.key(seed), [], []
    for i in range(episodes):
        episode_frames, ret = runner.episode(jax.random.fold_in(key, i), stochastic, max_steps)
        frames += episode_frames
        returns.append(ret)
        print(f"episode {i}: return {ret:,.2f} over {len(episode_frames) - 1} steps")
    fps = 1.0 / trainer.env.dt
    write_video(frames, out, fps)
    who = f" member {member}" if trainer.population_size > 1 else ""
    print(
        f"{trainer.config.env}{who} at env step {step:,}: wrote {out} ({len(frames)} frames, "
        f"{fps:.0f} fps); mean return {np.mean(returns):,.2f}"
    )
    if gif:
        print(f"wrote {write_video(frames, out.with_suffix('.gif'), fps)}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ or one step")
    parser.add_argument("--out", help="video path (.mp4); default <run>/video.mp4")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--stochastic", action="store_true", help="sample actions")
    parser.add_argument("--gif", action="store_true", help="also write a GIF beside the MP4")
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--max-steps", type=int, help="per episode; default: the time limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--member", type=int, help="population member; default: the best")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    args = parser.parse_args(argv)
    quiet_libraries(args.debug or debug_requested([]))
    with one_line_errors("mjxsac-render", args.debug or debug_requested([])):
        render_run(
            args.checkpoint, args.out, args.episodes, args.stochastic, args.gif,
            args.width, args.height, args.max_steps, args.seed, args.member,
        )  # fmt: skip


if __name__ == "__main__":
    main()
