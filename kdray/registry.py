"""Name -> factory registries for the pluggable kinds (knowledge types, models, data sets).

Why: configs name things by string; a registry turns a name into code and, when the name is wrong,
says which names exist. Unlike torchdistill's registries a duplicate name is an error, never a
silent overwrite, so two plugins cannot shadow each other unnoticed.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from kdray.errors import KdrayError

T = TypeVar("T")


class RegistryError(KdrayError, KeyError):
    """An unknown or duplicate name in a registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of entries, filled by the ``register`` decorator at import time.

    Besides named entries a registry may have *sources*: a prefix (``timm``, ``hf``) whose names are
    resolved on demand (``timm/resnet18``), for model zoos too large or too open to list one by one.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._sources: dict[str, tuple[Callable[[str], T], str]] = {}
        self._resolved: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def add_source(self, prefix: str, resolve: Callable[[str], T], description: str) -> None:
        """Resolve ``prefix/<rest>`` names with ``resolve(rest)``, which returns an entry or raises
        ``ValueError`` saying why the name is not usable (unknown, library missing, offline...)."""
        if prefix in self._sources:
            raise RegistryError(f"duplicate {self.kind} source {prefix!r}")
        self._sources[prefix] = (resolve, description)

    def sources(self) -> list[tuple[str, str]]:
        """``(prefix, description)`` of every source, for ``kdray list``."""
        return sorted((p, d) for p, (_, d) in self._sources.items())

    def origin(self, name: str) -> str:
        """Where an entry comes from: ``kdray``, ``plugin <module>``, or the source's prefix."""
        if "/" in name and name.split("/", 1)[0] in self._sources:
            return name.split("/", 1)[0]
        return self._origins.get(name, "kdray")

    def _resolve(self, name: str) -> T:
        if name not in self._resolved:
            prefix, rest = name.split("/", 1)
            if not rest:
                raise ValueError(f"{self.kind} name {name!r} needs a name after {prefix + '/'!r}")
            self._resolved[name] = self._sources[prefix][0](rest)
        return self._resolved[name]

    def _has_source(self, name: Any) -> bool:
        return isinstance(name, str) and "/" in name and name.split("/", 1)[0] in self._sources

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """Register ``entry`` under ``name``; usable as ``@registry.register("name")``."""
        if entry is not None:
            self._add(name, entry)
            return entry

        def decorator(obj: T) -> T:
            self._add(name, obj)
            return obj

        return decorator

    def _add(self, name: str, entry: T) -> None:
        if not name or not isinstance(name, str):
            raise RegistryError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries:
            raise RegistryError(
                f"duplicate {self.kind} name {name!r}: already registered as {self._entries[name]!r}"
            )
        self._entries[name] = entry
        # the defining code: a model's factory, a data set's loader, a knowledge type's class
        code = getattr(entry, "factory", None) or getattr(entry, "load", None) or entry
        while hasattr(code, "func"):  # functools.partial
            code = code.func
        module = getattr(code, "__module__", "") or ""
        if module and not module.startswith("kdray."):
            self._origins[name] = f"plugin {module}"

    def get(self, name: str) -> T:
        """Return the entry for ``name`` or fail listing the known names (and the closest ones)."""
        if name not in self._entries and self._has_source(name):
            try:
                return self._resolve(name)
            except ValueError as e:
                raise RegistryError(str(e)) from None
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def check(self, name: str) -> str:
        """``name`` if registered, else a ``ValueError`` listing the known names (a pydantic validator)."""
        if name not in self._entries and self._has_source(name):
            self._resolve(name)  # its ValueError says why this name is not usable
            return name
        if name not in self._entries:
            raise ValueError(self.unknown_message(name))
        return name

    def unknown_message(self, name: Any) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        more = "".join(f", {p}/<name>" for p, _ in self.sources())
        return f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(self.names())}{more}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        if name in self._entries:
            return True
        if self._has_source(name):
            try:
                self._resolve(name)  # type: ignore[arg-type]
            except ValueError:
                return False
            return True
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
