"""Chat contexts at token level: prompt ids, assistant header, end-of-turn tokens, spans tokenized in context."""

from __future__ import annotations

from functools import cached_property

from trajalign.errors import InputError, TrajalignError

_SENTINEL = "\u2063TRAJALIGN\u2063"


class ChatFormat:
    """Renders conversations to token ids with the tokenizer's own chat template.

    Everything downstream works on ids; text enters a context only through `encode_span`, which tokenizes
    the span on its own and checks that it round-trips, so no prefix is ever decoded and re-encoded.
    """

    def __init__(self, tokenizer, system_prompt: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
            raise InputError(f"{name}: tokenizer has no chat template; give one with a chat_template.jinja file")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    def _messages(self, user: str, system: str | None, assistant: str | None = None) -> list[dict]:
        messages = []
        system = system if system is not None else self.system_prompt
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
        return messages

    def _render_ids(self, messages: list[dict], **kwargs) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        check_single_bos(ids, self.tokenizer)
        return list(ids)

    def prompt_ids(self, user: str, system: str | None = None) -> list[int]:
        """The ids of (optional system, user) with the generation prompt: the model's answer starts next."""
        if not user or not user.strip():
            raise InputError("empty prompt")
        return self._render_ids(self._messages(user, system), add_generation_prompt=True)

    def reference_ids(self, user: str, assistant_text: str, system: str | None = None) -> list[int]:
        """The tokenizer's own rendering of a conversation whose assistant message is continued (for checks)."""
        return self._render_ids(self._messages(user, system, assistant_text), continue_final_message=True)

    @cached_property
    def header_ids(self) -> list[int]:
        """The assistant-header tokens the template places before an answer (re-injected by the defense)."""
        without = self._render_ids(self._messages("x", None), add_generation_prompt=False)
        with_header = self._render_ids(self._messages("x", None), add_generation_prompt=True)
        if with_header[: len(without)] != without or len(with_header) == len(without):
            raise TrajalignError("cannot locate the assistant header: the template's generation prompt is not a suffix")
        return with_header[len(without):]

    @cached_property
    def post_instruction_ids(self) -> list[int]:
        """The template tokens between the end of the user's text and the answer (end of user turn + header)."""
        text = self.tokenizer.apply_chat_template(
            self._messages(_SENTINEL, None), tokenize=False, add_generation_prompt=True
        )
        suffix = text.split(_SENTINEL)[-1]
        suffix_ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        full = self._render_ids(self._messages("x", None), add_generation_prompt=True)
        if not suffix_ids or full[-len(suffix_ids):] != suffix_ids:
            raise TrajalignError("cannot locate the post-instruction tokens of this chat template")
        return list(suffix_ids)

    @cached_property
    def end_of_turn_ids(self) -> list[int]:
        """Token ids that end an assistant turn: the template's closing special token and the tokenizer's EOS."""
        text = self.tokenizer.apply_chat_template(
            self._messages("x", None, _SENTINEL), tokenize=False, add_generation_prompt=False
        )
        closing = self.tokenizer(text.split(_SENTINEL)[-1], add_special_tokens=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids)
        stops = [token for token in closing if token in special][:1]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in stops:
            stops.append(eos)
        if not stops:
            raise TrajalignError("cannot find an end-of-turn token in the chat template or tokenizer")
        return stops

    def encode_span(self, text: str) -> list[int]:
        """Tokenize text that will be placed inside an assistant turn, checking that it round-trips exactly."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError("empty span: nothing to inject")
        decoded = self.tokenizer.decode(ids)
        if decoded != text:
            raise InputError(f"span {text[:40]!r} does not round-trip through the tokenizer (got {decoded[:40]!r})")
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def check_single_bos(ids: list[int], tokenizer) -> None:
    """Raise on a doubled BOS: a template that writes BOS, tokenized again with special tokens added."""
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        raise TrajalignError("doubled BOS at the start of the context: the template and tokenizer both add it")
