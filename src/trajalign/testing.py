"""Tiny in-process models and tokenizers for tests and examples: no hub, built in well under a second."""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TEMPLATE_FAMILIES = {
    "chatml": (CHATML_TEMPLATE, "<|im_start|>", "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA_TEMPLATE, "<bos>", "<end_of_turn>"),
}
SPECIAL_TOKENS = [
    "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<bos>", "<start_of_turn>", "<end_of_turn>",
]

_CORPUS = [
    "I'm sorry, but I cannot help with that request.",
    "I cannot assist with this. It could cause harm.",
    "Sure, here is a short answer to your question about the weather.",
    "Write a poem about the sea and the sky in spring.",
    "Explain how photosynthesis works in plants, step by step.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "As an AI, I must decline. Let me know if there is anything else.",
    "user assistant system model\n\n",
]


def tiny_tokenizer(family: str = "chatml"):
    """A byte-level BPE tokenizer trained in-process, with the special tokens of three template families."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, bos, eos = TEMPLATE_FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<pad>")
    tokenizer.chat_template = template
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, num_layers: int = 2):
    """A randomly initialised Llama small enough to run a forward pass in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny_model(directory: Path, family: str = "chatml", seed: int = 0, num_layers: int = 2) -> Path:
    """Write a tiny model + tokenizer as an HF directory that `load_model` accepts."""
    tokenizer = tiny_tokenizer(family)
    model = tiny_llama(len(tokenizer), seed, num_layers)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def tiny_handle(family: str = "chatml", seed: int = 0, num_layers: int = 2):
    """A ModelHandle around a tiny model, without touching the disk."""
    from trajalign.models.chat import ChatFormat
    from trajalign.models.loading import ModelHandle

    tokenizer = tiny_tokenizer(family)
    model = tiny_llama(len(tokenizer), seed, num_layers)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ModelHandle(model=model, tokenizer=tokenizer, chat=ChatFormat(tokenizer), spec=f"tiny-{family}")


def labelled_cross_entropy(model, rows) -> float:
    """Mean cross-entropy over every labelled token of `rows` (training rows), one unpadded forward pass per row:
    the hand computation that trainer losses are checked against."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for row in rows:
        labels = torch.tensor(row.labels[1:])
        with torch.no_grad():
            logits = model(torch.tensor([row.input_ids])).logits[0, :-1]
        trained = labels != -100
        total += F.cross_entropy(logits[trained].double(), labels[trained], reduction="sum").item()
        count += int(trained.sum())
    return total / count
