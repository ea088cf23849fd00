"""Cost of the one-pass probe for all depths, against one bare forward pass of the same sequences and against
generating a branch at each depth.

    python benchmarks/probe_cost.py [--prompts 16] [--tokens 40] [--branch-tokens 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from trajalign.backends.base import GenerationRequest
from trajalign.backends.hf import HFBackend
from trajalign.batching import pad_right
from trajalign.data.datasets import load_behaviors
from trajalign.data.trajectories import generate_answers
from trajalign.models import load_model
from trajalign.probe.direction import refusal_opening_ids
from trajalign.probe.trajectory import probe_trajectories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--branch-tokens", type=int, default=8, help="tokens generated per depth branch")
    args = parser.parse_args()
    handle = load_model(args.model)
    behaviors = load_behaviors("advbench", limit=args.prompts)
    trajectories = generate_answers(handle, behaviors, args.tokens)
    items = [(b.id, handle.chat.prompt_ids(b.prompt), trajectories[b.id]) for b in behaviors]
    layers = [handle.model.config.num_hidden_layers // 2]
    direction = torch.randn(handle.model.config.hidden_size)
    openings = refusal_opening_ids(handle.chat)

    sequences = [prompt + trajectory for _, prompt, trajectory in items]
    input_ids, attention_mask = pad_right(sequences, handle.tokenizer.pad_token_id, handle.device)
    with torch.inference_mode():
        handle.model(input_ids=input_ids[:2], attention_mask=attention_mask[:2])  # warm-up
        started = time.perf_counter()
        handle.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        forward_s = time.perf_counter() - started

    started = time.perf_counter()
    readings = probe_trajectories(handle, items, openings, direction, layers, batch_size=len(items))
    probe_s = time.perf_counter() - started

    requests = [GenerationRequest(f"{behavior_id}@{depth}", prompt + trajectory, len(prompt) + depth,
                                  max_new_tokens=args.branch_tokens)
                for behavior_id, prompt, trajectory in items for depth in range(len(trajectory) + 1)]
    started = time.perf_counter()
    for _ in HFBackend(handle, batch_size=64, stop_ids=[]).generate(requests):
        pass
    branches_s = time.perf_counter() - started

    print(f"{len(items)} trajectories, {len(readings)} depth readings, {sum(map(len, sequences))} tokens")
    print(f"one bare forward pass:       {forward_s:7.2f} s")
    print(f"one-pass probe, all depths:  {probe_s:7.2f} s  ({probe_s / forward_s:.2f}x the forward pass)")
    print(f"a {args.branch_tokens}-token branch per depth: {branches_s:7.2f} s  "
          f"({branches_s / probe_s:.1f}x the probe)")


if __name__ == "__main__":
    main()
