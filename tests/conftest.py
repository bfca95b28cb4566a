"""Shared test setup: headless rendering through EGL, quiet libraries, a compile counter,
a checkpoint round trip."""

from __future__ import annotations

import os

# MuJoCo picks its GL backend when first imported; tests render headless.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_SILENT", "true")
# No persistent compilation cache unless a test asks for one (tests/test_compile_cache.py):
# the other tests, and the processes they start, compile what they measure and write
# nothing into the user's cache.
os.environ["MJXSAC_COMPILE_CACHE"] = "off"

import jax
import pytest

COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: (
        COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
)


@pytest.fixture
def compile_count():
    """A callable returning how many XLA compilations this process has run so far (the
    event also fires for a program loaded from a persistent cache, which tests leave off
    unless they ask for one)."""
    return lambda: len(COMPILES)


@pytest.fixture
def checkpoint_round_trip(tmp_path):
    """A callable: save a TrainState with its buffer under ``tmp_path``, restore it for
    a trainer, assert the restored state equals ``expected`` (default: the saved state)
    leaf for leaf, and return it."""
    import numpy as np

    from mjxsac.checkpoint import Checkpoints

    def round_trip(state, trainer, expected=None):
        writer = Checkpoints(tmp_path / "checkpoints", async_save=False)
        writer.save(state, trainer.run_config, save_buffer=True)
        writer.close()
        restored = Checkpoints(tmp_path / "checkpoints", read_only=True).restore(trainer)
        want = state if expected is None else expected
        same = jax.tree.map(
            lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), want, restored
        )
        assert all(jax.tree.leaves(same))
        return restored

    return round_trip
