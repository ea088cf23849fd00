"""Generation backends, registered by name and imported only when asked for."""

from __future__ import annotations

from trajalign.backends.base import Backend, GenerationRequest, GenerationResult, Sampling
from trajalign.errors import InputError

BACKENDS = ("hf", "openai")


def make_backend(name: str, handle=None, **options) -> Backend:
    if name == "hf":
        from trajalign.backends.hf import HFBackend

        return HFBackend(handle, **options)
    if name == "openai":
        from trajalign.backends.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(handle, **options)
    raise InputError(f"backend '{name}': unknown; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "GenerationRequest", "GenerationResult", "Sampling", "make_backend"]
