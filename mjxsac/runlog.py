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

import numpy as np

from envs.base import OVERFLOW
from mjxsac.cli import UserError, describe_os_error, quoted, write_atomic
from mjxsac.config import Config
from mjxsac.losses import ACTOR_METRICS

MARKER = ".mjxsac-run"
"""Written into a run directory when a new run claims it: the directory is a run's, and a
new run may start over in it as long as no run has trained there."""
# What runs (and mjxsac-render's default video) write into a run directory; with the
# marker, a new run may reuse a directory holding nothing else.
RUN_FILES = frozenset(
    {"config.json", "metrics.jsonl", "learning_curve.png", "population.json", "members",
     "checkpoints", "checkpoints-unusable", "wandb", "final.mp4", "video.mp4", "video.gif",
     ".lock", MARKER}
)  # fmt: skip
# What a new run may find in a directory without the marker: a lock (checked when the run
# claims the directory) and wandb's folder (wandb starts before the run claims it).
UNMARKED_FILES = frozenset({".lock", "wandb"})


def _written_by_run(name: str) -> bool:
    """A run's file, or the temporary file of one (a process killed while writing it)."""
    if name in RUN_FILES or name.removesuffix(".tmp") in RUN_FILES:
        return True
    return name == "learning_curve.tmp.png" or (name.startswith(".") and ".tmp" in name)


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
                f"{self.path} already holds a run: continue it with --resume "
                f"{quoted(self.path)}, or choose a fresh --run-dir (nothing was changed)"
            )

    def check_new(self) -> None:
        """A new run goes into a directory that does not exist, is empty, or holds only
        what a run that never trained left there (with the marker); a directory that holds
        a run, or anything a run did not write, is refused naming what is there."""
        self.refuse_if_holds_run()
        try:
            names = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        except OSError as e:
            doing = f"reading the run directory {self.path}"
            raise RunDirError(describe_os_error(e, doing)) from None
        if MARKER in names:
            foreign = [n for n in names if not _written_by_run(n)]
        else:
            foreign = [n for n in names if n not in UNMARKED_FILES]
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            shown = ", ".join(foreign[:5]) + more
            raise RunDirError(
                f"{self.path} is not empty and not a run directory (it holds {shown}): "
                "choose a new or empty --run-dir (nothing was changed)"
            )

    def check_free(self) -> None:
        """Refuse a directory another live process holds, without writing anything (a dry
        run's check)."""
        try:
            lock = self.lock_path.open("r")
        except OSError:
            return  # no lock file: free
        with lock:
            owner = _parse_lock(lock.read())
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                raise RunDirError(
                    f"{self.path} is in use by {_owner(owner)}: wait for it to end or stop it, "
                    "or choose another --run-dir"
                ) from None
            fcntl.flock(lock, fcntl.LOCK_UN)

    def claim(self, resume: bool) -> str | None:
        """Create the directory and take its lock. A new run refuses a directory that holds a
        run or files no run wrote (``check_new``) and marks it as a run's; any run refuses
        one in use by a live process. Returns a notice when a stale lock of a dead process
        was taken over."""
        if not resume:
            self.check_new()
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
        if not resume:
            try:
                marker = {"by": "mjxsac-train", "since": time.strftime("%c")}
                write_atomic(self.path / MARKER, json.dumps(marker) + "\n")
            except OSError as e:
                self.release()
                raise RunDirError(describe_os_error(e, f"writing {self.path / MARKER}")) from None
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
        write_atomic(self.path / "config.json", json.dumps(config.to_saved(), indent=1) + "\n")

    def write_population(self, config: Config) -> None:
        """``population.json``: each member's index, seed and varied values."""
        write_atomic(self.path / "population.json", json.dumps(config.members(), indent=1))

    def member_metrics_path(self, member: int) -> Path:
        return self.path / "members" / str(member) / "metrics.jsonl"

    def append_metrics(self, row: dict, member: int | None = None) -> None:
        """A row of ``metrics.jsonl`` (the run's; in a population, the population's
        summary) or of ``members/<k>/metrics.jsonl``."""
        path = self.metrics_path if member is None else self.member_metrics_path(member)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self, member: int | None = None) -> list[dict]:
        """The rows written so far. A partial last line (a process killed while writing it)
        is left out; a malformed line elsewhere is an error naming it."""
        path = self.metrics_path if member is None else self.member_metrics_path(member)
        if not path.exists():
            return []
        lines = path.read_text().split("\n")
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
                    f"{path} line {number} is not JSON: repair or remove that line"
                ) from None
        return rows

    def truncate_metrics(self, env_steps: int) -> None:
        """Drop rows beyond ``env_steps`` (a resumed run rewrites them) and any partial
        last line, in the run's and every member's file."""
        members = sorted(int(p.name) for p in (self.path / "members").glob("*") if p.name.isdigit())
        for member in [None, *members]:
            path = self.metrics_path if member is None else self.member_metrics_path(member)
            rows = [r for r in self.read_metrics(member) if r.get("env_steps", 0) <= env_steps]
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))

    def plot(self, title: str, config: Config | None = None) -> Path:
        """Evaluation and training returns against env steps, as ``learning_curve.png``. A
        population shows each setting's mean eval return over its seeds, with a band from
        the worst to the best seed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if config is not None and config.population_size > 1:
            self._plot_population(ax, config)
        else:
            rows = self.read_metrics()
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

    def _plot_population(self, ax, config: Config) -> None:
        import numpy as np

        settings: dict[str, list[int]] = {}
        for m in config.members():
            varied = ", ".join(f"{k}={v:g}" for k, v in m.items() if k not in ("index", "seed"))
            settings.setdefault(varied or "all seeds", []).append(m["index"])
        for label, indices in settings.items():
            curves = []
            for k in indices:
                rows = [r for r in self.read_metrics(k) if "eval/return_mean" in r]
                curves.append({r["env_steps"]: r["eval/return_mean"] for r in rows})
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            values = np.array([[c[x] for x in steps] for c in curves])
            seeds = f" ({len(indices)} seeds)" if len(indices) > 1 else ""
            (line,) = ax.plot(steps, values.mean(axis=0), "o-", markersize=3, label=label + seeds)
            if len(indices) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0),
                                color=line.get_color(), alpha=0.2)  # fmt: skip


class FollowerRunDir(RunDir):
    """A run directory as a process other than process 0 of a run over several processes
    sees it: it reads (a resume's checkpoints) and writes nothing; process 0 owns it."""

    def claim(self, resume: bool) -> str | None:
        return None

    def release(self) -> None:
        pass

    def write_config(self, config: Config) -> None:
        pass

    def write_population(self, config: Config) -> None:
        pass

    def append_metrics(self, row: dict, member: int | None = None) -> None:
        pass

    def truncate_metrics(self, env_steps: int) -> None:
        pass

    def plot(self, title: str, config: Config | None = None) -> Path:
        return self.path / "learning_curve.png"


def _parse_lock(text: str) -> dict:
    try:
        owner = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?"}
    return owner if isinstance(owner, dict) else {"pid": "?", "host": "?"}


def _owner(owner: dict) -> str:
    since = f" (since {owner['since']})" if owner.get("since") else ""
    return f"process {owner.get('pid', '?')} on {owner.get('host', '?')}{since}"


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
        self.eval_text = "-"
        self.lost = False

    def update(self, steps: int, steps_per_s: float, updates_per_s: float, elapsed: float,
               eval_returns: list[float] | None = None) -> None:  # fmt: skip
        """``eval_returns``: each member's last eval return (one for an ordinary run)."""
        if eval_returns:
            if len(eval_returns) == 1:
                self.eval_text = f"{eval_returns[0]:,.1f}"
            else:
                best, median, worst = max(eval_returns), median_of(eval_returns), min(eval_returns)
                self.eval_text = f"best {best:,.1f} / median {median:,.1f} / worst {worst:,.1f}"
        remaining = max(self.total - steps, 0) / steps_per_s if steps_per_s > 0 else math.inf
        line = (
            f"[{self.label}] {_si(steps)}/{_si(self.total)} steps "
            f"({100 * steps / max(self.total, 1):.0f}%) | {_si(steps_per_s)} env-steps/s | "
            f"{_si(updates_per_s)} updates/s | eval {self.eval_text} | "
            f"elapsed {_duration(elapsed)} | ETA {_duration(remaining)}"
        )
        now = time.monotonic()
        if self.tty:
            self._write("\r\x1b[2K" + line + ("\n" if eval_returns else ""))
        elif eval_returns or now - self.last_print >= self.every_s:
            self._write(line + "\n")
            self.last_print = now

    def message(self, text: str) -> None:
        self._write(("\r\x1b[2K" if self.tty else "") + text + "\n")

    def _write(self, text: str) -> None:
        """A terminal that went away (a dropped ssh session) ends the progress lines, not
        the run."""
        if self.lost:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.lost = True


def median_of(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


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
    ``wandb agent`` (``WANDB_SWEEP_ID`` set), whose sweep needs the server.

    A population logs each member as its own wandb run, grouped under the population's
    name; under a sweep agent the one run the agent started logs the population's summary
    (``eval/return_mean`` is the mean over the seeds of the sampled setting)."""

    def __init__(self, runs: list):
        self.runs = runs

    @classmethod
    def start(cls, config: Config, directory: Path | None = None) -> tuple[WandbLog, Config]:
        """``wandb.init``, then the config as the run holds it: values a sweep agent
        sampled (``WANDB_SWEEP_PARAM_PATH``) win over the command line. ``directory``:
        where wandb writes (default: the run directory; a dry run passes a temporary one)."""
        import os

        sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
        mode = os.environ.get("WANDB_MODE") or ("online" if sweep else "offline")
        if mode in ("offline", "dryrun", "disabled"):
            # Nothing leaves the machine: wandb's telemetry follows its global settings and
            # WANDB_ERROR_REPORTING, not the mode given to wandb.init, so both are set before
            # wandb starts (its service process inherits the environment).
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        if mode in ("offline", "dryrun", "disabled"):
            wandb.setup(wandb.Settings(mode=mode))
        root = directory or Path(config.run_dir or "runs")
        root.mkdir(parents=True, exist_ok=True)
        common = dict(project=config.wandb_project, entity=config.wandb_entity,
                      dir=str(root), mode=mode)  # fmt: skip
        members = config.population_size
        if members == 1 or sweep:
            run = wandb.init(config=config.to_dict(), **common)
            merged = Config.from_dict({**config.to_dict(), **dict(run.config)})
            run.config.update(merged.to_dict(), allow_val_change=True)
            return cls([run]), merged
        group = Path(config.run_dir).name if config.run_dir else default_run_dir(config).name
        runs = [
            wandb.init(
                config={**config.member(k).to_dict(), "member": k, "population": group},
                group=group,
                name=f"{group}-m{k}",
                reinit="create_new",
                **common,
            )
            for k in range(members)
        ]
        return cls(runs), config

    def attach(self, run_dir: RunDir) -> None:
        for run in self.runs:
            run.summary["run_dir"] = str(run_dir.path)

    def log(self, summary: dict, member_rows: list[dict]) -> None:
        """The run's row (one run) or each member's row to its own run."""
        rows = [summary] if len(self.runs) == 1 else member_rows
        for run, row in zip(self.runs, rows, strict=True):
            run.log({k: v for k, v in row.items() if k != "chunk"}, step=row["env_steps"])

    def log_video(self, path: Path, member: int = 0) -> None:
        import wandb

        run = self.runs[member if len(self.runs) > 1 else 0]
        run.log({"video": wandb.Video(str(path), format="mp4")})

    def finish(self, exit_code: int) -> None:
        """Finish the runs, then wait for wandb's service process to have written them (an
        offline run's files are complete only then, not when ``finish`` returns)."""
        import wandb

        for run in self.runs:
            run.finish(exit_code=exit_code)
        wandb.teardown(exit_code)


# ---- what a chunk's metrics say, per member -----------------------------------------------


def chunk_summaries(metrics: dict) -> list[dict[str, float]]:
    """Each member's chunk summary, from metrics stacked (train step, member)."""
    host = {k: np.asarray(v) for k, v in metrics.items()}
    members = next(iter(host.values())).shape[1]
    return [chunk_summary({k: v[:, i] for k, v in host.items()}) for i in range(members)]


def chunk_summary(metrics: dict) -> dict[str, float]:
    """Reduce one member's stacked per-step metrics to host floats."""
    m = {k: np.asarray(v) for k, v in metrics.items()}
    updated = m.pop("updated")
    actor_updates = m.pop("actor_updates", updated)
    episodes, returns = m.pop("episodes"), m.pop("episode_return_sum")
    out = {"train/reward": float(m.pop("reward").mean())}
    if OVERFLOW in m:  # Warp: env steps whose contacts or constraints overflowed a budget
        out["train/physics_overflows"] = float(m.pop(OVERFLOW).sum())
    if episodes.sum() > 0:
        out["train/episode_return"] = float(returns.sum() / episodes.sum())
    for k, v in m.items():
        # The actor's metrics are per-step averages over its updates (policy_delay).
        weight = actor_updates if k in ACTOR_METRICS else updated
        if weight.sum() > 0:
            out[f"loss/{k}"] = float((v * weight).sum() / weight.sum())
    return out
