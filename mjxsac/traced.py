"""Traced programs kept on disk, so that a second process skips tracing as well as compiling.

JAX's persistent cache (``compile_cache``) keys an executable by the program's StableHLO,
so a process must trace and lower its programs before it can load them: for Ant's train
chunk on the CPU that is 3-4 of the 9 seconds a second process needs to its first update.
``Program`` keeps the traced and lowered program itself, as a ``jax.export`` artifact, in
``<cache>/traced/``; a process that finds it deserializes it (milliseconds), lowers a call
to it (a fraction of a second) and loads the executable from JAX's cache.

Unlike an executable, a traced program can go stale without its inputs' shapes changing:
it holds whatever the Python code computed while tracing. So its key is everything that
code could have depended on, and any change is a miss that traces anew:

* the program's name, its trainer's ``Config.compiled_identity()`` (what jit's own cache
  keys on: the config without data hyperparameters and host-only fields), the arrays of
  its env's MJX model, and the arguments' tree structure, shapes, dtypes and weak types;
* the code: the files of ``mjxsac`` and ``envs`` (the task XMLs too) as they were when
  this module was imported, and the live code of every module that is not an installed
  library (ours, the user's), walked function by function and class by class, with our
  modules' public constants; of a library's module, any function put there from outside
  a library. So a function, method or constant replaced at run time changes the key;
* every installed distribution's version, the Python version, every ``jax.config`` value
  (as the calling thread sees it), the backend and its device kind.

An installed library edited in place without a new version is the one change this cannot
see (JAX's cache still would, for an executable): ``--compile-cache off`` traces
everything. Whatever goes wrong with a kept program (a key that cannot be made, a file
that does not load, lower or compile, a directory that cannot be written, a program that
``jax.export`` refuses) falls back to jit's own stages: a damaged file is removed, a
refusal is remembered (``*.unexportable``) and noticed in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pickle
import site
import sys
import sysconfig
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

OWN = ("mjxsac", "envs", "launch")  # our packages: their code is always walked
DATA = ("mjxsac", "envs")  # whose module-level data the programs read
SUFFIX = ".exported"

_dir: Path | None = None
# What this process did, by program name (read by compile_cache.Tally).
_loaded: list[str] = []
_traced: list[str] = []


def configure(path: Path | None) -> None:
    """Keep traced programs in ``path`` (``None``: trace every program, keep nothing)."""
    global _dir
    _dir = path


def loaded() -> list[str]:
    """The programs this process loaded from the directory, in order."""
    return list(_loaded)


def traced() -> list[str]:
    """The programs this process traced and kept, in order."""
    return list(_traced)


class Program:
    """A trainer method compiled for its arguments, like ``jax.jit(method,
    static_argnums=0)``, with its traced form kept on disk when ``configure`` gave a
    directory. ``donate``: donate every argument's buffers (the train chunk's state)."""

    def __init__(self, method: Callable, donate: bool = False) -> None:
        self.name = method.__name__.lstrip("_")
        self.method = method
        self.donate = donate
        self.jitted = jax.jit(method, static_argnums=0, donate_argnums=1 if donate else ())
        self._compiled: dict[Any, Any] = {}

    def __call__(self, trainer, *args):
        if _dir is None:
            return self.jitted(trainer, *args)
        # As jit's own cache: JAX's settings (in this thread) and the device count too.
        memo = (trainer, _signature(args), _settings(), _default_device())
        if memo not in self._compiled:
            self._compiled[memo] = self.trace(trainer, *args).lower().compile()
        return self._compiled[memo](*args)

    def trace(self, trainer, *args) -> jax.stages.Traced | Exported:
        """The first of jit's ahead-of-time stages: a ``jax.stages.Traced``, or with a
        directory an ``Exported`` (loaded, or traced, lowered and kept); either goes on
        with ``.lower().compile()``. Whatever goes wrong with the kept form (a key that
        cannot be made, a program that cannot be exported, a file that does not load,
        lower or compile) falls back to jit's own stages, as without a directory."""
        plain = functools.partial(self.jitted.trace, trainer, *args)
        if _dir is None:
            return plain()
        leaves, in_tree = jax.tree.flatten(args)
        shardings = [getattr(x, "sharding", None) for x in leaves]
        try:
            path = _dir / f"{self.name}-{self._key(trainer, args)}{SUFFIX}"
        except Exception:  # a value the digest cannot read
            return plain()
        refused = path.with_suffix(".unexportable")
        if refused.exists():
            return plain()
        found = _load(path)
        if found is not None:
            _loaded.append(self.name)
            return Exported(self.name, *found, in_tree, shardings, self.donate, plain, path)

        def flat(*leaves):
            out = self.method(trainer, *jax.tree.unflatten(in_tree, leaves))
            flat_out, trees["out"] = jax.tree.flatten(out)
            return flat_out

        trees: dict[str, Any] = {}
        donate = tuple(range(len(leaves))) if self.donate else ()
        flat.__name__ = self.name
        try:
            exported = jax.export.export(jax.jit(flat, donate_argnums=donate))(
                *map(_abstract, leaves)
            )
        except Exception as e:  # e.g. a custom call jax.export does not serialize
            traced_plain = plain()  # a fault of the code itself is raised here, as by jit
            first_line = str(e).strip().split("\n")[0][:200]
            print(f"mjxsac: {self.name} cannot be kept traced ({type(e).__name__}: "
                  f"{first_line}); it is traced in every process", file=sys.stderr)  # fmt: skip
            _write(refused, b"")
            return traced_plain
        _traced.append(self.name)
        _save(path, exported, trees["out"])
        return Exported(self.name, exported, trees["out"], in_tree, shardings, self.donate, plain)

    def _key(self, trainer, args) -> str:
        h = hashlib.sha256()
        for part in (self.name, repr(trainer.config.compiled_identity()), _signature(args),
                     _environment(), _settings()):  # fmt: skip
            h.update(repr(part).encode())
        model = getattr(getattr(trainer, "env", None), "mjx_model", None)
        digest = _Digest(h)
        digest(_FILES)
        digest([np.asarray(x) for x in jax.tree.leaves(model)])  # what the program closes over
        code_digest(digest)
        return h.hexdigest()[:32]


class Exported:
    """A traced program (``jax.export.Exported``) with its argument and result trees;
    ``.lower()`` lowers a call to it, as ``jax.stages.Traced.lower`` does, on the
    arguments' devices. ``fallback`` makes jit's own traced stage instead; ``path``, the
    file it was loaded from, is removed if it fails to lower or compile."""

    def __init__(self, name, exported, out_tree, in_tree, shardings, donate: bool,
                 fallback: Callable, path: Path | None = None) -> None:  # fmt: skip
        self.name, self.exported, self.donate = name, exported, donate
        self.out_tree, self.in_tree, self.shardings = out_tree, in_tree, shardings
        self.fallback, self.path = fallback, path

    def lower(self):
        exported = self.exported

        def call(*leaves):
            return exported.call(*leaves)

        call.__name__ = self.name
        default = jax.sharding.SingleDeviceSharding(_default_device())
        avals = [
            jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type,
                                 sharding=s if isinstance(s, jax.sharding.Sharding) else default)
            for a, s in zip(exported.in_avals, self.shardings, strict=True)
        ]  # fmt: skip
        donate = tuple(range(len(avals))) if self.donate else ()
        try:
            return Lowered(jax.jit(call, donate_argnums=donate).lower(*avals), self)
        except Exception as e:
            return self.failed(e).lower()

    def failed(self, e: Exception) -> jax.stages.Traced:
        """jit's traced stage, after the kept program failed with ``e``."""
        if self.path is None:  # just traced: a fault of our own, not of a file
            raise e
        self.path.unlink(missing_ok=True)
        print(f"mjxsac: the kept {self.name} program failed ({type(e).__name__}); "
              "traced anew", file=sys.stderr)  # fmt: skip
        return self.fallback()


@dataclasses.dataclass
class Lowered:
    lowered: jax.stages.Lowered
    source: Exported

    def compile(self):
        try:
            compiled = self.lowered.compile()
        except Exception as e:
            return self.source.failed(e).lower().compile()
        return Compiled(compiled, self.source.in_tree, self.source.out_tree)

    def as_text(self) -> str:
        return self.lowered.as_text()


@dataclasses.dataclass
class Compiled:
    """A compiled call to a traced program; called with the method's arguments (trees)."""

    compiled: jax.stages.Compiled
    in_tree: Any
    out_tree: Any

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        if tree != self.in_tree:
            raise TypeError(f"arguments of structure {tree}, compiled for {self.in_tree}")
        return jax.tree.unflatten(self.out_tree, self.compiled(*leaves))


def _abstract(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False))


def _signature(args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return str(tree), tuple(
        (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves
    )


def _settings() -> str:
    """Every JAX setting as this thread sees it (``with`` blocks included)."""
    return repr(sorted(jax.config.values.items(), key=str))


def _default_device() -> jax.Device:
    from mjxsac.sac import default_device

    return default_device()


def _load(path: Path):
    """``(exported, out_tree)`` kept at ``path``, or ``None`` (absent or unreadable: the
    program is traced anew and the file replaced)."""
    try:
        blob, out_tree = pickle.loads(path.read_bytes())
        return jax.export.deserialize(bytearray(blob)), out_tree
    except Exception:
        return None


def _save(path: Path, exported, out_tree) -> None:
    """Keep a traced program; failing to (a directory that cannot be written, a full
    disk) only costs the next process its tracing."""
    try:
        blob = pickle.dumps((bytes(exported.serialize()), out_tree))
    except Exception:
        return
    _write(path, blob)


def _write(path: Path, blob: bytes) -> None:
    """Write ``path`` atomically (a reader sees the whole file or none); an error leaves
    nothing behind and is not raised."""
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(partial, path)
    except Exception:
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)


# ---- what a traced program may depend on -----------------------------------------------


@functools.cache
def _environment() -> tuple:
    """Every installed distribution's version, Python's, the backend and device kind."""
    versions = sorted(
        (d.metadata["Name"] or "", d.version or "") for d in importlib.metadata.distributions()
    )
    return tuple(versions), sys.version, jax.default_backend(), jax.devices()[0].device_kind


def _file_digest() -> str:
    """The files of ``DATA``'s packages (their Python and the task XMLs), read once, when
    this module is imported (with them): a file edited during a run must not lend its
    digest to programs traced from the code loaded before."""
    h = hashlib.sha256()
    for package in DATA:
        root = Path(__file__).parent.parent / package
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".xml") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root.parent)).encode() + path.read_bytes())
    return h.hexdigest()


_FILES = _file_digest()


def code_digest(digest: _Digest | None = None) -> str:
    """A digest of the code this process runs (see the module doc), walked live so that
    what was replaced at run time counts: every module that is not an installed
    library's (ours, the user's), its functions and classes, and for ``DATA``'s modules
    their public data too; of a library's module, the functions put there from outside
    a library (a patch)."""
    digest = _Digest(hashlib.sha256()) if digest is None else digest
    h = digest.h
    for name, module in sorted(list(sys.modules.items()), key=lambda item: item[0]):
        package = name.split(".")[0]
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        if package in OWN or name == "__main__" or not digest.library(module):
            h.update(name.encode())
            for key, value in sorted(namespace.items(), key=lambda item: item[0]):
                if key.startswith("__"):
                    continue
                if _is_code(value) or (package in DATA and not key.startswith("_")):
                    h.update(key.encode())
                    digest(value)
        else:
            for key, value in list(namespace.items()):
                if isinstance(value, types.FunctionType) and not digest.library(
                    value.__code__.co_filename
                ):
                    h.update(f"{name}.{key}".encode())
                    digest(value)
    return h.hexdigest()


def _is_code(value: Any) -> bool:
    return isinstance(
        value,
        (type, types.FunctionType, types.MethodType, types.ModuleType, functools.partial,
         staticmethod, classmethod, property, jax.custom_jvp, jax.custom_vjp),
    ) or (callable(value) and hasattr(value, "__wrapped__"))  # fmt: skip


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= set(site.getsitepackages()) | {site.getusersitepackages()}
    return tuple(sorted(str(Path(r).resolve()) + os.sep for r in roots))


@functools.cache
def _library_file(file: str) -> bool:
    """Whether ``file`` belongs to an installed library, the standard library or
    Python's frozen modules."""
    return file.startswith("<frozen") or str(Path(file).resolve()).startswith(_library_roots())


class _Digest:
    """Feeds a hash what a value contributes to a traced program: a function's code,
    constants, defaults and closure; a class's attributes; a container's items; an
    array's bytes; a dataclass's fields; what a wrapper (jit, custom derivatives,
    ``functools.wraps``) wraps. A library's functions, classes and modules contribute
    only their names: the installed versions are in the key."""

    def __init__(self, h) -> None:
        # Values by id, held so that no id is reused by a later (temporary) value.
        self.h, self.seen = h, {}

    def library(self, thing) -> bool:
        file = thing if isinstance(thing, str) else getattr(thing, "__file__", None)
        return file is None or _library_file(file)

    def __call__(self, value: Any, depth: int = 0) -> None:
        h = self.h
        if isinstance(value, (str, bytes, int, float, complex, bool, type(None))):
            h.update(repr(value).encode())
            return
        if id(value) in self.seen or depth > 8:
            h.update(b"@")
            return
        self.seen[id(value)] = value
        down = functools.partial(self, depth=depth + 1)
        if isinstance(value, types.ModuleType):
            h.update(value.__name__.encode())
        elif isinstance(value, types.FunctionType):
            h.update(f"{value.__module__}.{value.__qualname__}".encode())
            if not self.library(value.__code__.co_filename):
                self.code(value.__code__)
                down((value.__defaults__, value.__kwdefaults__))
                cells = []
                for cell in value.__closure__ or ():
                    try:
                        cells.append(cell.cell_contents)
                    except ValueError:  # an empty cell
                        cells.append("<empty>")
                down(tuple(cells))
        elif isinstance(value, type):
            h.update(f"{value.__module__}.{value.__qualname__}".encode())
            module = sys.modules.get(value.__module__)
            if value.__module__.split(".")[0] in OWN or not self.library(module):
                for key, item in sorted(vars(value).items(), key=lambda kv: kv[0]):
                    if key not in ("__dict__", "__weakref__", "__doc__", "__module__"):
                        h.update(key.encode())
                        down(item)
        elif isinstance(value, types.MethodType):
            down((value.__func__, type(value.__self__)))
        elif isinstance(value, (staticmethod, classmethod)):
            down(value.__func__)
        elif isinstance(value, property):
            down((value.fget, value.fset))
        elif isinstance(value, functools.partial):
            down((value.func, value.args, value.keywords))
        elif isinstance(value, (jax.custom_jvp, jax.custom_vjp)):
            parts = ("fun", "jvp", "fwd", "bwd", "nondiff_argnums")
            down(tuple(getattr(value, name, None) for name in parts))
        elif isinstance(value, (tuple, list, set, frozenset)):
            items = sorted(value, key=_order) if isinstance(value, (set, frozenset)) else value
            h.update(f"{type(value).__name__}{len(items)}".encode())
            for item in items:
                down(item)
        elif isinstance(value, dict):
            h.update(f"dict{len(value)}".encode())
            for key, item in sorted(value.items(), key=lambda kv: _order(kv[0])):
                down(key)
                down(item)
        elif isinstance(value, (np.ndarray, jax.Array)):
            array = np.asarray(value)
            h.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
        elif callable(value) and hasattr(value, "__wrapped__"):  # jit, functools.wraps
            h.update(type(value).__qualname__.encode())
            down(value.__wrapped__)
        else:  # an instance: its type, and a dataclass's fields
            down(type(value))
            if dataclasses.is_dataclass(value):
                down(tuple(getattr(value, f.name) for f in dataclasses.fields(value)))

    def code(self, code: types.CodeType) -> None:
        """Bytecode, names and constants (a set literal's constant through ``__call__``,
        which sorts it: its own order changes with the hash seed)."""
        self.h.update(
            code.co_code + repr((code.co_names, code.co_varnames, code.co_freevars)).encode()
        )
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const)
            else:
                self(const)


def _order(value: Any) -> str:
    """A sort key that is the same in every process (a set's order is not)."""
    if _is_code(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
    return repr(value)
