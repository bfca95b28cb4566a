"""The persistent compilation cache (CPU): a second process with the same shapes and
another seed compiles nothing; then a subclass of the trainer (a change of the code, same
config) runs its own program (another shape compiles anew too: JAX's key holds the
shapes, so no test pays a process for it);
``--compile-cache off`` writes no cache (checked on the multi-device run of
tests/test_devices.py, a process started anyway). Each run is a separate process (what
a sweep agent, a resume or a rerun does), on InvertedPendulum with small networks; what was
compiled and loaded comes from the command's own report (JAX's compile events and cache
logging), never from timings."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("compile-cache")

ROOT = Path(__file__).parent.parent
SMALL = ["--env", "InvertedPendulum", "--preset", "cpu", "--hidden-sizes", "32", "32",
         "--total-steps", "2000", "--warmup-steps", "500", "--eval-envs", "2"]  # fmt: skip
SUMMARY = re.compile(r"compilation cache (.+): (\d+) programs loaded, (\d+) compiled")
# Every process runs the command as a sweep agent or a resume does; the ablation's with
# a subclass of the trainer (the critic's update skipped), the same config, and then
# prints how far training moved the critic from its initial parameters.
PROGRAM = "import sys; from mjxsac import train; train.main(sys.argv[1:])"
ABLATION = """
import sys
import jax, numpy as np
from mjxsac import train
from mjxsac.checkpoint import Checkpoints
from mjxsac.sac import Trainer

class FrozenCritic(Trainer):
    def update(self, state, *args):
        new, metrics = super().update(state, *args)
        return new.replace(critic=state.critic, critic_opt=state.critic_opt), metrics

train.Trainer = FrozenCritic
train.main(sys.argv[1:])
run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
ckpt = Checkpoints(run_dir + "/checkpoints", read_only=True)
trainer = FrozenCritic(ckpt.config())
moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                     ckpt.restore(trainer).critic, trainer.init().critic)
print("critic moved", max(jax.tree.leaves(moved)))
"""
HASH_SEEDS = itertools.count(1)  # each process its own: keys must not depend on it


def run(home: Path, run_dir: Path, *extra: str, program: str = PROGRAM) -> dict:
    """One training process with ``home`` as its home and XDG cache base; returns what it
    reported about the compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "MJXSAC_COMPILE_CACHE"}
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env |= {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": path, "PYTHONHASHSEED": str(next(HASH_SEEDS))}  # fmt: skip
    argv = [sys.executable, "-c", program, *SMALL, "--run-dir", str(run_dir), *extra]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env_steps"] == 2000 and np.isfinite(rows[-1]["eval/return_mean"])
    assert rows[-1]["updates"] > 0 and np.isfinite(rows[-1]["loss/critic_loss"])
    match = SUMMARY.search(done.stderr)
    assert match, done.stderr[-2000:]
    moved = re.search(r"critic moved (\S+)", done.stdout)
    return {"dir": Path(match[1]), "loaded": int(match[2]), "compiled": int(match[3]),
            "critic_moved": float(moved[1]) if moved else None}  # fmt: skip


def cache_files(home: Path) -> list[Path]:
    """JAX's cache entries under ``home`` (other libraries keep caches there too)."""
    return [p for p in home.rglob("*-cache") if p.is_file()]


def test_second_process_loads_everything(tmp_path):
    home = tmp_path / "home"
    first = run(home, tmp_path / "a", "--seed", "0")
    assert first["dir"] == home / ".cache" / "mjxsac" / "jax", "the XDG default"
    assert first["loaded"] == 0 and first["compiled"] > 0
    entries = cache_files(first["dir"])
    assert len(entries) >= first["compiled"]

    # Same shapes, another seed: every program comes from the cache.
    second = run(home, tmp_path / "b", "--seed", "1")
    assert second["compiled"] == 0 and second["loaded"] == first["compiled"]

    # An ablation subclass of the trainer, same config, later process: it trains with its
    # own program (a cache keyed by the config alone served the plain trainer's, whose
    # critic moves), while the programs it shares (init, evaluation) load.
    ablation = run(home, tmp_path / "c", "--seed", "1", program=ABLATION)
    assert ablation["critic_moved"] == 0.0, ablation
    assert ablation["compiled"] >= 1 and ablation["loaded"] >= 1, ablation


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
