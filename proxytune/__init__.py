"""proxytune: Proxy-Tuning of autoregressive image generators (see README.md).

The library is layered (README, "How it is built"): `core`, then `backends` and `analysis`,
`serving`, `stages`, `ops`, and the `cli` on top. Module paths of the flat layout that
artifacts already written still import keep resolving, with a DeprecationWarning:
components compiled into pipeline YAML import `proxytune.steps` and `proxytune.tracking`,
and registered models' code imports `proxytune.registration`, `proxytune.student` and
`proxytune.images`. `LEGACY_MODULES` says where each one's names went.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.2.0"

LEGACY_MODULES = {
    "proxytune.steps": ("proxytune.stages.steps",),
    "proxytune.tracking": ("proxytune.core.tracking",),
    "proxytune.registration": ("proxytune.stages.registration", "proxytune.core.contracts"),
    "proxytune.student": ("proxytune.stages.student", "proxytune.backends._tuned"),
    "proxytune.images": ("proxytune.core.images",),
}


class _LegacyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as a module whose names resolve, on first use, in the
    modules they moved to; it never shadows a real module (it is the last finder asked)."""

    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in LEGACY_MODULES else None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        old, targets = module.__name__, LEGACY_MODULES[module.__name__]

        def moved(name: str):
            if not name.startswith("__"):
                for target in targets:
                    found = importlib.import_module(target)
                    if hasattr(found, name):
                        warnings.warn(
                            f"{old}.{name} is now {target}.{name}", DeprecationWarning, stacklevel=2
                        )
                        return getattr(found, name)
            raise AttributeError(f"module {old!r} (moved to {', '.join(targets)}) has no attribute {name!r}")

        module.__getattr__ = moved


sys.meta_path.append(_LegacyModules())
