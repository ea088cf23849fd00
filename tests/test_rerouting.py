import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from trajalign.probe.hooks import decoder_blocks, record_block_inputs
from trajalign.testing import save_tiny_model, tiny_handle
from trajalign.train.recipes import IGNORE, RecipeConfig
from trajalign.train.rerouting import Rerouting, default_layers, rerouting_loss, retain_loss, schedule
from trajalign.train.trainer import TrainConfig, collate, run_training

TRAJECTORY = list(range(300, 320))


def fake_trainer(step: int, total_steps: int):
    return SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda model: model),
                           state=SimpleNamespace(global_step=step, max_steps=total_steps),
                           current_gradient_accumulation_steps=1)


def test_cosine_term_equals_a_hand_computation():
    adapted = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # [layers 1, batch 1, seq 3, hidden 2]
    original = torch.tensor([[[[1.0, 1.0], [0.0, -1.0], [2.0, 2.0]]]])
    # cosines 1/sqrt(2), -1 (ReLU: 0) and 1
    assert rerouting_loss(adapted, original, torch.tensor([[True, True, False]])).item() == pytest.approx(
        (1 / math.sqrt(2) + 0) / 2)
    assert rerouting_loss(adapted, original, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(
        (1 / math.sqrt(2) + 0 + 1) / 3)
    assert retain_loss(adapted, original, torch.tensor([[True, True, True]])).item() == pytest.approx(
        (1 + 2 + math.sqrt(2)) / 3)


def test_weights_shift_from_rerouting_to_retain():
    assert schedule(0, 100, 10.0) == (10.0, 0.0)
    assert schedule(50, 100, 10.0) == pytest.approx((7.5, 2.5))
    assert schedule(100, 100, 10.0) == pytest.approx((5.0, 5.0))


def test_rerouting_only_holds_the_retain_weight_at_zero_over_the_first_share_of_steps():
    assert schedule(24, 100, 10.0, rerouting_only=0.25) == pytest.approx((8.8, 0.0))
    assert schedule(25, 100, 10.0, rerouting_only=0.25) == pytest.approx((8.75, 1.25))


def test_default_layers_scale_the_papers_blocks():
    assert default_layers(32) == [9, 19]  # hidden states 10 and 20 of Llama-3-8B
    assert default_layers(30) == [8, 18]
    assert default_layers(4) == [0, 1]


def prepared(layers=(1,)):
    handle = tiny_handle(num_layers=4)
    original = copy.deepcopy(handle.model)
    objective = Rerouting()
    recipe = RecipeConfig(name="circuit-breaker", benign_ratio=1.0, rerouting={"layers": list(layers)})
    config = objective.configure(TrainConfig(model="tiny", recipe=recipe))
    rows = objective.build_rows(recipe, handle.chat, [("h0", "Explain photosynthesis", TRAJECTORY)],
                                [("b0", "Write a poem", [300, 301, 302], True)])
    objective.prepare_model(handle, config)
    options = {"r": config.lora.r, "lora_alpha": config.lora.alpha, "target_modules": config.lora.target_modules}
    model = get_peft_model(handle.model, LoraConfig(**{**options, **objective.lora_options(handle.model)}))
    dicts = [{"input_ids": row.input_ids, "labels": row.labels, **objective.row_columns(row)} for row in rows]
    batch = {**collate(dicts, handle.tokenizer.pad_token_id), **objective.batch_columns(dicts)}
    return objective, model, original, rows, batch


def test_rows_reroute_the_trajectory_and_retain_the_anchors():
    _, _, _, rows, _ = prepared()
    reroute = next(row for row in rows if row.kind == "reroute")
    assert reroute.input_ids[-len(TRAJECTORY):] == TRAJECTORY
    assert [label for label in reroute.labels if label != IGNORE] == TRAJECTORY
    assert {row.kind for row in rows} == {"reroute", "anchor"}


def test_lora_covers_the_blocks_up_to_the_deepest_rerouted_one():
    objective, model, _, _, _ = prepared(layers=(1,))
    adapted = {int(name.split(".layers.")[1].split(".")[0]) for name, _ in model.named_parameters() if "lora_" in name}
    assert objective.adapted == [0, 1] and adapted == {0, 1}


def states_by_hand(model, rows) -> list[torch.Tensor]:
    """Per row, [2, seq, hidden]: the residual stream leaving blocks 0 and 1 (entering 1 and 2), unpadded."""
    states = []
    for row in rows:
        with record_block_inputs(model, [1, 2]) as captured, torch.no_grad():
            model(torch.tensor([row.input_ids]))
        states.append(torch.stack([captured[1][0], captured[2][0]]))
    return states


def test_loss_matches_a_hand_computation_and_the_frozen_path_gets_no_gradient():
    objective, model, original, rows, batch = prepared(layers=(1,))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)  # move the adapted model away from the original
    with torch.no_grad(), model.disable_adapter():
        frozen = objective.block_states(model, model, batch)
    assert not frozen.requires_grad
    loss = objective.compute_loss(fake_trainer(3, 10), model, batch)
    loss.backward()
    assert all(parameter.grad is None for name, parameter in model.named_parameters() if "lora_" not in name)
    assert all(parameter.grad.abs().sum() > 0 for name, parameter in model.named_parameters() if "lora_" in name)

    base = states_by_hand(original, rows)
    with model.disable_adapter():
        again = states_by_hand(model, rows)
    adapted = states_by_hand(model, rows)
    for row, (base_row, again_row) in enumerate(zip(base, again)):
        torch.testing.assert_close(again_row, base_row)  # the disabled adapter is the original model
        torch.testing.assert_close(frozen[:, row, :base_row.shape[1]], base_row, atol=1e-5, rtol=1e-4)
    reroute, anchor = (next(i for i, row in enumerate(rows) if row.kind == kind) for kind in ("reroute", "anchor"))
    start = len(rows[reroute].input_ids) - len(TRAJECTORY)
    cosines = [max(0.0, torch.cosine_similarity(adapted[reroute][1, t], base[reroute][1, t], dim=0).item())
               for t in range(start, len(rows[reroute].input_ids))]
    distances = [(adapted[anchor][layer, t] - base[anchor][layer, t]).norm().item()
                 for layer in (0, 1) for t in range(len(rows[anchor].input_ids))]
    rerouting_weight, retain_weight = 10 * (1 - 3 / 20), 10 * 3 / 20
    expected = rerouting_weight * sum(cosines) / len(cosines) + retain_weight * sum(distances) / len(distances)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_forward_stops_after_the_deepest_rerouted_block():
    objective, model, _, _, batch = prepared(layers=(1,))
    calls = []
    decoder_blocks(model)[2].register_forward_hook(lambda *args: calls.append(1))
    objective.block_states(model, model, batch)
    assert calls == [] and model.config.num_hidden_layers == 4


def circuit_breaker_config(tmp_path, behaviors: int, **sizes) -> TrainConfig:
    """A circuit breaker of a saved 4-block tiny model, on `behaviors` harmful and as many benign rows."""
    save_tiny_model(tmp_path / "base", num_layers=4)
    return TrainConfig(model=str(tmp_path / "base"), recipe=RecipeConfig(name="circuit-breaker", benign_ratio=1.0),
                       harmful_limit=behaviors, benign=["jbb-benign"], benign_limit=behaviors, trajectories="target",
                       learning_rate=3e-3, out=tmp_path / "model", **sizes)


def test_circuit_breaker_trains_saves_and_loads(tmp_path):
    from trajalign.models import load_model

    config = circuit_breaker_config(tmp_path, 6, trajectory_tokens=12, anchor_tokens=8, batch_size=12, epochs=3)
    run_training(config)
    log = [entry for entry in json.loads((config.out / "training_log.json").read_text()) if "loss" in entry]
    # At step 0 the adapter is zero: the cosine is 1 at every rerouted token and the retain weight is 0.
    assert len(log) == 3 and log[0]["loss"] == pytest.approx(10.0, rel=1e-5)
    trained, base = load_file(config.out / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    changed = {int(name.split(".layers.")[1].split(".")[0]) for name in base
               if ".layers." in name and not torch.equal(trained[name], base[name])}
    assert changed == {0, 1}  # the adapter covers blocks 0..1 (rerouted: 0 and 1), merged on save
    assert load_model(str(config.out)).model is not None


def test_circuit_breaker_batches_mix_harmful_and_retained_rows(tmp_path, monkeypatch):
    kinds_per_step = []
    compute_loss = Rerouting.compute_loss

    def recording(self, trainer, model, inputs, *args, **kwargs):
        kinds_per_step.append(set(inputs["rerouted"].tolist()))
        return compute_loss(self, trainer, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Rerouting, "compute_loss", recording)
    run_training(circuit_breaker_config(tmp_path, 32, trajectory_tokens=24, anchor_tokens=4, batch_size=4, epochs=1))
    # Rows grouped by length (anchors 40-91 tokens, rerouted rows 63-134) mix in 6 of these 16 batches
    assert len(kinds_per_step) == 16 and sum(kinds == {0, 1} for kinds in kinds_per_step) >= 12
