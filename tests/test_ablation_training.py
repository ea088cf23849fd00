import json
from types import SimpleNamespace

import pytest
import torch

from trajalign.data.datasets import load_behaviors
from trajalign.models import load_model
from trajalign.probe.hooks import ablate_directions_where, decoder_blocks, record_block_inputs
from trajalign.testing import labelled_cross_entropy, save_tiny_model, tiny_handle
from trajalign.train.ablation_training import RefusalAblation
from trajalign.train.recipes import RecipeConfig, TrainingRow
from trajalign.train.trainer import TrainConfig, collate, run_training

HARMFUL = [(b.id, b.prompt, list(range(300, 310))) for b in load_behaviors("advbench", limit=6)]
BENIGN = [(b.id, b.prompt, [300, 301], True) for b in load_behaviors("jbb-benign", limit=6)]


def prepared(**ablation):
    handle = tiny_handle(num_layers=4)
    objective = RefusalAblation()
    recipe = RecipeConfig(name="refusal-ablation", benign_ratio=0.5, ablation=ablation)
    rows = objective.build_rows(recipe, handle.chat, HARMFUL, BENIGN)
    objective.prepare_model(handle, TrainConfig(model="tiny", recipe=recipe))
    dicts = [{"input_ids": row.input_ids, "labels": row.labels, **objective.row_columns(row)} for row in rows]
    batch = {**collate(dicts, handle.tokenizer.pad_token_id), **objective.batch_columns(dicts)}
    return objective, handle, rows, batch


def test_direction_is_the_difference_in_means_at_the_last_prompt_token():
    objective, handle, _, _ = prepared(direction_prompts=100)

    def mean_last_token(prompts):
        states = []
        for prompt in prompts:
            with torch.no_grad():
                hidden = handle.model(torch.tensor([handle.chat.prompt_ids(prompt)]), output_hidden_states=True)
            states.append(torch.stack([hidden.hidden_states[layer][0, -1] for layer in range(4)]))
        return torch.stack(states).double().mean(0)

    expected = mean_last_token([p for _, p, _ in HARMFUL]) - mean_last_token([p for _, p, _, _ in BENIGN])
    torch.testing.assert_close(objective.current_directions(handle.model, 0).double(), expected, atol=1e-5,
                               rtol=1e-4)


def test_ablated_positions_are_orthogonal_to_the_direction_inside_the_forward_pass():
    objective, handle, rows, batch = prepared(probability=1.0, positions="random", position_probability=0.5)
    with record_block_inputs(handle.model) as clean, torch.no_grad():
        handle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # directions along the mean residual stream, so that un-ablated positions project away from zero
    objective.directions = torch.stack([clean[layer].mean(dim=(0, 1)) for layer in range(4)])
    seen = {}
    for layer, block in enumerate(decoder_blocks(handle.model)):  # a block's first module reads what entered it
        block.input_layernorm.register_forward_pre_hook(
            lambda module, args, layer=layer: seen.__setitem__(layer, args[0].detach()))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda model: model),
                              state=SimpleNamespace(global_step=0),
                              token_loss=lambda model, inputs, *rest: model(input_ids=inputs["input_ids"],
                                                                            attention_mask=inputs["attention_mask"]))
    masks, draw = [], objective.ablation_mask
    objective.ablation_mask = lambda inputs, step: masks.append(draw(inputs, step)) or masks[-1]
    objective.compute_loss(trainer, handle.model, batch)
    where = masks[0]
    real = batch["attention_mask"].bool()
    assert where.any() and (real & ~where).any()
    assert not where[~batch["harmful"].bool()].any(), "benign rows are never ablated"
    for layer in range(4):
        unit = objective.directions[layer] / objective.directions[layer].norm()
        cosine = (seen[layer] @ unit) / seen[layer].norm(dim=-1)
        assert cosine[where].abs().max() < 1e-5
        assert (cosine[real & ~where].abs() > 1e-3).float().mean() > 0.95
        benign = ~batch["harmful"].bool()
        torch.testing.assert_close(seen[layer][benign], clean[layer][benign])


def test_ablation_draws_follow_the_seed_and_step():
    objective, _, _, batch = prepared(probability=0.5)
    first = objective.ablation_mask(batch, 7)
    objective._draws = None
    assert torch.equal(objective.ablation_mask(batch, 7), first)
    rows_ablated = first.any(dim=1)
    assert torch.equal(first[rows_ablated], batch["attention_mask"].bool()[rows_ablated])  # positions "all"
    none, _, _, _ = prepared(probability=0.0)
    assert not none.ablation_mask(batch, 7).any()


def test_direction_refreshes_every_few_steps_and_a_resumed_run_reads_the_killed_runs(tmp_path):
    objective, handle, _, _ = prepared(refresh_steps=4)
    computed = []
    compute = objective.current_directions
    objective.current_directions = lambda model, step: computed.append(step) or compute(model, step)
    for step in range(10):
        objective.refresh(handle.model, step, tmp_path, is_main=True)
    assert computed == [0, 4, 8]
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"refusal-directions-{step}.safetensors"
                                                              for step in (0, 4, 8)]
    resumed, _, _, _ = prepared(refresh_steps=4)
    resumed.current_directions = lambda model, step: pytest.fail("a resumed run recomputed a saved direction")
    resumed.refresh(handle.model, 6, tmp_path, is_main=True)
    assert resumed.directions_step == 4
    objective.refresh(handle.model, 4, tmp_path, is_main=True)
    torch.testing.assert_close(resumed.directions, compute(handle.model, 4))


def test_refusal_ablation_trains_with_the_loss_it_says(tmp_path):
    save_tiny_model(tmp_path / "base", num_layers=4)
    recipe = RecipeConfig(name="refusal-ablation", benign_ratio=1.0,
                          ablation={"probability": 1.0, "direction_prompts": 100})
    config = TrainConfig(model=str(tmp_path / "base"), recipe=recipe, harmful_limit=6, benign=["jbb-benign"],
                         benign_limit=6, trajectories="target", trajectory_tokens=12, anchor_tokens=8, batch_size=12,
                         learning_rate=3e-3, epochs=2, out=tmp_path / "model")
    original = load_model(str(tmp_path / "base"))
    run_training(config, handle=load_model(str(tmp_path / "base")))
    rows = [TrainingRow(**json.loads(line)) for line in (config.out / "rows.jsonl").read_text().splitlines()]
    # By hand: every harmful row with the step-0 direction ablated at all its tokens, anchors as they are.
    objective = RefusalAblation()
    objective.build_rows(recipe, original.chat, [(b.id, b.prompt, []) for b in load_behaviors("advbench", limit=6)],
                         [(b.id, b.prompt, [], True) for b in load_behaviors("jbb-benign", limit=6)])
    objective.prepare_model(original, config)
    directions = objective.current_directions(original.model, 0)
    harmful = [row for row in rows if row.kind != "anchor"]
    with ablate_directions_where(original.model, directions, torch.tensor(True)):
        ablated = labelled_cross_entropy(original.model, harmful)
    plain = labelled_cross_entropy(original.model, [row for row in rows if row.kind == "anchor"])
    count = {kind: sum(sum(label != -100 for label in row.labels[1:]) for row in rows if (row.kind == "anchor") == kind)
             for kind in (False, True)}
    expected = (ablated * count[False] + plain * count[True]) / (count[False] + count[True])
    log = [entry for entry in json.loads((config.out / "training_log.json").read_text()) if "loss" in entry]
    assert len(log) == 2 and log[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert not (config.out / "checkpoints").exists()
