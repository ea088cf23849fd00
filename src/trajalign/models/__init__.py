"""Models: loading from any spec, chat formats at token level, the registry of embedded models."""

from trajalign.models.chat import ChatFormat
from trajalign.models.loading import ModelHandle, ModelSpec, TokenizerHandle, load_model, load_tokenizer, pull_embedded

__all__ = ["ChatFormat", "ModelHandle", "ModelSpec", "TokenizerHandle", "load_model", "load_tokenizer", "pull_embedded"]
