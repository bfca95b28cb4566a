"""What a run leaves on disk and on the terminal: the run directory, metrics JSONL, the
learning-curve PNG and the progress line."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from mjxsac.cli import UserError, describe_os_error
from mjxsac.config import Config


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.env}-{config.algo}-s{config.seed}-{stamp}"


class RunDirError(UserError):
    """The run directory holds another run, is in use, or cannot be written."""


class RunDir:
    """A run directory: ``config.json``, ``metrics.jsonl``, ``learning_curve.png``,
    ``checkpoints/``. Metrics rows are appended and flushed one by one, so a run that dies
    keeps every row written before.

    One process at a time owns a run directory (``claim``): a lock file ``.lock`` holds the
    owner's pid and host under an advisory ``flock``, which the kernel releases when the
    owner dies, so a lock left by a dead process is recognised as stale."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: IO | None = None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def holds_run(self) -> bool:
        """Whether a run has trained here: metrics written or checkpoints saved."""
        has_metrics = self.metrics_path.exists() and self.metrics_path.stat().st_size > 0
        return has_metrics or (self.checkpoints.is_dir() and any(self.checkpoints.iterdir()))

    def refuse_if_holds_run(self) -> None:
        """A new run never overwrites another: it names the ways on instead."""
        if self.holds_run():
            raise RunDirError(
                f"{self.path} already holds a run: continue it with --resume {self.path}, "
                "or choose a fresh --run-dir (nothing was changed)"
            )

    def claim(self, resume: bool) -> str | None:
        """Create the directory and take its lock. A new run refuses a directory that holds a
        run; any run refuses one in use by a live process. Returns a notice when a stale lock
        of a dead process was taken over."""
        if not resume:
            self.refuse_if_holds_run()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = self.lock_path.open("a+")
        except OSError as e:
            raise RunDirError(
                describe_os_error(e, f"creating the run directory {self.path}")
            ) from None
        lock.seek(0)
        previous = _parse_lock(lock.read())
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise RunDirError(
                f"{self.path} is in use by {_owner(previous)}: wait for it to end or stop it, "
                "or choose another --run-dir"
            ) from None
        notice = None
        if previous and previous.get("host") != socket.gethostname():
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
            raise RunDirError(
                f"{self.path} is locked by {_owner(previous)}, which this machine cannot check:"
                f" if that process has ended, delete {self.lock_path}"
            )
        if previous:
            notice = (
                f"{self.path} was left locked by {_owner(previous)}, which is no longer "
                "running (a stale lock): taking it over"
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%c")}
        lock.seek(0)
        lock.truncate()
        lock.write(json.dumps(me) + "\n")
        lock.flush()
        self._lock = lock
        return notice

    def release(self) -> None:
        """Empty the lock file and unlock (an empty lock file is a free directory)."""
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            self._lock.seek(0)
            self._lock.truncate()
            self._lock.flush()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
        self._lock = None

    def write_config(self, config: Config) -> None:
        write_atomic(self.path / "config.json", json.dumps(config.to_dict(), indent=1) + "\n")

    def append_metrics(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        """The rows written so far. A partial last line (a process killed while writing it)
        is left out; a malformed line elsewhere is an error naming it."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().split("\n")
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # no newline after it: the write was cut off
                    continue
                raise RunDirError(
                    f"{self.metrics_path} line {number} is not JSON: repair or remove that line"
                ) from None
        return rows

    def truncate_metrics(self, env_steps: int) -> None:
        """Drop rows beyond ``env_steps`` (a resumed run rewrites them) and any partial
        last line."""
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
        try:
            fig.savefig(tmp)
        finally:
            plt.close(fig)
        tmp.replace(out)
        return out


def _parse_lock(text: str) -> dict:
    try:
        owner = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?"}
    return owner if isinstance(owner, dict) else {"pid": "?", "host": "?"}


def _owner(owner: dict) -> str:
    since = f" (since {owner['since']})" if owner.get("since") else ""
    return f"process {owner.get('pid', '?')} on {owner.get('host', '?')}{since}"


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

    def log_video(self, path: Path) -> None:
        import wandb

        self.run.log({"video": wandb.Video(str(path), format="mp4")})

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)
