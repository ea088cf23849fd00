"""Drafters propose, the engine verifies: the lookup drafter, its cost model, and drafts that cannot change output."""

import pytest
import torch
from test_hf_backend import lively_handle, reference_generate

from trajalign.backends.base import GenerationRequest
from trajalign.backends.drafting import (
    DraftRecord,
    DraftSlot,
    LookupDrafter,
    NoDrafter,
    accepted_length,
    fitted_draft_cost,
    lookup_draft,
    tokens_per_cost,
)
from trajalign.backends.hf import HFBackend


def test_lookup_copies_what_followed_the_last_ngram():
    trunk = [1, 2, 3, 4, 5, 6, 7, 8]
    assert lookup_draft([9, 2, 3, 4], [trunk], budget=3) == [5, 6, 7]
    assert lookup_draft([9, 2, 3, 4], [trunk], budget=10) == [5, 6, 7, 8]
    assert lookup_draft([9, 9, 3, 4], [trunk], budget=3) == [5, 6, 7]  # the 2-gram when no 3-gram matches
    assert lookup_draft([9, 9, 9, 4], [trunk], budget=3) == []


def test_lookup_prefers_the_longest_then_the_best_placed_match():
    short, long = [7, 1, 2, 3, 40], [8, 1, 2, 3, 50, 51, 52]
    assert lookup_draft([0, 1, 2, 3], [short, long], budget=4) == [50, 51, 52]
    here, there = [6, 6, 1, 2, 3, 60, 61], [5, 5, 1, 2, 3, 70, 71]
    assert lookup_draft([5, 5, 1, 2, 3], [here, there], budget=2) == [70, 71]  # agrees on the tokens before


def test_accepted_length_stops_at_the_first_disagreement():
    assert accepted_length([4, 5, 6], [4, 5, 9, 9]) == 2
    assert accepted_length([4, 5, 6], [4, 5, 6, 7]) == 3
    assert accepted_length([], [1]) == 0


def test_draft_record_estimates_acceptance_from_run_lengths():
    record = DraftRecord()
    assert record.acceptance(prior=0.5) == 0.5
    record.add(draft_length=4, taken=4)
    record.add(draft_length=4, taken=1)
    assert (record.confirmed, record.broken) == (5, 1)
    assert record.acceptance(prior=0.5, weight=2.0) == pytest.approx((5 + 1) / (5 + 1 + 2))


def slot(room: int, record: DraftRecord | None = None, forced: int = 1) -> DraftSlot:
    return DraftSlot(sequence=[1, 2, 3], pool=[[1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17, 18]], room=room,
                     forced=forced, record=record or DraftRecord())


def test_lookup_drafter_cuts_drafts_to_the_length_that_pays():
    sure, hopeless = DraftRecord(confirmed=1000), DraftRecord(broken=1000)
    drafter = LookupDrafter(max_tokens=8, draft_cost=0.3)
    # a row that confirms every token: 9 tokens for a step costing 1 + 0.3 * 8.5 beats 1 token for 1
    assert drafter.propose([slot(20, sure)], DraftRecord()) == [[10, 11, 12, 13, 14, 15, 16, 17]]
    assert drafter.propose([slot(20, hopeless)], DraftRecord()) == [[]]  # drafts it never keeps cost for nothing
    assert drafter.propose([slot(3, sure)], DraftRecord()) == [[10, 11, 12]]  # no more than the row has room for
    assert drafter.propose([slot(0, sure), slot(20, sure)], DraftRecord())[0] == []  # a sampled row drafts nothing
    assert LookupDrafter(8, draft_cost=100.0).propose([slot(20, sure)], DraftRecord()) == [[]]


def test_cost_model_and_its_calibration():
    drafts, rates, forced = [[1, 2, 3, 4]], [1.0], [1]
    assert tokens_per_cost(0, drafts, rates, forced, 0.3) == 1.0
    assert tokens_per_cost(4, drafts, rates, forced, 0.3) == pytest.approx(5 / (1 + 0.3 * 4.5))
    assert fitted_draft_cost(1 + 0.3 * 8.5, extra=8) == pytest.approx(0.3)
    assert fitted_draft_cost(0.9, extra=8) == 0.0  # a wider step measured as cheaper (noise) costs nothing extra
    measured = LookupDrafter(max_tokens=8)
    measured.calibrate(lambda extra: 1 + 0.25 * (extra + 0.5))
    assert measured.draft_cost == pytest.approx(0.25)
    fixed = LookupDrafter(max_tokens=8, draft_cost=0.4)
    fixed.calibrate(lambda extra: pytest.fail("a given draft_cost is not measured"))
    assert fixed.draft_cost == 0.4
    assert NoDrafter().propose([slot(20), slot(5)], DraftRecord()) == [[], []]


class WrongDrafter:
    """Proposes tokens the model would not choose: the engine must reject them and lose nothing."""

    def __init__(self):
        self.proposed = 0

    def propose(self, slots, run_record):
        self.proposed += sum(s.room > 0 for s in slots)
        return [[(s.sequence[-1] + 1) % 50, 7, 7] if s.room > 0 else [] for s in slots]

    def calibrate(self, relative_step_cost):
        pass


def requests_for(handle):
    prompt = handle.chat.prompt_ids("Write a poem about the sea")
    own = reference_generate(handle, prompt, 20)
    return [GenerationRequest(f"d{depth}", prompt + own, len(prompt) + depth, max_new_tokens=12)
            for depth in (0, 5, 10)]


def test_any_drafter_leaves_greedy_output_unchanged():
    handle = lively_handle()
    requests = requests_for(handle)
    wrong = WrongDrafter()
    for backend in (HFBackend(handle, drafter=wrong, stop_ids=[]), HFBackend(handle, stop_ids=[])):
        results = {r.key: r.continuation_ids for batch in backend.generate(requests) for r in batch}
        for request in requests:
            assert results[request.key] == reference_generate(handle, request.context, 12), request.key
    assert wrong.proposed > 0


def test_draft_cost_is_measured_once_on_the_first_batch(monkeypatch):
    monkeypatch.setattr("trajalign.backends.hf._STEP_COSTS", {})  # nothing measured by earlier tests
    handle = lively_handle()
    backend = HFBackend(handle, stop_ids=[])
    assert backend.drafter.draft_cost is None
    calls = []
    hook = handle.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        list(backend.generate(requests_for(handle)))
        first_run = len(calls)
        measured = backend.drafter.draft_cost
        list(backend.generate(requests_for(handle)))
    finally:
        hook.remove()
    assert measured is not None and measured >= 0 and torch.isfinite(torch.tensor(measured))
    assert backend.drafter.draft_cost == measured
    assert first_run - (len(calls) - first_run) == 1 + 2 * 3  # only the first run measured: warm-up, 3 + 3 timed
