"""Hostile inputs that need no trained run: every one is refused in one line before
anything is compiled or written, or does what it says without touching the network or a
file it did not create. (Refusals that need a checkpoint are in tests/test_runs.py.)"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mjxsac import compile_cache, render
from mjxsac import train as train_cli
from mjxsac.cli import one_line_errors, quiet_libraries
from mjxsac.config import Config
from mjxsac.runlog import MARKER, RunDir, RunDirError
from mjxsac.sac import Trainer

ROOT = Path(__file__).parent.parent
BASE = ["--env", "InvertedPendulum", "--preset", "cpu", "--warmup-steps", "1000"]


def refused(argv: list[str], capsys) -> str:
    """The one-line message ``mjxsac-train`` exits with for ``argv``."""
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("mjxsac-train: ") and "\n" not in message, message
    assert len(message) > len("mjxsac-train: ") + 10, "the message says something"
    assert "Traceback" not in capsys.readouterr().err
    return message


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file()}  # fmt: skip


# ---- a directory that is not a run is never written over (item 1) -------------------------


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_directory_that_is_not_a_run_is_refused_and_untouched(dry_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own config"}\n')
    (mine / "learning_curve.png").write_bytes(b"my plot")
    before = files(mine)
    message = refused([*BASE, "--run-dir", str(mine), *["--dry-run"] * dry_run], capsys)
    assert "not a run directory" in message and "config.json" in message
    assert "learning_curve.png" in message
    assert files(mine) == before and not (mine / ".lock").exists(), "nothing written"


def test_a_run_directory_is_recognised_by_its_marker(tmp_path):
    """An empty directory, or one a run claimed but never trained in, takes a new run; the
    marker does not make foreign files acceptable."""
    empty = tmp_path / "empty"
    empty.mkdir()
    RunDir(empty).check_new()
    RunDir(tmp_path / "missing").check_new()
    started = RunDir(tmp_path / "started")
    started.claim(resume=False)
    started.write_config(Config())
    started.release()
    assert (started.path / MARKER).exists()
    started.check_new()  # a run that never trained: may start over
    (started.path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not a run directory \(it holds notes.txt\)"):
        started.check_new()


# ---- refused before compiling (items 5, 6, 9, 13) ------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-step", "100000"], "n_step (100000) exceeds episode_length (1000)"),
        (["--n-step", "100", "--buffer-size", "1000", "--warmup-steps", "0",
          "--batch-size", "64"], "more than buffer_size"),
        (["--hidden-sizes", "50000", "50000"], "lower hidden_sizes"),
        (["--seeds", "0-1", "--vary", "target_entropy=nan,-1"], "must be finite"),
        (["--vary", "critic_lr=3e-4,inf"], "must be finite"),
        (["--vary", "init_alpha=1e400"], "must be finite"),
        (["--vary", "critic_lr=-1"], "critic_lr must be positive"),
        (["--env-options", "reset_noise_scale=nan"], "must be a finite number"),
        (["--env", "Hopper", "--env-options", "healthy_z_range=nan,1"], "healthy_z_range"),
        (["--env", "Hopper", "--env-options", "healthy_z_range=2,1"], "low <= high"),
        (["--warmup-steps", "30000", "--total-steps", "20000"], "no update would ever happen"),
        (["--learning-starts", "30000", "--buffer-size", "100000", "--total-steps", "20000"],
         "no update would ever happen"),
        (["--seeds", "0-99999999"], "make 100,000,000 members"),
        (["--algo", "sac-v3"], "unknown algo 'sac-v3'; valid: sac-v2, sac-v1"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_impossible_values_are_refused_before_compiling(
    argv, message, dry_run, compile_count, tmp_path, capsys
):
    Trainer(train_cli.parse_args(BASE)[0])  # building the env compiles eager ops once
    before = compile_count()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library warning (tyro's) on the way
        got = refused([*BASE, *argv, "--run-dir", str(tmp_path / "bad"),
                       *["--dry-run"] * dry_run], capsys)  # fmt: skip
    assert message in got
    assert compile_count() == before
    assert not (tmp_path / "bad").exists(), "nothing written"


def test_dry_run_refuses_what_the_run_refuses_and_writes_nothing(tmp_path, capsys):
    message = refused([*BASE, "--buffer-size", str(10**12), "--dry-run"], capsys)
    assert "the replay buffer needs" in message
    run_dir = tmp_path / "dry"
    train_cli.main([*BASE, "--dry-run", "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") : out.rindex("}") + 1])["run_dir"] == str(run_dir)
    assert "nothing written" in out and not run_dir.exists()


def test_tuple_task_options_can_be_given(tmp_path, capsys):
    for options in ("healthy_z_range=0.5,inf,ctrl_cost_weight=0.01",
                    "healthy_z_range=(0.5, inf),ctrl_cost_weight=0.01"):  # fmt: skip
        config = Config(env="Hopper", env_options=options).validate()
        assert config.env_kwargs() == {"healthy_z_range": (0.5, float("inf")),
                                       "ctrl_cost_weight": 0.01}  # fmt: skip
    train_cli.main(["--env", "Hopper", "--preset", "cpu", "--env-options",
                    "healthy_z_range=0.5,inf", "--dry-run"])  # fmt: skip
    assert "dry run" in capsys.readouterr().out
    assert Trainer(config).env.healthy_z_range == (0.5, float("inf"))
    with pytest.raises(ValueError, match=r"must be 2 numbers like healthy_z_range=0\.7,inf"):
        Config(env="Hopper", env_options="healthy_z_range=0.5").validate()


def test_a_value_from_json_or_a_sweep_names_the_choices():
    with pytest.raises(ValueError, match="critic must be one of mse, c51, got 'c52'"):
        Config.from_dict({**Config().to_dict(), "critic": "c52"}).validate()


def test_an_empty_error_still_says_what_happened():
    with pytest.raises(SystemExit) as exit_info, one_line_errors("mjxsac-train", False):
        raise MemoryError()
    assert "out of memory" in str(exit_info.value.code)


# ---- the compilation cache option (item 7) -------------------------------------------------


def test_compile_cache_takes_the_usual_words_and_never_an_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for word in ("off", "OFF", "none", "None", "0", "false", "no", "disabled"):
        assert compile_cache.resolve(word) is None, word
        monkeypatch.setenv("MJXSAC_COMPILE_CACHE", word)
        assert compile_cache.resolve() is None, word
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for word in ("default", "on", "1", "TRUE"):
        assert compile_cache.resolve(word) == tmp_path / ".cache" / "mjxsac" / "jax", word
    monkeypatch.setenv("MJXSAC_COMPILE_CACHE", "")
    assert compile_cache.resolve() == tmp_path / ".cache" / "mjxsac" / "jax", "empty: unset"
    monkeypatch.setenv("MJXSAC_COMPILE_CACHE", "off")
    message = refused(["--compile-cache", "--run-dir", "runs/x", "--dry-run"], capsys)
    assert "--compile-cache needs a value, not the option --run-dir" in message
    with pytest.raises(ValueError, match="is empty"):
        compile_cache.option(["--compile-cache="])
    assert list(tmp_path.iterdir()) == [], "no directory named after a word or an option"


# ---- messages (items 11, 12, 15) -----------------------------------------------------------


class Exited(Exception):
    """What the handler's exit does in a test (instead of ending the process)."""


def handler(run_dir: Path, clock: list[float]):
    """A ``SignalHandler`` whose exit raises and whose clock the test sets."""
    exits: list[int] = []

    def exit_(code: int) -> None:
        exits.append(code)
        raise Exited

    stop = train_cli.StopRequest()
    return train_cli.SignalHandler(stop, RunDir(run_dir), exit_, lambda: clock[0]), stop, exits


def test_one_stop_request_delivered_twice_is_one_request(tmp_path, capsys):
    """``timeout`` (and batch schedulers) signal the process and its group: the same
    SIGTERM or SIGHUP twice at once is one request; a later one, or a second Ctrl-C at
    once, stops at once. Before any checkpoint, the message does not promise one."""
    assert signal.SIGHUP in train_cli.SignalHandler.SIGNALS
    clock = [100.0]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        on_signal, stop, exits = handler(tmp_path / "run", clock)
        on_signal(signum)
        clock[0] += 0.01
        on_signal(signum)
        assert stop.signums == [signum] and exits == [], "one request"
        assert capsys.readouterr().err.count(f"{signum.name} received") == 1
        clock[0] += 2.0
        with pytest.raises(Exited):
            on_signal(signum)
        assert exits == [128 + signum]
        err = capsys.readouterr().err
        assert f"second signal ({signum.name}): stopping now" in err
        assert "no checkpoint was saved yet" in err and "--resume" not in err
    on_signal, stop, exits = handler(tmp_path / "run", clock)
    on_signal(signal.SIGINT)
    with pytest.raises(Exited):
        on_signal(signal.SIGINT)
    assert exits == [128 + signal.SIGINT], "a second Ctrl-C stops at once"


def test_suggested_commands_quote_paths_with_spaces(tmp_path, capsys):
    run_dir = tmp_path / "my runs" / "a run"
    (run_dir / "checkpoints" / "2000").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"env_steps": 2000}\n')
    on_signal, _, _ = handler(run_dir, [0.0])
    on_signal(signal.SIGTERM)
    with pytest.raises(Exited):
        on_signal(signal.SIGINT)
    assert f"mjxsac-train --resume '{run_dir}'" in capsys.readouterr().err
    message = refused([*BASE, "--run-dir", str(run_dir)], capsys)
    assert f"--resume '{run_dir}'" in message


def test_tyro_errors_name_the_command(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--gamma", "abc", "--dry-run"])
    err = capsys.readouterr().err
    assert "mjxsac-train --help" in err and "train.py" not in err


def test_unretrieved_task_errors_of_a_failed_save_are_not_printed(caplog):
    """A failed asynchronous save leaves sibling tasks whose errors nobody awaits; asyncio
    would log each with a traceback after the one-line error."""
    quiet_libraries()

    async def failing() -> None:
        raise OSError(28, "No space left on device")

    async def start() -> None:
        task = asyncio.ensure_future(failing())
        await asyncio.sleep(0.01)
        assert task.done()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.close()
    del loop
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def read_only(directory: Path):
    """Make ``directory`` unwritable: its mode for a user, a read-only bind mount for
    root (whom modes do not stop); skip where neither works."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return lambda: directory.chmod(0o755)
    mount = ["mount", "--bind", str(directory), str(directory)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount here")
    remount = ["mount", "-o", "remount,bind,ro", str(directory), str(directory)]
    if subprocess.run(remount, capture_output=True).returncode:
        subprocess.run(["umount", str(directory)], check=True)
        pytest.skip("cannot remount read-only here")
    return lambda: subprocess.run(["umount", str(directory)], check=True)


def test_an_unwritable_compile_cache_is_one_notice(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    undo = read_only(cache)
    program = (
        "import sys, jax; from mjxsac import compile_cache;"
        "compile_cache.configure_for('mjxsac-train', sys.argv[1]);"
        "[jax.jit(lambda x, i=i: x * i + 1)(1.0) for i in range(4)]"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-c", program, str(cache)], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        undo()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count(f"the compilation cache {cache} cannot be written") == 1
    assert "Error writing persistent compilation cache" not in done.stderr


# ---- mjxsac-render checks what it can before the rollout (items 13, 14) -------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-steps", "-5"], "--max-steps must be a positive integer, got -5"),
        (["--max-steps", "0"], "--max-steps must be a positive integer, got 0"),
        (["--episodes", "0"], "--episodes must be a positive integer"),
        (["--out", "{dir}"], "is a directory"),
        (["--out", "{dir}/video.xyz"], "a video needs one of the extensions .mp4"),
    ],
)
def test_render_refuses_bad_options_before_the_rollout(extra, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)  # found, never loaded
    extra = [e.format(dir=tmp_path) for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        render.main([str(run_dir), *extra])
    got = str(exit_info.value.code)
    assert got.startswith("mjxsac-render: ") and message in got and "\n" not in got
    assert "episode 0" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "run"]


# ---- an offline wandb run reaches no network (item 4) --------------------------------------

GUARD = """
# sitecustomize: loaded by Python at start-up. Records, and refuses, every attempt of this
# process to reach the network: a name lookup or a connection to another machine.
import os, socket

_LOG = os.environ["MJXSAC_NETWORK_LOG"]
_LOCAL = ("localhost", "127.", "::1", "0.0.0.0")


def _local(host):
    host = host.decode() if isinstance(host, bytes) else host
    return host is None or str(host).startswith(_LOCAL)


def _refuse(what, target):
    with open(_LOG, "a") as f:
        f.write(f"{what} {target!r}\\n")
    raise OSError(f"network access refused by the test: {what} {target!r}")


def _guard(method):
    def guarded(self, address, *args):
        if self.family != socket.AF_UNIX and not _local(address[0]):
            _refuse(method.__name__, address)
        return method(self, address, *args)
    return guarded


socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if not _local(host):
        _refuse("getaddrinfo", host)
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
"""
# The command with wandb as a run drives it (start, rows, the final video, finish), its
# training replaced by one logged row: what wandb does needs no trained policy.
WANDB_RUN = """
import sys
import imageio.v2 as imageio
import numpy as np
from mjxsac import train

def one_row(trainer, run, state=None, progress=None, wandb_log=None, stop=None):
    row = {"chunk": 0, "env_steps": 2000, "eval/return_mean": 1.0, "loss/critic_loss": 0.5}
    run.append_metrics(row)
    wandb_log.log(row, [row])

def small_video(run):
    path = run.path / "final.mp4"
    imageio.mimsave(path, [np.zeros((16, 16, 3), np.uint8)] * 4, fps=4)
    return path, 0

train.train, train.render_final_video = one_row, small_video
train.main(sys.argv[1:])
"""


def test_offline_wandb_reaches_no_network(tmp_path):
    """wandb's telemetry ran at the end of an offline run (a DNS lookup and a POST) and
    after ``wandb.init`` in the process's exit handlers: the whole process runs under a
    guard that records any attempt."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"PYTHONPATH": os.pathsep.join([str(guard), str(ROOT)]), "JAX_PLATFORMS": "cpu",
            "MJXSAC_NETWORK_LOG": str(log), "WANDB_SILENT": "true",
            "HOME": str(tmp_path)}  # fmt: skip
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-c", WANDB_RUN, *BASE, "--wandb", "--run-dir", str(run_dir)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), "an offline wandb run"
    assert not log.exists(), f"network access attempted: {log.read_text()}"


def test_echoes_of_an_orbax_failure_are_dropped_and_other_errors_kept(monkeypatch):
    """After a failed checkpoint read, Orbax's abandoned sibling reads raise the failure
    again as their coroutines are collected (seen on a busy machine, after the one-line
    error); the hook drops those and passes every other unraisable exception on."""
    import types

    from mjxsac.cli import drop_closed_loop_noise

    passed_on = []
    monkeypatch.setattr(sys, "__unraisablehook__", passed_on.append)
    for filename, shown in (("/site-packages/orbax/checkpoint/serialization.py", False),
                            ("/site-packages/other/module.py", True)):  # fmt: skip
        scope: dict = {}
        exec(compile("async def read(): pass", filename, "exec"), scope)
        coroutine = scope["read"]()
        args = types.SimpleNamespace(exc_value=Exception("reading failed"), object=coroutine)
        drop_closed_loop_noise(args)
        coroutine.close()
        assert (passed_on[-1:] == [args]) == shown
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
    drop_closed_loop_noise(closed)
    assert len(passed_on) == 1
