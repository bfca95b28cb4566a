"""Programs compiled ahead of time in a worker thread.

The first evaluation comes after ``eval_every`` chunks, but its program used to be
compiled only then, while nothing else ran. ``Ahead`` traces, lowers and compiles it in a
daemon thread as soon as its argument shapes are known, so the compilation overlaps the
first chunk: on an accelerator the chunk runs on the device while the host compiles; on a
CPU with several cores both share them. On a single CPU core the compilation could only
take turns with the chunk, delaying the first update for nothing, so ``helps()`` says no
there and the program compiles when first needed, as before. Calling an ``Ahead`` waits
for the program, then runs it; a failure in the thread is raised there, in the caller's
thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax


def helps() -> bool:
    """Whether compiling in the background can overlap anything: an accelerator runs the
    chunk while the host compiles, and several CPU cores can share the two."""
    return jax.default_backend() != "cpu" or len(os.sched_getaffinity(0)) > 1


def compile_ahead(trace: Callable[..., jax.stages.Traced], jitted: Callable, *args: Any):
    """``Ahead(trace, *args)`` where compiling in the background helps, else ``jitted``
    itself (compiled when first called)."""
    return Ahead(trace, *args) if helps() else jitted


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings only: the thread must not hold arrays that a donating
    program (the train chunk) may delete."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


class Ahead:
    """``trace(*args)``'s program (a ``jax.stages.Traced``), lowered and compiled in a
    daemon thread. ``phases`` (optional) receives the seconds of each stage."""

    def __init__(self, trace: Callable[..., jax.stages.Traced], *args: Any,
                 phases: dict[str, float] | None = None) -> None:  # fmt: skip
        self._args = abstract(args)
        self._trace = trace
        self._phases = {} if phases is None else phases
        self._compiled: jax.stages.Compiled | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mjxsac-compile", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            mark = time.perf_counter()
            staged: Any = self._trace(*self._args)
            for stage in ("trace", "lower", "compile"):
                if stage != "trace":
                    staged = getattr(staged, stage)()
                now = time.perf_counter()
                self._phases[stage] = now - mark
                mark = now
            self._compiled = staged
        except BaseException as e:  # handed to the caller
            self._error = e

    def result(self) -> jax.stages.Compiled:
        """The compiled program, once the thread has finished."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._compiled is not None
        return self._compiled

    def __call__(self, *args: Any) -> Any:
        return self.result()(*args)
