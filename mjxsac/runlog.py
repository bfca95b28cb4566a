"""What a run leaves on disk and on the terminal: the run directory, metrics JSONL, the
learning-curve PNG and the progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import IO

from mjxsac.config import Config


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.env}-{config.algo}-s{config.seed}-{stamp}"


class RunDir:
    """A run directory: ``config.json``, ``metrics.jsonl``, ``learning_curve.png``,
    ``checkpoints/``. Metrics rows are appended and flushed one by one, so a run that dies
    keeps every row written before."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, config: Config) -> None:
        write_atomic(self.path / "config.json", json.dumps(config.to_dict(), indent=1) + "\n")

    def append_metrics(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def truncate_metrics(self, env_steps: int) -> None:
        """Drop rows beyond ``env_steps`` (a resumed run rewrites them)."""
        rows = [r for r in self.read_metrics() if r.get("env_steps", 0) <= env_steps]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def plot(self, title: str) -> Path:
        """Evaluation and training returns against env steps, as ``learning_curve.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, label, style in (
            ("eval/return_mean", "eval (deterministic)", "o-"),
            ("train/episode_return", "train episodes", "-"),
        ):
            points = [(r["env_steps"], r[key]) for r in rows if key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, label=label, markersize=3)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("episode return")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        out = self.path / "learning_curve.png"
        tmp = out.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out)
        return out


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Progress:
    """One status line: steps, env steps/s, updates/s, last eval return, ETA. On a
    terminal it redraws in place; otherwise it prints a plain line at most every
    ``every_s`` seconds and at each evaluation."""

    def __init__(self, total_steps: int, label: str, stream: IO | None = None, every_s=10.0):
        self.total = total_steps
        self.label = label
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.last_print = -math.inf
        self.eval_return: float | None = None

    def update(self, steps: int, steps_per_s: float, updates_per_s: float, elapsed: float,
               eval_return: float | None = None) -> None:  # fmt: skip
        if eval_return is not None:
            self.eval_return = eval_return
        remaining = max(self.total - steps, 0) / steps_per_s if steps_per_s > 0 else math.inf
        line = (
            f"[{self.label}] {_si(steps)}/{_si(self.total)} steps "
            f"({100 * steps / max(self.total, 1):.0f}%) | {_si(steps_per_s)} env-steps/s | "
            f"{_si(updates_per_s)} updates/s | eval "
            f"{'-' if self.eval_return is None else f'{self.eval_return:,.1f}'} | "
            f"elapsed {_duration(elapsed)} | ETA {_duration(remaining)}"
        )
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            if eval_return is not None:
                self.stream.write("\n")
        elif eval_return is not None or now - self.last_print >= self.every_s:
            self.stream.write(line + "\n")
            self.last_print = now
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\r\x1b[2K" if self.tty else "") + text + "\n")
        self.stream.flush()


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class WandbLog:
    """Weights & Biases logging, off unless ``--wandb``. Without ``WANDB_MODE`` a run is
    offline (nothing leaves the machine; ``wandb sync`` uploads it later), except under
    ``wandb agent`` (``WANDB_SWEEP_ID`` set), whose sweep needs the server."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def start(cls, config: Config) -> tuple[WandbLog, Config]:
        """``wandb.init``, then the config as the run holds it: values a sweep agent
        sampled (``WANDB_SWEEP_PARAM_PATH``) win over the command line."""
        import os

        import wandb

        mode = None
        if "WANDB_MODE" not in os.environ:
            mode = "online" if os.environ.get("WANDB_SWEEP_ID") else "offline"
        root = Path(config.run_dir or "runs")
        root.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=config.wandb_project,
            entity=config.wandb_entity,
            config=config.to_dict(),
            dir=str(root),
            mode=mode,
        )
        merged = Config.from_dict({**config.to_dict(), **dict(run.config)})
        run.config.update(merged.to_dict(), allow_val_change=True)
        return cls(run), merged

    def attach(self, run_dir: RunDir) -> None:
        self.run.summary["run_dir"] = str(run_dir.path)

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "chunk"}, step=row["env_steps"])

    def final_video(self, run_dir: RunDir) -> None:
        """Render the final policy and log the video; a machine without a headless GL
        gets a warning, not a failed run."""
        import wandb

        try:
            from mjxsac.render import render_run

            path = render_run(run_dir.path, run_dir.path / "final.mp4", episodes=1)
        except Exception as e:  # rendering is a bonus: never lose the run over it
            print(f"mjxsac-train: no final video ({type(e).__name__}: {e})", file=sys.stderr)
            return
        self.run.log({"video": wandb.Video(str(path), format="mp4")})

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)
