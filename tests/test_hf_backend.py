import pytest
import torch

from trajalign.backends.base import GenerationRequest, Sampling
from trajalign.backends.drafting import LookupDrafter
from trajalign.backends.hf import Batch, HFBackend
from trajalign.testing import tiny_handle

PROMPTS = ["Write a poem about the sea", "Explain photosynthesis", "Hello there", "The quick brown fox jumps"]


def depth_sweep(handle, depths=(0, 3, 7, 12), max_new_tokens=12):
    trajectory = handle.chat.encode_span("Sure, here is a short answer to your question about the weather.")
    requests = []
    for index, prompt in enumerate(PROMPTS):
        prompt_ids = handle.chat.prompt_ids(prompt)
        for depth in depths:
            requests.append(GenerationRequest(key=f"{index}-{depth}", trunk=prompt_ids + trajectory,
                                              branch=len(prompt_ids) + depth, max_new_tokens=max_new_tokens))
    return requests


def lively_handle(family: str = "chatml"):
    """A tiny model with weights large enough that its greedy text varies and top-2 logits are far apart."""
    handle = tiny_handle(family)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in handle.model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.15)
    return handle


def reference_generate(handle, context, max_new_tokens, eos=None):
    output = handle.model.generate(torch.tensor([context]), max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos, pad_token_id=0)
    return output[0, len(context):].tolist()


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma"])
def test_greedy_equals_generate_token_for_token(family):
    handle = lively_handle(family)
    requests = depth_sweep(handle)
    results = {r.key: r for batch in HFBackend(handle, batch_size=5, stop_ids=[]).generate(requests) for r in batch}
    for request in requests:
        expected = reference_generate(handle, request.context, request.max_new_tokens)
        assert results[request.key].continuation_ids == expected, request.key


def test_trunks_prefilled_once_per_chunk(tiny):
    calls = []
    hook = tiny.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                                with_kwargs=True)
    try:
        requests = depth_sweep(tiny, max_new_tokens=1)
        list(HFBackend(tiny, batch_size=16, stop_ids=[], draft_cost=0.3).generate(requests))
    finally:
        hook.remove()
    # one prefill over the 4 trunks, then one decode step for the 16 branches: nothing recomputed per depth
    assert len(calls) == 2
    assert calls[0][0] == 4 and calls[1][0] == 16


def test_drafts_from_the_trunk_save_forward_calls_and_change_no_token():
    lively = lively_handle()
    prompt = lively.chat.prompt_ids("Write a poem about the sea")
    own_answer = reference_generate(lively, prompt, 24)
    requests = [GenerationRequest(f"d{depth}", prompt + own_answer, len(prompt) + depth, max_new_tokens=16)
                for depth in (0, 4, 8)]
    calls = {}
    for draft_tokens in (0, 8):
        shapes = []
        hook = lively.model.register_forward_pre_hook(
            lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True)
        try:
            backend = HFBackend(lively, draft_tokens=draft_tokens, draft_cost=0.3, stop_ids=[])
            results = {r.key: r for batch in backend.generate(requests) for r in batch}
        finally:
            hook.remove()
        calls[draft_tokens] = len(shapes)
        for request in requests:
            expected = reference_generate(lively, request.context, 16)
            assert results[request.key].continuation_ids == expected, request.key
            assert len(results[request.key].top2_gaps) == 16
    assert calls[0] == 1 + 16  # the trunk prefill, then one call per new token
    assert calls[8] <= 1 + 16 // 2  # the branches retrace their trunk: most tokens come confirmed in bulk


def test_finished_rows_are_replaced_mid_flight():
    lively = lively_handle()
    requests = [GenerationRequest(f"r{index}", lively.chat.prompt_ids(prompt), len(lively.chat.prompt_ids(prompt)),
                                  max_new_tokens=length)
                for index, (prompt, length) in enumerate(zip(PROMPTS * 2, [3, 9, 5, 12, 1, 7, 4, 10]))]
    requests.append(GenerationRequest("short-context", lively.chat.prompt_ids("Hi")[:2], 2, max_new_tokens=6))
    rows = []
    hook = lively.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        results = {r.key: r for batch in HFBackend(lively, batch_size=3, stop_ids=[], draft_cost=0.3).generate(requests)
                   for r in batch}
    finally:
        hook.remove()
    assert max(rows[1:]) == 3 and len(rows) < 1 + sum(r.max_new_tokens for r in requests) / 2
    for request in requests:
        assert results[request.key].continuation_ids == reference_generate(
            lively, request.context, request.max_new_tokens), request.key


def test_kv_budget_bounds_rows_times_columns_and_changes_no_token():
    lively = lively_handle()
    long_prompt = lively.chat.prompt_ids(" ".join(PROMPTS * 4))
    requests = [GenerationRequest(f"long{index}", long_prompt, len(long_prompt), max_new_tokens=6 + index)
                for index in range(3)] + depth_sweep(lively, max_new_tokens=6)
    budget = 2 * (len(long_prompt) + 12)  # room for two long rows, or more short ones
    shapes = []
    hook = lively.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append((kwargs["input_ids"].shape[0], kwargs["attention_mask"].shape[1])),
        with_kwargs=True)
    try:
        backend = HFBackend(lively, batch_size=8, stop_ids=[], draft_cost=0.3, max_batch_tokens=budget)
        results = {r.key: r for batch in backend.generate(requests) for r in batch}
    finally:
        hook.remove()
    decode_steps = [(rows, columns) for rows, columns in shapes if columns > 0]
    assert max(rows * columns for rows, columns in decode_steps[1:]) <= budget
    assert max(rows for rows, _ in decode_steps) > 2  # short rows still fill a wider batch
    for request in requests:
        assert results[request.key].continuation_ids == reference_generate(
            lively, request.context, request.max_new_tokens), request.key


def test_draft_calibration_leaves_the_batch_cache_as_it_was():
    lively = lively_handle()
    calibrated = {}

    class Recording(LookupDrafter):
        def calibrate(self, relative_step_cost):
            batch_cache = backend_batches[-1].cache
            before = [(layer.keys.clone(), layer.values.clone()) for layer in batch_cache.layers]
            calibrated["cost"] = relative_step_cost(4)
            calibrated["same"] = all(torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
                                     for layer, (keys, values) in zip(batch_cache.layers, before))

    backend_batches = []
    original_admit = Batch.admit

    def admit(self, rows):
        backend_batches.append(self)
        original_admit(self, rows)

    requests = depth_sweep(lively, max_new_tokens=6)
    try:
        Batch.admit = admit
        results = {r.key: r for batch in HFBackend(lively, batch_size=16, stop_ids=[], drafter=Recording(8))
                   .generate(requests) for r in batch}
    finally:
        Batch.admit = original_admit
    assert calibrated["same"] and calibrated["cost"] > 0
    for request in requests:
        assert results[request.key].continuation_ids == reference_generate(lively, request.context, 6), request.key


def test_stops_at_end_of_turn(tiny):
    prompt = tiny.chat.prompt_ids("Hello there")
    free = reference_generate(tiny, prompt, 6)
    stop = free[3]
    backend = HFBackend(tiny, stop_ids=[stop])
    result = next(iter(backend.generate([GenerationRequest("a", prompt, len(prompt), max_new_tokens=6)])))[0]
    assert result.finish_reason == "eos"
    assert result.continuation_ids == free[: free.index(stop)]


def test_sampling_is_seeded_and_independent_of_batch(tiny):
    prompt = tiny.chat.prompt_ids("Hello there")
    sampling = Sampling(temperature=1.0, top_p=0.9, top_k=50, seed=7)
    alone = GenerationRequest("a", prompt, len(prompt), sampling=sampling, max_new_tokens=10)
    other = GenerationRequest("b", tiny.chat.prompt_ids("Explain photosynthesis"), 5,
                              sampling=Sampling(temperature=1.5, seed=1), max_new_tokens=4)
    backend = HFBackend(tiny, stop_ids=[])
    first = next(iter(backend.generate([alone])))[0].continuation_ids
    batched = {r.key: r for batch in backend.generate([other, alone]) for r in batch}
    assert batched["a"].continuation_ids == first
    reseeded = GenerationRequest("a", prompt, len(prompt), sampling=Sampling(1.0, 0.9, 50, seed=8), max_new_tokens=10)
    assert next(iter(backend.generate([reseeded])))[0].continuation_ids != first


@pytest.mark.integration
def test_embedded_greedy_equals_generate(embedded):
    requests = depth_sweep(embedded, depths=(0, 5, 10), max_new_tokens=16)[:6]
    backend = HFBackend(embedded, batch_size=6)
    results = {r.key: r for batch in backend.generate(requests) for r in batch}
    for request in requests:
        result = results[request.key]
        expected = reference_generate(embedded, request.context, 16, eos=embedded.chat.end_of_turn_ids)
        produced = result.continuation_ids
        if produced != expected:  # a near-tie may flip under another float order; it must be one
            first = next(i for i, (a, b) in enumerate(zip(produced + [-1], expected + [-1])) if a != b)
            assert result.top2_gaps[first] < 1e-4, (request.key, first)


def test_a_copy_of_the_architecture_reuses_the_drafter_calibration_and_another_measures_its_own(monkeypatch):
    measured = []
    original = Batch.relative_step_cost

    def counting(self, extra, repeats=3):
        measured.append(self.model)
        return original(self, extra, repeats)

    monkeypatch.setattr(Batch, "relative_step_cost", counting)
    monkeypatch.setattr("trajalign.backends.hf._STEP_COSTS", {})
    first, copy, deeper = lively_handle(), lively_handle(), tiny_handle(num_layers=3)
    with torch.no_grad():  # the copy's weights differ, as a fine-tuned model's do
        next(copy.model.parameters()).add_(0.01)
    for handle in (first, copy, deeper):
        requests = depth_sweep(handle, max_new_tokens=6)
        results = {r.key: r for batch in HFBackend(handle, batch_size=16, stop_ids=[]).generate(requests)
                   for r in batch}
        for request in requests:
            assert results[request.key].continuation_ids == reference_generate(handle, request.context, 6)
    assert measured == [first.model, deeper.model]
