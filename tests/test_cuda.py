"""The engine, training, evaluation and probes on a CUDA device; skipped without one (CI has none).

What can differ there is where tensors live (KV caches, masks, positions, sampling generators, hooks' vectors),
mixed precision, and `device: auto`, which picks the GPU. Run on a GPU machine with `pytest tests/test_cuda.py`;
TRAJALIGN_TEST_DEVICE names another device (`cpu` checks the tests themselves anywhere).
"""

import json
import os

import pytest
import torch
from test_hf_backend import depth_sweep, lively_handle

from trajalign.attacks import Insert, Prefill
from trajalign.backends.base import GenerationRequest, Sampling
from trajalign.backends.hf import HFBackend
from trajalign.data.datasets import load_behaviors
from trajalign.evaluate import EvalConfig, Evaluation
from trajalign.models import load_model
from trajalign.probe.direction import select_direction, steering_effect
from trajalign.probe.hooks import ablate_direction
from trajalign.runs import EpisodeLog
from trajalign.testing import save_tiny_model, tiny_handle
from trajalign.train.recipes import RecipeConfig
from trajalign.train.trainer import TrainConfig, run_training

DEVICE = os.environ.get("TRAJALIGN_TEST_DEVICE", "cuda")
DEVICE_TYPE = torch.device(DEVICE).type
pytestmark = pytest.mark.skipif(DEVICE_TYPE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


def on_device(handle):
    handle.model.to(DEVICE)
    return handle


def generated(handle, requests, **options) -> dict[str, list[int]]:
    backend = HFBackend(handle, batch_size=16, stop_ids=[], **options)
    return {result.key: result.continuation_ids for batch in backend.generate(requests) for result in batch}


@pytest.mark.skipif(DEVICE_TYPE != "cuda", reason="device: auto picks CUDA, when there is one")
def test_auto_picks_the_gpu(tmp_path):
    save_tiny_model(tmp_path / "model")
    assert load_model(str(tmp_path / "model")).device.type == "cuda"


def test_greedy_generation_on_cuda_equals_generate_there_and_on_the_cpu():
    handle = on_device(lively_handle())
    requests = depth_sweep(handle, max_new_tokens=10)
    continuations = generated(handle, requests)
    for request in requests:
        context = torch.tensor([request.context], device=DEVICE)
        reference = handle.model.generate(context, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                          pad_token_id=0)[0, len(request.context):].tolist()
        assert continuations[request.key] == reference, request.key
    assert generated(lively_handle(), requests) == continuations


def test_sampling_on_cuda_is_seeded_and_independent_of_the_batch():
    handle = on_device(lively_handle())
    prompt = handle.chat.prompt_ids("Hello there")
    sampled = GenerationRequest("sampled", prompt, len(prompt), max_new_tokens=12,
                                sampling=Sampling(temperature=1.0, top_p=0.9, top_k=50, seed=7))
    alone = generated(handle, [sampled])["sampled"]
    beside_others = generated(handle, [sampled, *depth_sweep(handle, max_new_tokens=8)])["sampled"]
    assert alone == beside_others and len(alone) == 12


def test_a_logit_bias_on_cuda_steers_every_greedy_step():
    handle = on_device(lively_handle())
    requests = depth_sweep(handle, max_new_tokens=6)
    free = generated(handle, requests)
    banned = {tokens[0] for tokens in free.values()}
    biased = generated(handle, requests, logit_bias={token: -100.0 for token in banned})
    assert all(tokens[0] not in banned for tokens in biased.values())


# LoRA on a tiny random model moves its loss little (6.0 to 5.86 in 16 steps on the CPU), full training a lot.
@pytest.mark.parametrize("dtype,lora,drop", [("float32", None, 0.3), ("bfloat16", None, 0.3),
                                             ("bfloat16", {"r": 4, "alpha": 8}, 0.015)])
def test_training_on_cuda_lowers_the_loss_and_saves_a_model_that_loads(tmp_path, dtype, lora, drop):
    save_tiny_model(tmp_path / "base", seed=3)
    config = TrainConfig(model=str(tmp_path / "base"), device=DEVICE, dtype=dtype,
                         recipe=RecipeConfig(name="refusal-sft", benign_ratio=0.0),
                         harmful=["advbench"], harmful_limit=32, trajectories="target", epochs=4,
                         learning_rate=1e-2 if lora is None else 1e-1, lora=lora, freeze_embeddings=False,
                         batch_size=8, micro_batch_size=8, save_steps=10_000, out=tmp_path / "trained")
    handle = config.load_model()
    assert handle.device.type == DEVICE_TYPE
    run_training(config, handle=handle, harmful=load_behaviors("advbench", limit=32))
    losses = [entry["loss"] for entry in json.loads((config.out / "training_log.json").read_text())
              if "loss" in entry]
    assert sum(losses[-4:]) < (1 - drop) * sum(losses[:4]), losses
    trained = load_model(str(config.out), device=DEVICE)
    prompt = torch.tensor([trained.chat.prompt_ids("Explain photosynthesis")], device=DEVICE)
    assert torch.isfinite(trained.model(prompt).logits).all()


def test_an_evaluation_on_cuda_gives_the_episodes_it_gives_on_the_cpu(tmp_path):
    save_tiny_model(tmp_path / "model", seed=2)

    def episodes(device: str, attack, name: str) -> list[tuple]:
        config = EvalConfig(model=str(tmp_path / "model"), device=device, dataset="advbench", limit=4,
                            trajectories="target", attack=attack, max_new_tokens=8, batch_size=8,
                            out=tmp_path / f"{name}-{device}")
        Evaluation(config).run()
        return [(e.episode_id, e.context_ids, e.continuation_ids, e.refused) for e in EpisodeLog(config.out).load()]

    for name, attack in {"prefill": Prefill(depths=[0, 3, 6]), "insert": Insert(after=[2], span_lengths=[3])}.items():
        assert episodes(DEVICE, attack, name) == episodes("cpu", attack, name)


def test_the_refusal_direction_its_ablation_and_steering_on_device():
    handle = on_device(tiny_handle(num_layers=5))
    harmful = [behavior.prompt for behavior in load_behaviors("advbench", limit=4)]
    harmless = [behavior.prompt for behavior in load_behaviors("jbb-benign", limit=4)]
    direction = select_direction(handle, harmful, harmless, batch_size=4, positions=[-1])
    assert direction.layer in (1, 2, 3) and torch.isfinite(direction.direction).all()
    prompt = torch.tensor([handle.chat.prompt_ids(harmful[0])], device=DEVICE)
    with ablate_direction(handle.model, direction.direction):
        ablated = handle.model(prompt).logits
    assert not torch.equal(ablated, handle.model(prompt).logits)
    rates = steering_effect(handle, direction, harmful, harmless, new_tokens=6, batch_size=4)
    assert set(rates) == {"harmful_refusal", "harmless_refusal", "harmful_refusal_ablated", "harmless_refusal_added"}
