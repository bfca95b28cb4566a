"""Same seed, same device, same numbers: short fixed runs of each algorithm and recipe
against their parameters as recorded before the core was reshaped.

``tests/data/regression.json`` holds, per run, a SHA-256 of every final parameter's bytes
and each leaf's sum, with the machine that recorded them (CPU model, jax and jaxlib
versions). On that machine the test is exact, bit for bit. On another, float results
differ in the last bits (other CPU, other XLA), so it compares the per-leaf sums within
1e-4 relative: a chunk this short does not amplify rounding that far (a member against its
single run differs by 5e-7 after the same chunk, tests/test_population.py), while a changed
loss, target or update order moves them by far more.

Record again (only for a deliberate numeric change, saying why in the commit)::

    JAX_PLATFORMS=cpu python -m tests.test_regression
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from pathlib import Path

import jax
import numpy as np
import pytest

from mjxsac import presets
from mjxsac.sac import Trainer

RECORD = Path(__file__).parent / "data" / "regression.json"
# The cpu preset on InvertedPendulum with a short warm-up and one chunk of 70 train steps
# of its 16 envs: 1,120 env steps, updates (4 per train step, v1 8) on the last 8.
SHORT = {"warmup_steps": 1_000, "total_steps": 2_000, "steps_per_chunk": 70}
RUNS = {
    "v2": ("sac-v2", {}),
    "v1": ("sac-v1", {}),
    "c51-nstep-delay": (
        "sac-v2",
        {
            "critic": "c51",
            "num_atoms": 51,
            "v_min": -200.0,
            "v_max": 200.0,
            "n_step": 3,
            "policy_delay": 2,
            "actor_q": "mean",
        },
    ),
    "population-of-two": ("sac-v2", {"seeds": "3,4", "vary": ("critic_lr=1e-4,3e-4",)}),
}


# What a run learns (networks, temperature, observation normalizer) and the update count:
# the numbers a reshaping must keep, whatever the layout of the rest of the state.
PARAMETERS = ("actor", "critic", "target_critic", "value", "target_value", "log_alpha",
              "normalizer", "updates", "env_steps")  # fmt: skip


def machine() -> dict[str, str]:
    """What decides the last bits: the CPU (model, instruction-set flags, and the cores
    this process may use: XLA compiles for the features it finds and splits its matrix
    products by threads, so the same run under ``taskset -c 0`` differs in the last bits)
    and the compiler's versions."""
    import jaxlib

    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = info.get("flags", "")
    return {
        "cpu": f"{info.get('model name', platform.processor())} (family {info.get('cpu family')}, "
        f"model {info.get('model')}), {len(os.sched_getaffinity(0))} cores usable",
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
    }


def final_parameters(name: str) -> dict:
    algo, extra = RUNS[name]
    config = dataclasses.replace(
        presets.config_for("InvertedPendulum", algo, "cpu"), **SHORT, **extra
    )
    trainer = Trainer(config)
    state, _ = trainer.train_chunk(trainer.init())
    params = {name: getattr(state, name) for name in PARAMETERS}
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    digest = hashlib.sha256()
    for leaf in leaves:
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return {"sha256": digest.hexdigest(), "sums": [float(x.sum(dtype=np.float64)) for x in leaves]}


@pytest.mark.parametrize("name", RUNS)
def test_a_fixed_run_reproduces_its_recorded_parameters(name):
    record = json.loads(RECORD.read_text())
    want = record["runs"][name]
    got = final_parameters(name)
    if record["machine"] == machine():
        assert got["sha256"] == want["sha256"], "not bit for bit on the recording machine"
    else:
        np.testing.assert_allclose(got["sums"], want["sums"], rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    runs = {name: final_parameters(name) for name in RUNS}
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1) + "\n")
    print(f"wrote {RECORD}: {', '.join(runs)}")
