"""Local batched generation with shared-prefix KV reuse: one prefill per trunk, every branch decoded from it."""

from __future__ import annotations

import inspect
import time
from itertools import islice
from typing import Iterable, Iterator

import torch

from trajalign.backends.base import GenerationRequest, GenerationResult, Sampling
from trajalign.errors import TrajalignError


def _chunks(items: list, size: int) -> Iterable[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def cache_keyword(model) -> str:
    """The forward() keyword for a KV cache: `cache` in recent transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def output_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def _cached_length(request: GenerationRequest) -> int:
    # The last context token is always fed fresh: its logits give the first new token.
    return min(request.branch, len(request.context) - 1)


class HFBackend:
    """Greedy or seeded-sampling generation on a local transformers model.

    Requests are grouped by trunk. Each trunk is prefilled once, up to the deepest point any of its requests
    branches at; each request then reuses the trunk's keys/values up to its own branch point and only feeds its
    own suffix. Decoding runs batched with left-padded caches, explicit position ids, and drops finished rows.
    """

    name = "hf"

    def __init__(self, handle, batch_size: int = 16, trunk_batch_size: int = 16, stop_ids: Iterable[int] | None = None):
        if handle is None:
            raise TrajalignError("the hf backend needs a loaded model")
        self.model = handle.model
        self.config = getattr(self.model, "config", None)
        self.cache_keyword = cache_keyword(self.model)
        self.stop_ids = set(stop_ids if stop_ids is not None else handle.chat.end_of_turn_ids)
        self.pad_id = handle.tokenizer.pad_token_id or 0
        self.batch_size = batch_size
        self.trunk_batch_size = trunk_batch_size
        if getattr(self.config, "sliding_window", None) and getattr(self.config, "use_sliding_window", True):
            layer_types = getattr(self.config, "layer_types", None) or []
            if any("sliding" in str(kind) for kind in layer_types):
                raise TrajalignError("the hf backend's KV reuse does not support sliding-window attention layers")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, requests: list[GenerationRequest]) -> Iterator[list[GenerationResult]]:
        for request in requests:
            if not 0 <= request.branch <= len(request.trunk) or not request.context:
                raise TrajalignError(
                    f"request {request.key}: branch {request.branch} outside its trunk or empty context")
        groups: dict[tuple[int, ...], list[GenerationRequest]] = {}
        for request in requests:
            groups.setdefault(tuple(request.trunk), []).append(request)
        for trunk_chunk in _chunks(list(groups.items()), self.trunk_batch_size):
            trunk_states = self._prefill_trunks(trunk_chunk)
            items = [(request, trunk_states[index]) for index, (_, members) in enumerate(trunk_chunk)
                     for request in members]
            for batch in _chunks(items, self.batch_size):
                yield self._decode(batch)

    @torch.inference_mode()
    def _prefill_trunks(self, trunk_chunk) -> list[list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Per trunk, per layer: (keys, values) of shape [heads, length, head_dim] up to the deepest branch."""
        lengths = [max(_cached_length(request) for request in members) for _, members in trunk_chunk]
        longest = max(lengths)
        if longest == 0:
            return [None] * len(trunk_chunk)
        input_ids = torch.full((len(trunk_chunk), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(trunk_chunk), longest), dtype=torch.long)
        for row, ((trunk, _), length) in enumerate(zip(trunk_chunk, lengths)):
            input_ids[row, :length] = torch.tensor(trunk[:length])
            attention_mask[row, :length] = 1
        output = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                            use_cache=True, logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in output_cache(output).layers]
        return [[(keys[row, :, :length], values[row, :, :length]) for keys, values in layers] if length else None
                for row, length in enumerate(lengths)]

    def _batch_cache(self, batch, cached_lengths: list[int]):
        from transformers import DynamicCache

        longest = max(cached_lengths)
        if longest == 0:
            return DynamicCache(config=self.config), longest
        template = next(state for _, state in batch if state is not None)
        layers = []
        for layer_index, (keys_like, values_like) in enumerate(template):
            heads, _, head_dim = keys_like.shape
            keys = keys_like.new_zeros((len(batch), heads, longest, head_dim))
            values = values_like.new_zeros((len(batch), heads, longest, values_like.shape[-1]))
            for row, ((_, state), length) in enumerate(zip(batch, cached_lengths)):
                if length:
                    keys[row, :, longest - length:] = state[layer_index][0][:, :length]
                    values[row, :, longest - length:] = state[layer_index][1][:, :length]
            layers.append((keys, values))
        return DynamicCache(ddp_cache_data=layers, config=self.config), longest

    @torch.inference_mode()
    def _decode(self, batch) -> list[GenerationResult]:
        started = time.perf_counter()
        requests = [request for request, _ in batch]
        cached_lengths = [_cached_length(request) for request in requests]
        cache, cached_width = self._batch_cache(batch, cached_lengths)
        tails = [request.context[length:] for request, length in zip(requests, cached_lengths)]
        tail_width = max(len(tail) for tail in tails)
        rows = len(requests)
        input_ids = torch.full((rows, tail_width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((rows, tail_width), dtype=torch.long)
        attention_mask = torch.zeros((rows, cached_width + tail_width), dtype=torch.long)
        for row, (tail, length) in enumerate(zip(tails, cached_lengths)):
            input_ids[row, tail_width - len(tail):] = torch.tensor(tail)
            position_ids[row, tail_width - len(tail):] = torch.arange(length, length + len(tail))
            attention_mask[row, cached_width - length:cached_width] = 1
            attention_mask[row, cached_width + tail_width - len(tail):] = 1
        device = self.device
        input_ids, position_ids = input_ids.to(device), position_ids.to(device)
        attention_mask = attention_mask.to(device)
        generators = [None if request.sampling.greedy else
                      torch.Generator(device=device).manual_seed(request.sampling.seed) for request in requests]
        continuations: list[list[int]] = [[] for _ in requests]
        gaps: list[list[float]] = [[] for _ in requests]
        finish = ["length"] * rows
        alive = list(range(rows))
        next_position = position_ids[:, -1] + 1
        while True:
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=True, logits_to_keep=1, **{self.cache_keyword: cache})
            cache = output_cache(output)
            logits = output.logits[:, -1, :].float()
            top2 = logits.topk(2, dim=-1).values
            tokens = self._choose(logits, [requests[index].sampling for index in alive],
                                  [generators[index] for index in alive])
            keep = []
            for position, index in enumerate(alive):
                token = int(tokens[position])
                gaps[index].append(float(top2[position, 0] - top2[position, 1]))
                if token in self.stop_ids:
                    finish[index] = "eos"
                    continue
                continuations[index].append(token)
                if len(continuations[index]) < requests[index].max_new_tokens:
                    keep.append(position)
            if not keep:
                break
            if len(keep) < len(alive):
                selector = torch.tensor(keep, device=device)
                cache.batch_select_indices(selector)
                attention_mask, next_position = attention_mask[selector], next_position[selector]
                tokens = tokens[selector]
                alive = [alive[position] for position in keep]
            input_ids = tokens[:, None]
            position_ids = next_position[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(alive), 1))], dim=1)
            next_position = next_position + 1
        seconds = (time.perf_counter() - started) / rows
        return [GenerationResult(key=request.key, continuation_ids=continuations[index], finish_reason=finish[index],
                                 top2_gaps=gaps[index], seconds=seconds) for index, request in enumerate(requests)]

    @staticmethod
    def _choose(logits: torch.Tensor, samplings: list[Sampling], generators: list) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        for row, (sampling, generator) in enumerate(zip(samplings, generators)):
            if not sampling.greedy:
                tokens[row] = sample_token(logits[row], sampling, generator)
        return tokens


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Temperature, then top-k, then top-p (nucleus) filtering, then one draw from `generator`."""
    scores = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = scores.topk(min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_scores.softmax(-1) >= sampling.top_p
        scores = scores.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
    probabilities = scores.softmax(-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))
