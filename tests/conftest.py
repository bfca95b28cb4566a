"""Shared test setup: headless rendering through EGL, quiet libraries, a compile counter."""

from __future__ import annotations

import os

# MuJoCo picks its GL backend when first imported; tests render headless.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_SILENT", "true")

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
    """A callable returning how many XLA compilations this process has run so far."""
    return lambda: len(COMPILES)
