import random

import numpy as np
import pytest
import torch

from trajalign.attacks import Prefill, PrefillPosition
from trajalign.data.datasets import load_behaviors
from trajalign.probe.direction import (
    RefusalDirection,
    mean_activations,
    refusal_opening_ids,
    select_direction,
)
from trajalign.probe.hooks import add_vector, decoder_blocks, record_block_inputs
from trajalign.probe.predictivity import predictivity
from trajalign.probe.trajectory import probe_trajectories
from trajalign.records import Episode
from trajalign.testing import tiny_handle

HARMFUL = [b.prompt for b in load_behaviors("advbench", limit=6)]
HARMLESS = [b.prompt for b in load_behaviors("jbb-benign", limit=5)]


def test_diff_in_means_equals_independent_numpy(tiny):
    positions = len(tiny.chat.post_instruction_ids)

    def numpy_means(prompts):
        rows = []
        for prompt in prompts:  # one unpadded pass per prompt, read off output_hidden_states
            ids = torch.tensor([tiny.chat.prompt_ids(prompt)])
            with torch.no_grad():
                states = tiny.model(ids, output_hidden_states=True).hidden_states
            rows.append(np.stack([state[0, -positions:].numpy().astype(np.float64)
                                  for state in states[:len(decoder_blocks(tiny.model))]]))
        return np.mean(rows, axis=0)

    ours = (mean_activations(tiny, HARMFUL, batch_size=4) - mean_activations(tiny, HARMLESS, batch_size=3)).numpy()
    np.testing.assert_allclose(ours, numpy_means(HARMFUL) - numpy_means(HARMLESS), atol=1e-5)


def test_planted_direction_is_recovered(tiny):
    planted = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 20
    harmless = mean_activations(tiny, HARMLESS)
    with add_vector(tiny.model, planted, layer=1):
        harmful = mean_activations(tiny, HARMFUL)
    found = (harmful - harmless)[1, -1].float()
    cosine = torch.nn.functional.cosine_similarity(found, planted, dim=0).item()
    assert cosine > 0.99


def test_record_is_padding_safe(tiny):
    short, long = tiny.chat.prompt_ids("Hi"), tiny.chat.prompt_ids("Write a poem about the sea and the sky")
    from trajalign.batching import pad_right

    input_ids, mask = pad_right([short, long], tiny.tokenizer.pad_token_id, "cpu")
    with record_block_inputs(tiny.model, [1]) as batched, torch.no_grad():
        tiny.model(input_ids=input_ids, attention_mask=mask)
    with record_block_inputs(tiny.model, [1]) as alone, torch.no_grad():
        tiny.model(input_ids=torch.tensor([short]))
    torch.testing.assert_close(batched[1][0, :len(short)], alone[1][0], atol=1e-5, rtol=1e-4)


def test_select_direction_and_save_roundtrip(tmp_path):
    deeper = tiny_handle(num_layers=5)
    direction = select_direction(deeper, HARMFUL, HARMLESS, batch_size=4, positions=[-1])
    candidates = direction.metadata["candidates"]
    assert [c["layer"] for c in candidates] == [1, 2, 3]  # layer 0 (embeddings) has no direction; 4 is pruned
    assert direction.layer in (1, 2, 3) and direction.direction.norm() > 0
    direction.save(tmp_path / "dir")
    loaded = RefusalDirection.load(tmp_path / "dir")
    torch.testing.assert_close(loaded.direction, direction.direction)
    assert loaded.layer == direction.layer


def test_one_pass_probe_matches_per_depth_passes(tiny):
    prompt = tiny.chat.prompt_ids(HARMFUL[0])
    trajectory = tiny.chat.encode_span("Sure, here is a short answer")
    openings = refusal_opening_ids(tiny.chat)
    direction = torch.randn(64)
    readings = probe_trajectories(tiny, [("b", prompt, trajectory)], openings, direction, [1])
    assert [r.depth for r in readings] == list(range(len(trajectory) + 1))
    for reading in readings[::3]:
        context = torch.tensor([prompt + trajectory[:reading.depth]])
        with record_block_inputs(tiny.model, [1]) as captured, torch.no_grad():
            logits = tiny.model(context).logits[0, -1].double().log_softmax(-1)
        assert reading.onset_score == pytest.approx(logits[openings].logsumexp(-1).item(), abs=1e-5)
        expected = captured[1][0, -1].double() @ (direction / direction.norm()).double()
        assert reading.projections[1] == pytest.approx(expected.item(), abs=1e-4)


def test_predictivity_joins_by_behavior_and_depth():
    from trajalign.probe.trajectory import DepthReading

    readings, episodes = [], []
    for index in range(20):
        recovered = index % 2 == 0
        readings.append(DepthReading(behavior_id=f"b{index}", depth=5, onset_score=float(recovered) + index * 0.01,
                                     projections={3: -float(index)}))
        episodes.append(Episode(episode_id=str(index), model="m", behavior_id=f"b{index}", dataset="d", prompt="p",
                                attack=Prefill(depths=[5]), position=PrefillPosition(depth=5), depth=5, context_ids=[1],
                                answer_start=0, continuation_ids=[], continuation_text="", finish_reason="eos",
                                exact_ids=True, refused=recovered))
    rows = {(r["group"], r["score"]): r for r in predictivity(readings, episodes, resamples=100)}
    shuffled = random.Random(0).sample(episodes, len(episodes))
    assert predictivity(readings, shuffled, resamples=100) == list(rows.values())  # log order is not data
    assert rows[("depth=5", "onset_score")]["auroc"] == 1.0
    assert rows[("pooled", "projection_L3")]["n"] == 20
    assert 0.3 < rows[("pooled", "projection_L3")]["auroc"] < 0.7


def test_blocks_found_in_gpt2_and_through_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    assert decoder_blocks(gpt2) is gpt2.transformer.h
    with record_block_inputs(gpt2, [2]) as captured, torch.no_grad():
        gpt2(torch.tensor([[1, 2, 3]]))
    assert captured[2].shape == (1, 3, 32)
    handle = tiny_handle()
    wrapped = get_peft_model(handle.model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_blocks(wrapped) is handle.model.model.layers


def test_kl_against_itself_is_zero(tiny):
    prompt = tiny.chat.prompt_ids(HARMFUL[1])
    trajectory = tiny.chat.encode_span("Sure, here is")
    readings = probe_trajectories(tiny, [("b", prompt, trajectory)], refusal_opening_ids(tiny.chat),
                                  reference=tiny)
    assert all(abs(r.kl_to_reference) < 1e-9 for r in readings)


def synthetic_depth_data(recovered_per_depth: dict[int, int], genuine: bool, per_depth: int = 20):
    """Readings and episodes where the score falls with depth and recovery grows rarer with depth. Within a depth
    the recovered and the not-recovered scores are the same multiset (AUROC exactly 0.5), unless `genuine`, where
    recovered episodes score 5 higher than any not-recovered one at their depth (AUROC 1)."""
    from trajalign.probe.trajectory import DepthReading

    readings, episodes = [], []
    for depth, recovered_count in recovered_per_depth.items():
        for index in range(per_depth):
            recovered = index < recovered_count
            rank = index if recovered else index - recovered_count
            score = -10.0 * depth + rank % 4 + (5.0 if genuine and recovered else 0.0)
            behavior = f"b{index}"
            readings.append(DepthReading(behavior_id=behavior, depth=depth, onset_score=score,
                                         projections={1: score}, reference_projections={2: 2 * score}))
            episodes.append(Episode(episode_id=f"{depth}-{index}", model="m", behavior_id=behavior, dataset="d",
                                    prompt="p", attack=Prefill(depths=[depth]),
                                    position=PrefillPosition(depth=depth), depth=depth, context_ids=[1],
                                    answer_start=0, continuation_ids=[], continuation_text="", finish_reason="eos",
                                    exact_ids=True, refused=recovered))
    return readings, episodes


def test_within_depth_auroc_sees_through_the_depth_confound():
    from trajalign.probe.predictivity import within_depth_summary

    counts = {0: 18, 1: 16, 2: 12, 3: 8, 4: 4, 5: 1}  # depth 5: one recovery, too few to enter
    readings, episodes = synthetic_depth_data(counts, genuine=False)
    summary = {row["score"]: row for row in within_depth_summary(readings, episodes, resamples=200)}
    projection = summary["projection_L1"]
    assert projection["depths_entered"] == [1, 2, 3, 4] and projection["n_entered"] == 80
    assert projection["mean_within_depth_auroc"] == pytest.approx(0.5)
    assert projection["pooled_depth_ge1_auroc"] > 0.75  # pooled, depth alone makes the score look predictive
    assert projection["pooled_depth_ge1_n"] == 100 and projection["depth0_n"] == 20
    low, high = projection["mean_within_depth_auroc_ci95"]
    assert low < 0.5 < high
    assert "reference_projection_L2" in summary

    readings, episodes = synthetic_depth_data(counts, genuine=True)
    projection = {row["score"]: row for row in within_depth_summary(readings, episodes, resamples=200)}[
        "projection_L1"]
    assert projection["mean_within_depth_auroc"] == pytest.approx(1.0)
    assert projection["mean_within_depth_auroc_ci95"][0] == pytest.approx(1.0)  # separable in every resample


def test_pooled_predictivity_leaves_depth_zero_apart():
    readings, episodes = synthetic_depth_data({0: 18, 1: 16, 2: 12}, genuine=False)
    rows = {(r["group"], r["score"]): r for r in predictivity(readings, episodes, resamples=50)}
    assert rows[("pooled", "onset_score")]["depths"] == [1, 2] and rows[("pooled", "onset_score")]["n"] == 40
    assert rows[("depth=0", "onset_score")]["n"] == 20


def test_depth_profile_means_and_recovery_rates():
    from trajalign.probe.predictivity import depth_profile

    readings, episodes = synthetic_depth_data({1: 16, 2: 12}, genuine=False)
    rows = depth_profile(readings, episodes, layer=1, shared_layer=2)
    assert [(row["depth"], row["n"], row["recovered"]) for row in rows] == [(1, 20, 16), (2, 20, 12)]
    at_one = [r.projections[1] for r in readings if r.depth == 1]
    assert rows[0]["mean_projection"] == pytest.approx(np.mean(at_one))
    assert rows[0]["mean_shared_projection"] == pytest.approx(2 * np.mean(at_one))
    assert rows[1]["recovery_rate"] == pytest.approx(0.6)
    assert depth_profile(readings, episodes, layer=1)[0]["mean_shared_projection"] is None


def test_projections_on_a_reference_direction(tiny):
    prompt = tiny.chat.prompt_ids(HARMFUL[0])
    trajectory = tiny.chat.encode_span("Sure, here is a short answer")
    own, shared = torch.randn(64), torch.randn(64)
    readings = probe_trajectories(tiny, [("b", prompt, trajectory)], refusal_opening_ids(tiny.chat), own, [1],
                                  reference_direction=shared, reference_layers=[0])
    for reading in readings[::4]:
        with record_block_inputs(tiny.model, [0]) as captured, torch.no_grad():
            tiny.model(torch.tensor([prompt + trajectory[:reading.depth]]))
        expected = captured[0][0, -1].double() @ (shared / shared.norm()).double()
        assert reading.reference_projections[0] == pytest.approx(expected.item(), abs=1e-4)
        assert set(reading.projections) == {1}


def test_probe_with_a_reference_direction_of_another_size_fails(tiny, tmp_path):
    from trajalign.data.trajectories import Trajectory
    from trajalign.errors import InputError
    from trajalign.probe.run import ProbeConfig, run_probe

    RefusalDirection(torch.randn(64), 1, -1, torch.randn(2, 1, 64)).save(tmp_path / "own")
    RefusalDirection(torch.randn(32), 1, -1, torch.randn(2, 1, 32)).save(tmp_path / "other")
    behaviors = load_behaviors("advbench", limit=2)
    trajectories = {b.id: Trajectory(behavior_id=b.id, source="t", token_ids=tiny.chat.encode_span("Sure, here is"))
                    for b in behaviors}
    config = ProbeConfig(direction=tmp_path / "own", reference_direction=tmp_path / "other", out=tmp_path / "probe")
    with pytest.raises(InputError, match="other: a direction of size 32"):
        run_probe(config, handle=tiny, behaviors=behaviors, trajectories=trajectories)
    config = ProbeConfig(direction=tmp_path / "own", reference_direction=tmp_path / "own", out=tmp_path / "probe2")
    results = run_probe(config, handle=tiny, behaviors=behaviors, trajectories=trajectories)
    assert results["reference_direction"]["layer"] == 1
    from trajalign.probe.run import load_readings

    readings = load_readings(tmp_path / "probe2")
    assert all(r.reference_projections[1] == pytest.approx(r.projections[1]) for r in readings)
