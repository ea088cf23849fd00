"""Generation backends, registered by name and imported only when asked for.

To add a backend, write its module (a class with `name`, `needs_weights` and `generate`, see `base.Backend`) and
add one line to `BACKENDS`.
"""

from __future__ import annotations

import importlib

from trajalign.backends.base import Backend, GenerationRequest, GenerationResult, Sampling
from trajalign.errors import InputError

BACKENDS = {  # name -> (module, class)
    "hf": ("trajalign.backends.hf", "HFBackend"),
    "openai": ("trajalign.backends.openai_compat", "OpenAICompatBackend"),
}


def backend_class(name: str) -> type:
    if name not in BACKENDS:
        raise InputError(f"backend '{name}': unknown; choose one of {', '.join(BACKENDS)}")
    module, attribute = BACKENDS[name]
    return getattr(importlib.import_module(module), attribute)


def make_backend(name: str, handle=None, **options) -> Backend:
    """`handle`: a ModelHandle for a backend that needs the weights, a TokenizerHandle at least for any other."""
    return backend_class(name)(handle, **options)


__all__ = ["BACKENDS", "Backend", "GenerationRequest", "GenerationResult", "Sampling", "backend_class",
           "make_backend"]
