"""Backends looked up by name, one registry per kind.

Each module in `proxytune.backends` registers its model family when imported; the package
is scanned on first use, so adding a model means adding one module there. It is found by
name, as a plugin namespace: the backends depend on these registries, not the other way round.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Registry:
    kind: str
    _factories: dict[str, Callable[[], Any]] = field(default_factory=dict)
    _descriptions: dict[str, str] = field(default_factory=dict)

    def register(self, name: str, factory: Callable[[], Any], description: str = "") -> None:
        if name in self._factories:
            raise ValueError(f"{self.kind} backend {name!r} is registered twice")
        self._factories[name] = factory
        self._descriptions[name] = description

    def names(self) -> list[str]:
        _discover()
        return sorted(self._factories)

    def describe(self) -> dict[str, str]:
        _discover()
        return {name: self._descriptions[name] for name in sorted(self._factories)}

    def check(self, name: str) -> str:
        """Return `name` if it is registered, else raise an error listing what is."""
        if name not in self.names():
            raise ValueError(f"unknown {self.kind} backend {name!r}; available: {', '.join(self.names())}")
        return name

    def create(self, name: str) -> Any:
        return self._factories[self.check(name)]()


SUPERVISORS = Registry("supervisor")
STUDENTS = Registry("student")
ENCODERS = Registry("encoder")
REGISTRIES = {"supervisor": SUPERVISORS, "student": STUDENTS, "encoder": ENCODERS}

BACKENDS_PACKAGE = "proxytune.backends"
_discovered = False


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(BACKENDS_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
