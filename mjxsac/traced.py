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
  keys on: the config without data hyperparameters and host-only fields) and the
  arguments' tree structure, shapes and dtypes;
* the code: every file of ``mjxsac``, ``envs`` and ``launch`` (the task XMLs too), and the
  live code of every module that is not an installed library, walked function by function
  (so a function replaced at run time, in our modules or the user's, changes the key);
* the installed libraries' versions, the Python version, every ``jax.config`` value, the
  backend and its device kind.

An installed library edited in place without a new version is the one change this cannot
see (JAX's cache still would, for an executable): ``--compile-cache off`` traces
everything. A program that cannot be exported (``jax.export`` refuses a few custom calls)
is traced as usual, with a one-line notice.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pickle
import site
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

OWN = ("mjxsac", "envs", "launch")
LIBRARIES = ("jax", "jaxlib", "mujoco", "mujoco-mjx", "flax", "optax", "numpy", "mjxsac")
SUFFIX = ".exported"

_dir: Path | None = None
# What this process did, by program name (read by compile_cache.Tally).
loaded: list[str] = []
traced: list[str] = []


def configure(path: Path | None) -> None:
    """Keep traced programs in ``path`` (``None``: trace every program, keep nothing)."""
    global _dir
    _dir = path


class Program:
    """A trainer method compiled for its arguments, like ``jax.jit(method,
    static_argnums=0)``, with its traced form kept on disk when ``configure`` gave a
    directory. ``donate``: donate every argument's buffers (the train chunk's state)."""

    def __init__(self, method: Callable, donate: bool = False) -> None:
        self.name = method.__name__.lstrip("_")
        self.method = method
        self.donate = donate
        self.jitted = jax.jit(method, static_argnums=0, donate_argnums=1 if donate else ())
        self._compiled: dict[Any, Compiled] = {}

    def __call__(self, trainer, *args):
        if _dir is None:
            return self.jitted(trainer, *args)
        memo = (trainer, _signature(args))
        if memo not in self._compiled:
            self._compiled[memo] = self.trace(trainer, *args).lower().compile()
        return self._compiled[memo](*args)

    def trace(self, trainer, *args) -> jax.stages.Traced | Exported:
        """The first of jit's ahead-of-time stages: a ``jax.stages.Traced``, or with a
        directory an ``Exported`` (loaded, or traced, lowered and kept); either goes on
        with ``.lower().compile()``."""
        if _dir is None:
            return self.jitted.trace(trainer, *args)
        leaves, in_tree = jax.tree.flatten(args)
        path = _dir / f"{self.name}-{self._key(trainer, args)}{SUFFIX}"
        found = _load(path)
        if found is not None:
            loaded.append(self.name)
            return Exported(self.name, *found, in_tree, self.donate)

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
            print(f"mjxsac: {self.name} is traced in every process ({e})".split("\n")[0],
                  file=sys.stderr)  # fmt: skip
            return self.jitted.trace(trainer, *args)
        traced.append(self.name)
        _save(path, exported, trees["out"])
        return Exported(self.name, exported, trees["out"], in_tree, self.donate)

    def _key(self, trainer, args) -> str:
        h = hashlib.sha256()
        for part in (self.name, repr(trainer.config.compiled_identity()), _signature(args),
                     _environment(), code_digest()):  # fmt: skip
            h.update(repr(part).encode())
        return h.hexdigest()[:32]


class Exported:
    """A traced program (``jax.export.Exported``) with its argument and result trees;
    ``.lower()`` lowers a call to it, as ``jax.stages.Traced.lower`` does."""

    def __init__(self, name, exported, out_tree, in_tree, donate: bool) -> None:
        self.name, self.exported, self.donate = name, exported, donate
        self.out_tree, self.in_tree = out_tree, in_tree

    def lower(self) -> Lowered:
        exported = self.exported

        def call(*leaves):
            return exported.call(*leaves)

        call.__name__ = self.name
        device = jax.sharding.SingleDeviceSharding(_default_device())
        avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device, weak_type=a.weak_type)
                 for a in exported.in_avals]  # fmt: skip
        donate = tuple(range(len(avals))) if self.donate else ()
        return Lowered(jax.jit(call, donate_argnums=donate).lower(*avals), self)


@dataclasses.dataclass
class Lowered:
    lowered: jax.stages.Lowered
    source: Exported

    def compile(self) -> Compiled:
        return Compiled(self.lowered.compile(), self.source.in_tree, self.source.out_tree)

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
    """Keep a traced program; failing to (a directory that cannot be written) only costs
    the next process its tracing."""
    try:
        blob = pickle.dumps((bytes(exported.serialize()), out_tree))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_bytes(blob)
        partial.replace(path)  # atomic: a reader sees the whole file or none
    except Exception:  # a full disk, an unpicklable tree: the next process traces
        pass


# ---- what a traced program may depend on -----------------------------------------------


@functools.cache
def _environment() -> tuple:
    versions = []
    for name in LIBRARIES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((name, None))
    device = jax.devices()[0]
    return tuple(versions), sys.version, jax.default_backend(), device.device_kind


def code_digest() -> str:
    """A digest of the code this process runs that is not an installed library's (see
    the module doc), and of JAX's configuration. Of a module's namespace it reads the
    code (functions, classes, modules), not the data: that is in the files, or run-time
    state (clocks, counters) that no program reads."""
    h = hashlib.sha256(repr(sorted(jax.config.values.items(), key=str)).encode())
    for package in OWN:
        root = Path(__file__).parent.parent / package
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".xml") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root.parent)).encode() + path.read_bytes())
    digest = _Digest(h)
    for name, module in sorted(list(sys.modules.items()), key=lambda item: item[0]):
        if name.split(".")[0] in OWN or name == "__main__" or not digest.library(module):
            h.update(name.encode())
            for key, value in sorted(vars(module).items()):
                if key.startswith("__") or not _is_code(value):
                    continue
                h.update(key.encode())
                digest(value)
    return h.hexdigest()


def _is_code(value: Any) -> bool:
    return isinstance(value, (type, types.FunctionType, functools.partial, staticmethod,
                              classmethod, property, types.ModuleType))  # fmt: skip


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= set(site.getsitepackages()) | {site.getusersitepackages()}
    return tuple(sorted(str(Path(r).resolve()) + os.sep for r in roots))


class _Digest:
    """Feeds a hash what a value contributes to a traced program: a function's code,
    constants, defaults and closure; a class's attributes; a container's items; an
    array's bytes; a dataclass's fields. A library's functions, classes and modules contribute
    only their names: their versions are in the key."""

    def __init__(self, h) -> None:
        # Values by id, held so that no id is reused by a later (temporary) value.
        self.h, self.seen, self.roots = h, {}, _library_roots()

    def library(self, thing) -> bool:
        file = thing if isinstance(thing, str) else getattr(thing, "__file__", None)
        return file is None or str(Path(file).resolve()).startswith(self.roots)

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
                _code(value.__code__, h)
                down((value.__defaults__, value.__kwdefaults__))
                down(tuple(c.cell_contents for c in value.__closure__ or ()))
        elif isinstance(value, type):
            h.update(f"{value.__module__}.{value.__qualname__}".encode())
            module = sys.modules.get(value.__module__)
            if value.__module__.split(".")[0] in OWN or not self.library(module):
                for key, item in sorted(vars(value).items()):
                    if key not in ("__dict__", "__weakref__", "__doc__", "__module__"):
                        h.update(key.encode())
                        down(item)
        elif isinstance(value, (staticmethod, classmethod)):
            down(value.__func__)
        elif isinstance(value, property):
            down((value.fget, value.fset))
        elif isinstance(value, functools.partial):
            down((value.func, value.args, value.keywords))
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
        else:  # an instance: its type, and a dataclass's fields
            down(type(value))
            if dataclasses.is_dataclass(value):
                down(tuple(getattr(value, f.name) for f in dataclasses.fields(value)))


def _order(value: Any) -> str:
    """A sort key that is the same in every process (a set's order is not)."""
    if _is_code(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
    return repr(value)


def _code(code: types.CodeType, h) -> None:
    h.update(code.co_code + repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code(const, h)
        else:
            h.update(repr(const).encode())
