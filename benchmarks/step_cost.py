"""Cost of one decode step of the hf engine against its shape: tokens fed per row (what a draft costs) and rows per
batch (why generation runs in wide batches).

    python benchmarks/step_cost.py [--model smollm2-135m] [--rows 16]

Every step is a bare forward pass over a zero-filled cache of 80 columns (a prompt and a prefill), timed the way
the engine calibrates its drafter (`Batch.relative_step_cost`), best of 5. The first table is relative to a
one-token step of the same batch, with the draft_cost that `fitted_draft_cost` reads off each width; the second is
new tokens per second of a one-token step against the batch size. Measured on 2 CPU cores (smollm2-135m, 16 rows,
80 columns): widths 2 / 5 / 9 cost 1.46 / 2.3 / 3.5 one-token steps (draft_cost about 0.3), and a step of 64 rows
about 1.7 times one of 16 (288 new tokens per second against 120).
"""

from __future__ import annotations

import argparse
import time

import torch

from trajalign.backends import kv_cache
from trajalign.backends.drafting import fitted_draft_cost
from trajalign.models import load_model

CONTEXT = 80
REPEATS = 5


@torch.inference_mode()
def step_seconds(model, rows: int, context: int, feed: int, repeats: int) -> float:
    keyword = kv_cache.cache_keyword(model)
    dtype = next(model.parameters()).dtype
    best = float("inf")
    for _ in range(repeats):
        cache = kv_cache.from_layers(kv_cache.zeros(model.config, rows, context, dtype, model.device), model.config)
        started = time.perf_counter()
        model(input_ids=torch.zeros((rows, feed), dtype=torch.long, device=model.device),
              attention_mask=torch.ones((rows, context + feed), dtype=torch.long, device=model.device),
              use_cache=True, logits_to_keep=feed, **{keyword: cache})
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args()
    model = load_model(args.model).model
    step_seconds(model, args.rows, CONTEXT, 1, 2)  # warm-up
    one = step_seconds(model, args.rows, CONTEXT, 1, REPEATS)
    print(f"{args.rows} rows, {CONTEXT} cached columns, {torch.get_num_threads()} threads")
    print("fed per row   relative cost   draft_cost fitted")
    for width in (2, 3, 5, 9, 17):
        relative = step_seconds(model, args.rows, CONTEXT, width, REPEATS) / one
        print(f"{width:>11}   {relative:13.2f}   {fitted_draft_cost(relative, width - 1):17.2f}")
    print("batch rows   new tok/s (one-token steps)")
    for rows in (1, 4, 16, 64):
        print(f"{rows:>10}   {rows / step_seconds(model, rows, CONTEXT, 1, REPEATS):25.1f}")


if __name__ == "__main__":
    main()
