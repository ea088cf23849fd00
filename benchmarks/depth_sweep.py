"""Depth-sweep throughput: the engine against `model.generate`, per episode and batched, and the forward floor.

    python benchmarks/depth_sweep.py [--prompts 32] [--new-tokens 64] [--batch-size 16] [--per-episode 16]
                                     [--trajectories greedy|sampled]

All ways run in this process on the same contexts. The engine runs twice: with drafting (its default) and with
`draft_tokens=0` (shared-prefix reuse alone). Trajectories are the model's own greedy answers (as in
`--trajectories model:smollm2-135m`), where a branch's continuation is its trunk and drafts are nearly always
right, or its sampled answers (temperature 1), where they are not: the second bounds what drafting gives an
attack whose trajectory comes from another model. Greedy outputs are compared token for token; a divergence
is counted as a near-tie when the engine's top-2 logit gap at the first differing token is below 1e-4.
`generate` once per episode is slow, so it runs on the first `--per-episode` episodes and its rate is reported.
"""

from __future__ import annotations

import argparse
import time

import torch

from trajalign.backends.base import GenerationRequest, Sampling
from trajalign.backends.hf import HFBackend
from trajalign.backends.kv_cache import cache_keyword, kv_shape
from trajalign.data.datasets import load_behaviors
from trajalign.data.trajectories import generate_answers
from trajalign.models import load_model

DEPTHS = (0, 5, 10, 20, 40)


def sweep_requests(handle, prompts: int, new_tokens: int, source: str) -> list[GenerationRequest]:
    behaviors = load_behaviors("advbench", limit=prompts)
    if source == "greedy":
        trajectories = generate_answers(handle, behaviors, max(DEPTHS))
    else:
        answers = [GenerationRequest(b.id, handle.chat.prompt_ids(b.prompt), len(handle.chat.prompt_ids(b.prompt)),
                                     sampling=Sampling(temperature=1.0, seed=index), max_new_tokens=max(DEPTHS))
                   for index, b in enumerate(behaviors)]
        trajectories = {r.key: r.continuation_ids for batch in HFBackend(handle).generate(answers) for r in batch}
    requests = []
    for behavior in behaviors:
        prompt = handle.chat.prompt_ids(behavior.prompt)
        trajectory = trajectories[behavior.id]
        for depth in DEPTHS:
            if depth <= len(trajectory):
                requests.append(GenerationRequest(f"{behavior.id}@{depth}", prompt + trajectory[: max(DEPTHS)],
                                                  len(prompt) + depth, max_new_tokens=new_tokens))
    return requests


def record_forward_shapes(model):
    shapes = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if cache is not None else 0
        shapes.append((tuple(kwargs["input_ids"].shape), cached))

    return shapes, model.register_forward_pre_hook(hook, with_kwargs=True)


@torch.inference_mode()
def replay_forwards(model, shapes) -> float:
    """The same forward calls as bare calls: same batch, input and cache lengths, zero-filled caches."""
    from transformers import DynamicCache

    config = model.config
    layers_count, heads, head_dim = kv_shape(config)
    keyword = cache_keyword(model)
    started = time.perf_counter()
    for (batch, length), cached in shapes:
        layers = [(torch.zeros(batch, heads, cached, head_dim), torch.zeros(batch, heads, cached, head_dim))
                  for _ in range(layers_count)]
        cache = DynamicCache(ddp_cache_data=layers, config=config) if cached else None
        model(input_ids=torch.zeros(batch, length, dtype=torch.long),
              attention_mask=torch.ones(batch, cached + length, dtype=torch.long),
              logits_to_keep=1, use_cache=True, **({keyword: cache} if cache is not None else {}))
    return time.perf_counter() - started


def generate_batched(handle, requests, batch_size: int) -> dict[str, list[int]]:
    tokenizer, model = handle.tokenizer, handle.model
    outputs = {}
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        width = max(len(r.context) for r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            ids[row, width - len(request.context):] = torch.tensor(request.context)
            mask[row, width - len(request.context):] = 1
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=batch[0].max_new_tokens,
                                   do_sample=False, eos_token_id=handle.chat.end_of_turn_ids,
                                   pad_token_id=tokenizer.pad_token_id)
        for row, request in enumerate(batch):
            outputs[request.key] = strip_after_stop(generated[row, width:].tolist(), handle.chat.end_of_turn_ids)
    return outputs


def strip_after_stop(ids: list[int], stops: list[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in stops:
            return ids[:index]
    return ids


def compare(engine_results, reference: dict[str, list[int]]) -> tuple[int, int, int]:
    """(identical, near-tie divergences, other divergences)."""
    identical = near_ties = others = 0
    for key, expected in reference.items():
        produced = engine_results[key].continuation_ids
        if produced == expected:
            identical += 1
            continue
        first = next(i for i, (a, b) in enumerate(zip(produced + [-1], expected + [-2])) if a != b)
        gaps = engine_results[key].top2_gaps
        if first < len(gaps) and gaps[first] < 1e-4:
            near_ties += 1
        else:
            others += 1
    return identical, near_ties, others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-episode", type=int, default=16)
    parser.add_argument("--trajectories", choices=["greedy", "sampled"], default="greedy")
    args = parser.parse_args()
    handle = load_model(args.model)
    requests = sweep_requests(handle, args.prompts, args.new_tokens, args.trajectories)
    print(f"{len(requests)} episodes: {args.prompts} prompts x depths {DEPTHS}, {args.new_tokens} new tokens, "
          f"batch {args.batch_size}, {args.trajectories} trajectories, {torch.get_num_threads()} threads")

    shapes, hook = record_forward_shapes(handle.model)
    started = time.perf_counter()
    engine = {r.key: r for batch in HFBackend(handle, batch_size=args.batch_size).generate(requests) for r in batch}
    engine_s = time.perf_counter() - started
    hook.remove()
    engine_tokens = sum(len(r.continuation_ids) for r in engine.values())

    started = time.perf_counter()
    undrafted = {r.key: r for batch in HFBackend(handle, batch_size=args.batch_size, draft_tokens=0).generate(requests)
                 for r in batch}
    undrafted_s = time.perf_counter() - started
    undrafted_tokens = sum(len(r.continuation_ids) for r in undrafted.values())

    started = time.perf_counter()
    batched = generate_batched(handle, requests, args.batch_size)
    batched_s = time.perf_counter() - started
    batched_tokens = sum(len(ids) for ids in batched.values())

    subset = requests[: args.per_episode]
    started = time.perf_counter()
    single = {r.key: strip_after_stop(handle.model.generate(
        torch.tensor([r.context]), max_new_tokens=r.max_new_tokens, do_sample=False,
        eos_token_id=handle.chat.end_of_turn_ids, pad_token_id=handle.tokenizer.pad_token_id,
    )[0, len(r.context):].tolist(), handle.chat.end_of_turn_ids) for r in subset}
    single_s = time.perf_counter() - started
    single_tokens = sum(len(ids) for ids in single.values())

    floor_s = replay_forwards(handle.model, shapes)
    rate = {"engine": engine_tokens / engine_s, "engine without drafts": undrafted_tokens / undrafted_s,
            "generate batched": batched_tokens / batched_s,
            "generate per episode": single_tokens / single_s, "bare-forward floor": engine_tokens / floor_s}
    for name, value in rate.items():
        print(f"{name:>23}: {value:7.1f} new tok/s")
    print(f"engine / per-episode generate: {rate['engine'] / rate['generate per episode']:.2f}x")
    print(f"engine / batched generate:     {rate['engine'] / rate['generate batched']:.2f}x "
          f"(without drafts {rate['engine without drafts'] / rate['generate batched']:.2f}x)")
    print(f"engine / bare-forward floor:   {floor_s / engine_s:.0%} ({len(shapes)} forward calls)")
    print(f"forward calls: {len(shapes)} for {engine_tokens} new tokens "
          f"({engine_tokens / len(shapes):.1f} tokens per call across the batch)")
    without = {key: result.continuation_ids for key, result in undrafted.items()}
    for name, reference in (("per-episode generate", single), ("batched generate", batched),
                            ("the engine without drafts", without)):
        identical, near, other = compare(engine, reference)
        print(f"greedy vs {name}: {identical} identical, {near} diverge at a near-tie (<1e-4), {other} otherwise")


if __name__ == "__main__":
    main()
