import pytest

from trajalign.errors import InputError, TrajalignError
from trajalign.models.chat import ChatFormat, check_single_bos
from trajalign.testing import tiny_handle, tiny_tokenizer

# Llama-3's header ends in "\n\n", which this byte-level tokenizer merges differently before a letter than
# before a space; a leading space keeps the token boundary where the template puts it.
CASES = [("chatml", "Sure, here is a poem"), ("llama3", " Sure, here is a poem"), ("gemma", "Sure, here is a poem")]


@pytest.mark.parametrize("family,answer", CASES)
def test_prompt_plus_answer_equals_tokenizer_rendering(family, answer):
    chat = tiny_handle(family).chat
    prompt = chat.prompt_ids("Write a poem about the sea")
    assert prompt + chat.encode_span(answer) == chat.reference_ids("Write a poem about the sea", answer)


@pytest.mark.parametrize("family,header,end", [
    ("chatml", "<|im_start|>assistant\n", "<|im_end|>"),
    ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ("gemma", "<start_of_turn>model\n", "<end_of_turn>"),
])
def test_header_and_end_of_turn(family, header, end):
    handle = tiny_handle(family)
    chat = handle.chat
    assert handle.tokenizer.decode(chat.header_ids) == header
    assert handle.tokenizer.convert_ids_to_tokens(chat.end_of_turn_ids[0]) == end
    prompt = chat.prompt_ids("hello")
    assert prompt[-len(chat.header_ids):] == chat.header_ids
    assert prompt[-len(chat.post_instruction_ids):] == chat.post_instruction_ids
    assert len(chat.post_instruction_ids) > len(chat.header_ids)


def test_single_bos_in_llama3_prompt():
    handle = tiny_handle("llama3")
    prompt = handle.chat.prompt_ids("hello")
    assert prompt[0] == handle.tokenizer.bos_token_id and prompt[1] != handle.tokenizer.bos_token_id


def test_doubled_bos_is_detected():
    tokenizer = tiny_tokenizer("llama3")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    doubled = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(TrajalignError, match="doubled BOS"):
        check_single_bos(doubled, tokenizer)


def test_system_prompt_is_rendered():
    chat = tiny_handle("chatml").chat
    with_system = chat.prompt_ids("hello", system="Be brief.")
    assert with_system[-len(chat.prompt_ids("hello")):] == chat.prompt_ids("hello")
    assert len(with_system) > len(chat.prompt_ids("hello"))


def test_tokenizer_without_template_is_an_input_error():
    tokenizer = tiny_tokenizer("chatml")
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        ChatFormat(tokenizer)


def test_empty_prompt_and_span_are_rejected():
    chat = tiny_handle("chatml").chat
    with pytest.raises(InputError, match="empty prompt"):
        chat.prompt_ids("   ")
    with pytest.raises(InputError, match="empty span"):
        chat.encode_span("")
