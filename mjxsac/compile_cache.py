"""JAX's persistent compilation cache, on by default, and what it did in this process.

A run's programs depend only on the shapes and the code, not on the seed, the run
directory or the step budget: a sweep agent's next run, a resume and a rerun with another
seed compile exactly the programs an earlier process compiled. With the cache, XLA's
executables are written to disk and the next process loads them instead of compiling.

* Where: ``$XDG_CACHE_HOME/mjxsac/jax`` (``~/.cache/mjxsac/jax``) by default;
  ``--compile-cache PATH`` (or ``MJXSAC_COMPILE_CACHE=PATH``) moves it, ``off`` turns it
  off. The option wins over the environment variable.
* What: every program, whatever its compile time or size
  (``jax_persistent_cache_min_compile_time_secs = 0``, ``..._min_entry_size_bytes = -1``).
  JAX's default keeps only programs that took over a second to compile; the small ones
  (the first state's initialization on a small task, the finiteness check, key handling)
  are many, and loading each is faster than compiling it, so a second process compiles
  nothing at all, which is also what makes a cache hit checkable.
* Safety: JAX keys an entry by the program's StableHLO (without source locations), the
  compile options, the device kind and the jax/jaxlib versions, so another shape or a
  change of the code that changes the program is a miss and compiles anew; only an
  identical program is reused. Anyone who can write the directory can make a process run
  code, so keep it private (the default is in the user's home).
* Tracing: JAX's key is the traced program, so a later process still traces and lowers
  its programs (3-5 s on the CPU) before it can load them; what it saves is compiling.
  Nothing is keyed by a digest of Python code (which can serve a stale program).

``configure`` must run before the first compilation of the process (the CLI calls it
first thing). ``Tally`` counts compilations, cache hits and misses (by program name)
through JAX's monitoring events and its cache logging.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import jax

ENV = "MJXSAC_COMPILE_CACHE"
OFF = "off"
DEFAULT = "default"
HELP = (
    "persistent compilation cache: 'default' ($XDG_CACHE_HOME/mjxsac/jax, else "
    "~/.cache/mjxsac/jax), a directory, or 'off'; MJXSAC_COMPILE_CACHE sets the same"
)
# The usual spellings of off and on (any case), so that none of them becomes a directory.
OFF_WORDS = frozenset({"off", "none", "no", "false", "0", "disable", "disabled"})
ON_WORDS = frozenset({"default", "on", "yes", "true", "1"})

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT = re.compile(r"Persistent compilation cache hit for '([^']*)'")
_MISS = re.compile(r"PERSISTENT COMPILATION CACHE MISS for '([^']*)'")


def default_dir() -> Path:
    """The per-user cache directory (XDG base directory convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mjxsac" / "jax"


def normalize(setting: str, source: str = "--compile-cache") -> str:
    """``OFF``, ``DEFAULT`` or a directory: the spellings of off and on are words, not
    directories, and an option name (``--run-dir``) is never taken for a path."""
    text = setting.strip()
    if not text:
        raise ValueError(f"{source} is empty: {HELP}")
    if text.startswith("-"):
        raise ValueError(f"{source} needs a value, not the option {text}: {HELP}")
    word = text.lower()
    if word in OFF_WORDS:
        return OFF
    if word in ON_WORDS:
        return DEFAULT
    return text


def resolve(setting: str | None = None) -> Path | None:
    """The cache directory for ``setting`` (else ``$MJXSAC_COMPILE_CACHE``, else the
    default); ``None`` when off."""
    if setting is not None:
        setting = normalize(setting)
    elif os.environ.get(ENV, "").strip():
        setting = normalize(os.environ[ENV], ENV)
    else:
        setting = DEFAULT
    if setting == OFF:
        return None
    if setting == DEFAULT:
        return default_dir()
    return Path(setting).expanduser()


def configure(setting: str | None = None) -> Path | None:
    """Turn the persistent cache on in ``resolve(setting)`` (created if missing) or off.
    Call it before anything compiles; returns the directory in use."""
    path = resolve(setting)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


# What this process compiled and loaded, recorded from JAX's monitoring events and its
# cache logging by hooks installed once (``Tally`` reads differences).
_programs: list[float] = []  # seconds of each program XLA was asked for
_hits: list[str] = []
_misses: list[str] = []
_installed = False


def _on_duration(event: str, duration: float, **_) -> None:
    if event == COMPILE_EVENT:
        _programs.append(duration)


class _CacheLog(logging.Filter):
    """Records the names in JAX's cache hit/miss messages (logged at DEBUG) and lets
    through only what the logger's former level let through."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for pattern, names in ((_HIT, _hits), (_MISS, _misses)):
            match = pattern.match(message)
            if match:
                names.append(match.group(1))
        return record.levelno >= self.level


def _install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    logger = logging.getLogger("jax._src.compiler")
    logger.addFilter(_CacheLog(logger.getEffectiveLevel()))
    logger.setLevel(logging.DEBUG)


class Tally:
    """What compiling did in this process since ``Tally()``: the programs XLA was asked
    for (JAX's ``backend_compile_duration`` event, emitted for a compilation and for a
    cache load alike), and the names of those loaded from the cache (hits) and of those
    that missed it. ``compiled`` = programs not loaded."""

    def __init__(self) -> None:
        _install()
        self._start = (len(_programs), len(_hits), len(_misses))

    @property
    def programs(self) -> int:
        return len(_programs) - self._start[0]

    @property
    def hits(self) -> list[str]:
        return _hits[self._start[1] :]

    @property
    def misses(self) -> list[str]:
        return _misses[self._start[2] :]

    @property
    def compiled(self) -> int:
        return self.programs - len(self.hits)

    def counts(self) -> dict:
        seconds = sum(_programs[self._start[0] :])
        return {"programs": self.programs, "compiled": self.compiled,
                "cache_hits": len(self.hits), "cache_misses": len(self.misses),
                "compile_or_load_s": round(seconds, 3)}  # fmt: skip

    def summary(self, path: Path | None) -> str:
        """One line for the user: where the cache is, what was loaded and compiled."""
        if path is None:
            return f"compilation cache off; {self.compiled} programs compiled"
        return (
            f"compilation cache {path}: {len(self.hits)} programs loaded, {self.compiled} compiled"
        )


def option(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--compile-cache VALUE`` (or ``=VALUE``) out of a command line."""
    rest, setting, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--compile-cache":
            if i + 1 == len(argv):
                raise ValueError(f"--compile-cache needs a value: {HELP}")
            setting, i = normalize(argv[i + 1]), i + 2
            continue
        if arg.startswith("--compile-cache="):
            setting = normalize(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return setting, rest


def configure_for(prog: str, setting: str | None) -> Path | None:
    """``configure`` for a command: a directory that cannot be created is an error when
    asked for, and a notice (then no cache) when it is the default."""
    try:
        path = configure(setting)
    except OSError as e:
        if resolve(setting) != default_dir():
            raise
        print(f"{prog}: no compilation cache ({e}); continuing without", file=sys.stderr)
        return configure(OFF)
    if path is not None:
        _check_writable(prog, path)
    return path


def _check_writable(prog: str, path: Path) -> None:
    """A cache that can be read but not written (a shared, read-only one) still serves
    the programs it holds; say once that new ones are not kept, instead of JAX's warning
    for every program."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        print(f"{prog}: the compilation cache {path} cannot be written ({e.strerror}): the "
              "programs it holds are loaded, new ones are not kept", file=sys.stderr)  # fmt: skip
        warnings.filterwarnings("ignore", message="Error writing persistent compilation cache")
