"""What the command-line tools share: quiet libraries, and failures as one line.

A user's mistake or the machine's refusal (a bad option, an unwritable directory, a full
disk, a missing GL library) ends a command with one line ``<prog>: <cause and fix>`` and a
non-zero exit code, not a traceback. ``--debug`` (or ``MJXSAC_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DEBUG_ENV = "MJXSAC_DEBUG"


class UserError(Exception):
    """A failure whose message already says what happened and what to do."""


def quiet_libraries(debug: bool = False) -> None:
    """Orbax and friends log routine notices through absl at WARNING, and the failures of
    their writer threads with tracebacks at ERROR; the tools report every failure
    themselves in one line, so keep only fatal messages unless debugging."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR if debug else absl_logging.FATAL)
    if not debug:
        sys.unraisablehook = drop_closed_loop_noise
        asyncio_logger = logging.getLogger("asyncio")
        if not any(isinstance(f, _DropUnretrieved) for f in asyncio_logger.filters):
            asyncio_logger.addFilter(_DropUnretrieved())


class _DropUnretrieved(logging.Filter):
    """When one write of an asynchronous Orbax save fails, its sibling tasks fail too and
    are never awaited; asyncio logs each as 'Task exception was never retrieved' with a
    traceback when it is collected, after the command's one-line error. The first failure
    is the one reported; drop the echoes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(
            ("Task exception was never retrieved", "Future exception was never retrieved")
        )


def drop_closed_loop_noise(unraisable) -> None:
    """After a failed read or write, TensorStore still completes the operations it had
    started and calls back into the asyncio loop Orbax has already closed, and Orbax's
    sibling reads, abandoned, raise the same failure again as their coroutines are
    collected; Python would print each of those echoes as a traceback after the
    command's one-line error (how many depends on timing: on a busy machine, some).
    Drop exactly those: 'Event loop is closed', and exceptions of Orbax's coroutines
    raised while they are finalized."""
    e, obj = unraisable.exc_value, unraisable.object
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        return
    code = getattr(obj, "cr_code", None)
    if inspect.iscoroutine(obj) and code is not None and ORBAX_PATH in code.co_filename:
        return
    sys.__unraisablehook__(unraisable)


ORBAX_PATH = f"{os.sep}orbax{os.sep}"


def quoted(path) -> str:
    """A path as a shell reads it back: suggested commands must work when pasted."""
    return shlex.quote(str(path))


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe_os_error(e: OSError, doing: str) -> str:
    """One sentence for a failed file operation, with the fix for the common causes."""
    where = f" {e.filename}" if e.filename else ""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        fix = "free some space"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable location"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "choose a path whose parents are directories"
    else:
        fix = "check the path"
    return f"{doing} failed ({reason}{':' if where else ''}{where}): {fix}"


def write(fn: Callable[..., T], *args, what: str) -> T:
    """Run a write to disk; a failure (a full disk, a vanished directory) becomes a
    ``UserError`` naming what was written, the cause and the fix."""
    try:
        return fn(*args)
    except Exception as e:
        cause = os_error_in(e)
        if cause is None:
            raise
        raise UserError(describe_os_error(cause, what)) from e


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write through a temporary file beside ``path`` and rename, so a crash never leaves
    half a file."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)


def probe_writable(path: Path) -> None:
    """Raise the ``OSError`` that writing ``path`` would meet, before the work that
    produces it (creating a missing parent directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = path.with_name(f".{path.name}.probe")
    probe.write_bytes(b"")
    probe.unlink()


def os_error_in(e: BaseException) -> OSError | None:
    """The operating system's error behind ``e``: in its chain of causes, or in the text
    of a TensorStore error (which Orbax raises as a ValueError with the errno inside)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            number = int(code.group(1))
            return OSError(number, os.strerror(number))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def one_line_errors(prog: str, debug: bool) -> Iterator[None]:
    """Turn the expected failures into ``sys.exit("<prog>: ...")``; others propagate."""
    try:
        yield
    except (UserError, ValueError, MemoryError, OSError) as e:
        if debug:
            raise
        if isinstance(e, OSError) and not isinstance(e, UserError):
            message = describe_os_error(e, "a file operation")
        elif isinstance(e, MemoryError) and not str(e):
            message = "out of memory (MemoryError): the run is too large for this machine"
        else:
            message = str(e) or type(e).__name__
        sys.exit(f"{prog}: {' '.join(message.split())}")
