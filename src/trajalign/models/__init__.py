"""Models: loading from any spec, chat formats at token level, the registry of embedded models."""

from trajalign.models.chat import ChatFormat
from trajalign.models.loading import ModelHandle, load_model, pull_embedded

__all__ = ["ChatFormat", "ModelHandle", "load_model", "pull_embedded"]
