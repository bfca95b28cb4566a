"""The persistent compilation cache (CPU): a second process with the same shapes and
another seed compiles nothing; another shape or a change of the code compiles anew and
trains; ``--compile-cache off`` writes no cache. Each run is a separate process (what a
sweep agent, a resume or a rerun does), on InvertedPendulum with small networks; what was
compiled and loaded comes from the command's own report (JAX's compile events and cache
logging), never from timings."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("compile-cache")

ROOT = Path(__file__).parent.parent
SMALL = ["--env", "InvertedPendulum", "--preset", "cpu", "--hidden-sizes", "32", "32",
         "--total-steps", "2000", "--warmup-steps", "500", "--eval-envs", "2"]  # fmt: skip
SUMMARY = re.compile(
    r"compilation cache (.+): (\d+) programs loaded, (\d+) compiled; "
    r"traced programs: (\d+) loaded, (\d+) traced"
)
# Every process runs this program: with the patch, a change of the code made at run time
# (the target networks move at twice the rate), without it the same namespace, so that a
# key that differs can only have seen the patch.
PROGRAM = (
    "import sys; import mjxsac.sac as sac; polyak = sac.polyak; sac.polyak = {};"
    "from mjxsac import train; train.main(sys.argv[1:])"
)
PATCHED = PROGRAM.format("lambda target, online, tau: polyak(target, online, 2 * tau)")
UNPATCHED = PROGRAM.format("polyak")
HASH_SEEDS = itertools.count(1)  # each process its own: keys must not depend on it


def run(home: Path, run_dir: Path, *extra: str, patched: bool = False) -> dict:
    """One training process with ``home`` as its home and XDG cache base; returns what it
    reported about the compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "MJXSAC_COMPILE_CACHE"}
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env |= {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": path, "PYTHONHASHSEED": str(next(HASH_SEEDS))}  # fmt: skip
    program = PATCHED if patched else UNPATCHED
    argv = [sys.executable, "-c", program, *SMALL, "--run-dir", str(run_dir), *extra]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env_steps"] == 2000 and np.isfinite(rows[-1]["eval/return_mean"])
    assert rows[-1]["updates"] > 0 and np.isfinite(rows[-1]["loss/critic_loss"])
    match = SUMMARY.search(done.stderr)
    if match is None:
        return {"off": "compilation cache off" in done.stderr, "stderr": done.stderr}
    return {"dir": Path(match[1]), "loaded": int(match[2]), "compiled": int(match[3]),
            "traces_loaded": int(match[4]), "traced": int(match[5])}  # fmt: skip


def cache_files(home: Path) -> list[Path]:
    """JAX's cache entries under ``home`` (other libraries keep caches there too)."""
    return [p for p in home.rglob("*-cache") if p.is_file()]


def traced_files(home: Path) -> list[Path]:
    """Traced programs kept under ``home`` (``mjxsac.traced``)."""
    return list(home.rglob("*.exported"))


def test_second_process_loads_everything_and_changes_compile_anew(tmp_path):
    home = tmp_path / "home"
    first = run(home, tmp_path / "a", "--seed", "0")
    assert first["dir"] == home / ".cache" / "mjxsac" / "jax", "the XDG default"
    assert first["loaded"] == 0 and first["compiled"] > 0
    # The three programs (init, train chunk, evaluation) are traced and kept.
    assert first["traced"] == 3 and first["traces_loaded"] == 0
    entries = cache_files(first["dir"])
    assert len(entries) >= first["compiled"]
    assert len(traced_files(first["dir"])) == 3

    # Same shapes, another seed: every program comes from the cache, traced ones too.
    second = run(home, tmp_path / "b", "--seed", "1")
    assert second["compiled"] == 0 and second["loaded"] == first["compiled"]
    assert second["traced"] == 0 and second["traces_loaded"] == 3

    # Another batch size: the train chunk compiles anew (and trains, checked in run);
    # evaluation and initialization, whose programs do not depend on it, are loaded once
    # traced. A traced program's key holds the whole config (which fields a program reads
    # is only known by tracing it), so all three are traced anew.
    other = run(home, tmp_path / "c", "--seed", "1", "--batch-size", "128")
    assert other["compiled"] >= 1 and other["loaded"] >= 1
    assert other["traced"] == 3 and other["traces_loaded"] == 0

    # A change of the code (made at run time, the files are the same) is a miss for the
    # traced programs and the executables that it changes, never the stale program.
    patched = run(home, tmp_path / "d", "--seed", "1", patched=True)
    assert patched["compiled"] >= 1 and patched["loaded"] >= 1
    assert patched["traced"] == 3 and patched["traces_loaded"] == 0
    assert len(cache_files(first["dir"])) > len(entries)


def test_compile_cache_off_writes_no_cache(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    report = run(home, tmp_path / "run", "--compile-cache", "off")
    assert report.get("off"), report
    assert cache_files(home) == [] and not (home / ".cache" / "mjxsac").exists()
    assert traced_files(home) == []


def test_option_and_directory(monkeypatch, tmp_path):
    from mjxsac import compile_cache

    assert compile_cache.option(["--seed", "1", "--compile-cache", "off", "--debug"]) == (
        "off", ["--seed", "1", "--debug"])  # fmt: skip
    assert compile_cache.option([f"--compile-cache={tmp_path}"]) == (str(tmp_path), [])
    with pytest.raises(ValueError, match="needs a value"):
        compile_cache.option(["--compile-cache"])
    monkeypatch.delenv("MJXSAC_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve() == tmp_path / "xdg" / "mjxsac" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.resolve() == tmp_path / ".cache" / "mjxsac" / "jax"
    monkeypatch.setenv("MJXSAC_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache.resolve() == tmp_path / "env"
    assert compile_cache.resolve("off") is None, "the option wins over the variable"


def test_bench_compile_times_the_first_update_itself():
    """launch/bench_compile's first chunk ends with the first updates (its warm-up is one
    chunk long), so its end is the time to the first update, not a bound that adds a
    chunk of training; a warm-up given on the command line is kept."""
    from launch.bench_compile import CPU_SCALE, first_update_at_chunk_end
    from launch.bench_sac import make_config

    config = first_update_at_chunk_end(
        make_config("Hopper", "sac-v2", "parallel", 0, CPU_SCALE), []
    )
    per_step = config.num_envs
    assert config.update_start == per_step * config.steps_per_chunk  # ready after the last step
    assert config.update_start >= config.batch_size
    chosen = make_config("Hopper", "sac-v2", "parallel", 0, [*CPU_SCALE, "warmup_steps=256"])
    assert first_update_at_chunk_end(chosen, ["warmup_steps=256"]).update_start == 256


def test_a_loaded_traced_program_runs_like_jit(tmp_path):
    """Initialization and a train chunk (updates included), traced and kept as a first
    process keeps them, then loaded and run as a second one runs them, give jit's bits.
    (A first process runs the same call to the same exported program; evaluation goes
    the same way; the process test above checks that they train and evaluate.)"""
    import jax

    from mjxsac import traced
    from mjxsac.config import Config
    from mjxsac.sac import Trainer

    trainer = Trainer(Config(env="InvertedPendulum", num_envs=4, eval_envs=2, batch_size=32,
                             buffer_size=1_000, hidden_sizes=(16, 16), steps_per_chunk=8,
                             warmup_steps=16, updates_per_step=2))  # fmt: skip

    def run_all(trace_only: bool = False) -> list:
        init = traced.Program(Trainer._init)
        chunk = traced.Program(Trainer._train_chunk, donate=True)
        if trace_only:  # what a first process keeps, without compiling it here again
            state = jax.eval_shape(lambda: Trainer._init(trainer, *trainer.init_args()))
            init.trace(trainer, *trainer.init_args())
            chunk.trace(trainer, state)
            return []
        state = init(trainer, *trainer.init_args())
        state, metrics = chunk(trainer, state)
        assert int(state.updates[0]) > 0
        return [np.asarray(x) for x in jax.tree.leaves((state, metrics))]

    try:
        traced.configure(None)
        reference = run_all()
        traced.configure(tmp_path)
        kept, loaded = len(traced.traced()), len(traced.loaded())
        run_all(trace_only=True)
        assert len(traced.traced()) - kept == 2 and len(traced.loaded()) == loaded
        assert len(list(tmp_path.glob("*.exported"))) == 2
        result = run_all()
        assert len(traced.loaded()) - loaded == 2 and len(traced.traced()) - kept == 2
    finally:
        traced.configure(None)
    assert len(result) == len(reference)
    for a, b in zip(result, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def test_traced_program_key_follows_the_code(monkeypatch):
    """The code digest in a traced program's key changes with a function or method
    replaced at run time (ours or a library's), a class attribute (a number, a dict's
    item), a constant; run-time state (counters) leaves it alone; JAX's settings are in
    the key beside it."""
    import jax
    from mujoco import mjx

    import envs
    from mjxsac import sac, traced

    ant = envs.make("Ant").__class__  # imported first: the walk covers imported modules
    base = traced.code_digest()
    assert traced.code_digest() == base
    monkeypatch.setattr(traced, "_loaded", ["not code"])  # run-time state
    assert traced.code_digest() == base
    changes = [
        (sac, "polyak", lambda target, online, tau: target),
        (sac.Trainer, "_updates", lambda self, state, count: (state, {})),
        (ant, "frame_skip", 4),
        (ant, "solver_defaults", {**ant.solver_defaults, "iterations": 2}),
        (sac, "ACTOR_METRICS", frozenset()),  # a constant of ours
        (mjx, "solve", lambda m, d: d),  # a library's function, patched
    ]
    for owner, name, value in changes:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, value)
            assert traced.code_digest() != base, name
        assert traced.code_digest() == base
    settings = traced._settings()  # the key's other half of what is not code
    with jax.default_matmul_precision("highest"):
        assert traced._settings() != settings


class Tiny:
    """A trainer's stand-in for the failure paths: a config identity and one method, a
    program that compiles in milliseconds."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.config = types.SimpleNamespace(compiled_identity=lambda: ("tiny", scale))

    def __hash__(self) -> int:
        return hash(self.scale)

    def __eq__(self, other) -> bool:
        return isinstance(other, Tiny) and other.scale == self.scale

    def _double(self, tree):
        return {"y": tree["x"] * self.scale}


def test_kept_programs_fall_back_to_jit_on_any_damage(tmp_path, monkeypatch, capsys):
    """A damaged file, a kept program that fails to lower, a directory that cannot be
    written, a program jax.export refuses: each still runs (through jit's own stages),
    with the damage removed or a notice, never a failed run."""
    import jax
    import jax.numpy as jnp

    from mjxsac import traced

    x = {"x": jnp.arange(3.0)}

    def run(directory) -> list[float]:
        traced.configure(directory)
        return np.asarray(traced.Program(Tiny._double)(Tiny(2.0), x)["y"]).tolist()

    try:
        assert run(tmp_path) == [0.0, 2.0, 4.0] and traced.traced()[-1] == "double"
        (kept,) = tmp_path.glob("*.exported")
        loads = len(traced.loaded())
        assert run(tmp_path) == [0.0, 2.0, 4.0] and len(traced.loaded()) == loads + 1

        kept.write_bytes(b"damaged")  # does not load: traced anew, replaced
        traces = len(traced.traced())
        assert run(tmp_path) == [0.0, 2.0, 4.0] and len(traced.traced()) == traces + 1
        assert kept.read_bytes() != b"damaged"

        with monkeypatch.context() as patch:  # loads, fails to lower: removed, jit's stages
            patch.setattr(jax.export.Exported, "call", lambda *a, **k: 1 / 0)
            assert run(tmp_path) == [0.0, 2.0, 4.0]
        assert not kept.exists() and "traced anew" in capsys.readouterr().err

        blocker = tmp_path / "file"
        blocker.write_text("")
        assert run(blocker / "traced") == [0.0, 2.0, 4.0]  # cannot be written: runs

        with monkeypatch.context() as patch:  # refused by jax.export: a notice, once
            patch.setattr(jax.export, "export", lambda *a, **k: 1 / 0)
            assert run(tmp_path / "refused") == [0.0, 2.0, 4.0]
            assert "cannot be kept traced" in capsys.readouterr().err
            assert run(tmp_path / "refused") == [0.0, 2.0, 4.0]
            assert capsys.readouterr().err == ""
        assert list((tmp_path / "refused").glob("*.unexportable"))
        assert not list(tmp_path.glob(".*"))  # no partial file left behind
    finally:
        traced.configure(None)
