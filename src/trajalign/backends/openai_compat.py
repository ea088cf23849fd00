"""Generation on any OpenAI-compatible `/v1/completions` server (vLLM, SGLang, llama.cpp).

Contexts are rendered locally, token-exactly, and sent as token ids. A server that refuses ids gets the text
of the context instead, which is exact only where the server's tokenizer splits it the same way; such results
are flagged (`exact_ids` False), as are continuations a server returns as text only. Requests for one
trajectory go deepest branch first, so the first one caches the whole trunk and every shallower branch is a pure
prefix hit, whatever the server's cache granularity (vLLM's automatic prefix caching by blocks, llama.cpp's
per-slot common-prefix reuse).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from trajalign.backends.base import GenerationRequest, GenerationResult
from trajalign.batching import batches
from trajalign.errors import InputError, TrajalignError
from trajalign.http import JSONClient


class OpenAICompatBackend:
    """`handle` needs only the tokenizer and chat format (a TokenizerHandle): the weights stay on the server."""

    name = "openai"
    needs_weights = False

    def __init__(self, handle, base_url: str | None = None, served_model: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4, timeout_s: float = 120.0,
                 retries: int = 3, token_ids: bool | None = None, logit_bias: dict[int, float] | None = None):
        if not base_url or not served_model:
            raise InputError("the openai backend needs --base-url (ending in /v1) and --served-model")
        self.handle = handle
        self.served_model = served_model
        self.client = JSONClient(base_url, api_key=os.environ.get(api_key_env), timeout_s=timeout_s,
                                 retries=retries)
        self.concurrency = concurrency
        self.send_token_ids = token_ids  # None: find out from the server on the first request
        self.stop_ids = set(handle.chat.end_of_turn_ids)
        self.logit_bias = {str(token): float(bias) for token, bias in (logit_bias or {}).items()}
        self.identity = f"openai {base_url} {served_model}" + (f" logit_bias {self.logit_bias}" if logit_bias else "")

    @staticmethod
    def order(requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """All branches of a trunk together, deepest first."""
        first_seen = {}
        for index, request in enumerate(requests):
            first_seen.setdefault(tuple(request.trunk), index)
        return sorted(requests, key=lambda r: (first_seen[tuple(r.trunk)], -len(r.context)))

    def _payload(self, request: GenerationRequest, as_ids: bool) -> dict:
        sampling = request.sampling
        # Neutral settings spelled the way each server knows them: no repetition penalty (llama.cpp defaults to
        # 1.1), top-k 0 = off (llama.cpp and current vLLM). vLLM returns token ids on request.
        payload = {"model": self.served_model, "max_tokens": request.max_new_tokens,
                   "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                   "seed": sampling.seed, "repeat_penalty": 1.0, "repetition_penalty": 1.0, "return_token_ids": True,
                   "prompt": request.context if as_ids else self.handle.tokenizer.decode(request.context)}
        if self.logit_bias:
            payload["logit_bias"] = self.logit_bias
        return payload

    def _complete(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        if self.send_token_ids is None:
            try:  # servers reject a token-id prompt with 400, 422 or (llama-cpp-python) 500
                reply = self.client.post("/completions", self._payload(request, as_ids=True),
                                         retry_server_errors=False)
                self.send_token_ids = True
            except TrajalignError as error:
                if "HTTP" not in str(error):
                    raise
                self.send_token_ids = False
                reply = self.client.post("/completions", self._payload(request, as_ids=False))
        else:
            reply = self.client.post("/completions", self._payload(request, as_ids=self.send_token_ids))
        choice = reply["choices"][0]
        ids = choice.get("token_ids")
        exact = ids is not None and self.send_token_ids
        if ids is None:
            ids = self.handle.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
        ids = [token for token in ids if token not in self.stop_ids]
        finish = "eos" if choice.get("finish_reason") == "stop" else "length"
        return GenerationResult(key=request.key, continuation_ids=ids, finish_reason=finish, exact_ids=exact,
                                seconds=time.perf_counter() - started)

    def generate(self, requests: list[GenerationRequest]) -> Iterator[list[GenerationResult]]:
        ordered = self.order(requests)
        if ordered and self.send_token_ids is None:  # settle the prompt format before going concurrent
            yield [self._complete(ordered[0])]
            ordered = ordered[1:]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for batch in batches(ordered, self.concurrency * 4):
                yield list(pool.map(self._complete, batch))
