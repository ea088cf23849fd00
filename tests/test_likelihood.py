import json

import numpy as np
import pytest
import torch

from trajalign.data.datasets import Behavior
from trajalign.helpfulness import PMIJudge, prompt_answer_pmi
from trajalign.judges import JudgeInput, make_judge
from trajalign.likelihood import token_budget_batches
from trajalign.testing import save_tiny_model, tiny_handle
from trajalign.utility import UtilityConfig, compare, reference_nll, run_utility

BEHAVIORS = [
    Behavior(id="a", prompt="Explain how photosynthesis works.", reference="Plants turn light into sugar.",
             dataset="toy"),
    Behavior(id="b", prompt="Hi", reference="Sure, here is a short answer to your question about the weather in "
             "spring, step by step.", dataset="toy"),
    Behavior(id="c", prompt="Write a poem about the sea and the sky in spring, please, in four short lines.",
             reference="The sea.", dataset="toy"),
    Behavior(id="d", prompt="What is 0123456789?", reference="0123456789", dataset="toy"),
]


def unbatched_answer_log_probs(handle, context: list[int], answer: list[int]) -> np.ndarray:
    """One unpadded pass over context + answer; manual float64 log-softmax of the positions before each answer
    token."""
    with torch.no_grad():
        logits = handle.model(torch.tensor([context + answer])).logits[0].double()
    log_probs = logits - logits.logsumexp(-1, keepdim=True)
    return np.array([log_probs[len(context) - 1 + i, token].item() for i, token in enumerate(answer)])


def independent_nll(handle, behavior: Behavior) -> float:
    answer = handle.tokenizer(behavior.reference, add_special_tokens=False)["input_ids"]
    return -unbatched_answer_log_probs(handle, handle.chat.prompt_ids(behavior.prompt), answer).mean()


@pytest.mark.parametrize("max_batch_tokens", [4096, 60, 1])  # one padded batch; pairs; one sequence per pass
def test_nll_equals_independent_unbatched_pass(tiny, max_batch_tokens):
    lengths = [len(tiny.chat.prompt_ids(b.prompt)) + len(tiny.tokenizer(b.reference)["input_ids"])
               for b in BEHAVIORS]
    assert len(set(lengths)) == len(lengths)  # rows of different lengths: a shared batch is padded
    rows = reference_nll(tiny, BEHAVIORS, max_batch_tokens=max_batch_tokens)
    assert [row["id"] for row in rows] == [b.id for b in BEHAVIORS]
    for behavior, row in zip(BEHAVIORS, rows):
        assert row["nll"] == pytest.approx(independent_nll(tiny, behavior), abs=1e-5)
        assert row["tokens"] == len(tiny.tokenizer(behavior.reference, add_special_tokens=False)["input_ids"])


def test_token_budget_batches_cover_every_index_once():
    lengths = [5, 50, 7, 30, 30, 2]
    batches = token_budget_batches(lengths, 64)
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    assert all(len(batch) * max(lengths[i] for i in batch) <= 64 or len(batch) == 1 for batch in batches)


def test_relative_change_and_paired_interval():
    reference = [{"nll": value} for value in (1.0, 2.0, 3.0, 4.0)]
    scaled = [{"nll": 1.1 * row["nll"]} for row in reference]
    result = compare(scaled, reference, resamples=200)
    assert result["relative_change_pct"] == pytest.approx(10.0)
    assert result["change"] == pytest.approx(0.25)
    low, high = result["relative_change_pct_ci95"]  # every paired resample moves by exactly 10%
    assert low == pytest.approx(10.0) and high == pytest.approx(10.0)
    shuffled = [{"nll": value} for value in (4.4, 1.1, 3.3, 2.2)]  # same mean, pairs broken: the interval widens
    low, high = compare(shuffled, reference, resamples=200)["relative_change_pct_ci95"]
    assert low < 10.0 < high


def test_run_utility_against_a_reference_model(tmp_path):
    first, second = tiny_handle(seed=0), tiny_handle(seed=1)
    dataset = tmp_path / "toy.jsonl"
    dataset.write_text("".join(json.dumps(b.model_dump(include={"id", "prompt", "reference"})) + "\n"
                               for b in BEHAVIORS))
    config = UtilityConfig(model="first", reference_model="second", dataset=str(dataset), out=tmp_path / "u.json",
                           resamples=100)
    result = run_utility(config, handle=first, reference_handle=second)
    ours = [independent_nll(first, b) for b in BEHAVIORS]
    theirs = [independent_nll(second, b) for b in BEHAVIORS]
    assert result["mean_nll"] == pytest.approx(np.mean(ours), abs=1e-5)
    assert result["relative_change_pct"] == pytest.approx(100 * (np.mean(ours) / np.mean(theirs) - 1), abs=1e-3)
    low, high = result["relative_change_pct_ci95"]
    assert low <= result["relative_change_pct"] <= high
    assert json.loads((tmp_path / "u.json").read_text())["examples"][1]["reference_nll"] == pytest.approx(
        theirs[1], abs=1e-5)


def test_cli_utility(cli, tmp_path):
    save_tiny_model(tmp_path / "a", seed=0)
    save_tiny_model(tmp_path / "b", seed=1)
    dataset = tmp_path / "toy.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": b.prompt, "reference": b.reference}) + "\n" for b in BEHAVIORS))
    code, out, err = cli("utility", "--model", tmp_path / "a", "--reference-model", tmp_path / "b", "--dataset",
                         dataset, "--limit", "3", "--out", tmp_path / "utility.json")
    assert code == 0, err
    result = json.loads((tmp_path / "utility.json").read_text())
    assert result["n"] == 3 and "relative_change_pct" in result
    assert "NLL" in out


def test_cli_utility_needs_references(cli, tmp_path):
    save_tiny_model(tmp_path / "a")
    dataset = tmp_path / "noref.jsonl"
    dataset.write_text(json.dumps({"prompt": "Hi", "id": "x1"}) + "\n")
    code, _, err = cli("utility", "--model", tmp_path / "a", "--dataset", dataset, "--out", tmp_path / "u.json")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "noref.jsonl" in last and "behavior 'x1' field 'reference'" in last


PMI_ITEMS = [
    JudgeInput("Explain how photosynthesis works in plants.", "", "Plants turn light into sugar, step by step."),
    JudgeInput("Write a poem about the sea.", "Sure, here is ", "a short answer about the sea and the sky."),
    JudgeInput("Hi", "", "I'm sorry, but I cannot help with that request."),
    JudgeInput("Hi", "", ""),
]


def test_pmi_equals_independent_computation(tiny):
    neutral = "Say anything."
    scores = prompt_answer_pmi(tiny, PMI_ITEMS, neutral_prompt=neutral, max_batch_tokens=50)
    for item, score in zip(PMI_ITEMS, scores):
        answer = tiny.tokenizer(item.continuation_text, add_special_tokens=False)["input_ids"]
        if not answer:
            assert score is None
            continue
        prefix = tiny.tokenizer(item.prefix_text, add_special_tokens=False)["input_ids"] if item.prefix_text else []
        given_prompt = unbatched_answer_log_probs(tiny, tiny.chat.prompt_ids(item.prompt) + prefix, answer)
        given_neutral = unbatched_answer_log_probs(tiny, tiny.chat.prompt_ids(neutral) + prefix, answer)
        assert score == pytest.approx((given_prompt.sum() - given_neutral.sum()) / len(answer), abs=1e-5)


def test_pmi_verdict_follows_threshold(tiny):
    score = prompt_answer_pmi(tiny, PMI_ITEMS[:1])[0]
    below = PMIJudge(handle=tiny, threshold=score - 1e-3).judge(PMI_ITEMS)
    above = PMIJudge(handle=tiny, threshold=score + 1e-3).judge(PMI_ITEMS)
    assert below[0].attempts_task is True and above[0].attempts_task is False
    assert below[0].attempts_task_score == pytest.approx(score)
    assert below[2].refused_continuation and below[2].attempts_task is False  # a refusal never attempts the task
    assert below[3].attempts_task is False and below[3].attempts_task_score is None  # nothing written
    judge = make_judge("pmi", handle=tiny, threshold=-100.0)
    assert judge.name == "pmi" and judge.judge(PMI_ITEMS[:1])[0].attempts_task is True
