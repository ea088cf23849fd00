"""Third-party packages imported lazily: import one by name, or stop with one line saying what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from trajalign.errors import TrajalignError

# Import name -> the requirement pyproject.toml gives it (and so the line that installs it).
PIP_SPECS = {
    "accelerate": "accelerate>=1.0",
    "datasets": "datasets>=3.0",
    "gguf": "gguf>=0.10",
    "matplotlib": "matplotlib>=3.7",
    "peft": "peft>=0.13",
    "trl": "trl>=0.20",
}


class MissingDependency(TrajalignError):
    """A package trajalign needs for the job at hand is not installed (or cannot be imported)."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` (a key of PIP_SPECS, or a submodule of one); if it is missing, say what `purpose` needs and
    the exact pip line that installs it."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = (error.name or package).split(".")[0]
        if missing not in (package, *PIP_SPECS):  # not our package: a bug to see whole, not an install to suggest
            raise
        spec = PIP_SPECS.get(missing, missing)
        raise MissingDependency(f"{purpose} needs {missing}, which is not installed; install it with: "
                                f"pip install '{spec}'") from None
