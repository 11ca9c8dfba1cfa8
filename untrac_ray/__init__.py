"""untrac-ray: which training datasets made a language model say what it says (UnTrac on Ray).

The package's folders are its layers, lowest first, each importing only from those below it:
inputs (the job, checked), compute (plain PyTorch), methods (tasks and cells), results (tables,
scores, figures, MLflow), engine (Ray), run (a job), search (Ray Tune), submit (Ray Jobs), cli.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Modules a user's script may import by the name the README gave them before the package had
# layers: the name still imports the module, with a DeprecationWarning naming the new one.
MOVED = {"untrac_ray.tracking": "untrac_ray.results.runs"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name (MOVED) as the module that now holds it."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} is now {MOVED[spec.name]}", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        """The module was loaded under its new name already."""


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
