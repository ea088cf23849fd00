import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trajalign.judges import starts_refusal
from trajalign.testing import save_tiny_model, tiny_handle
from trajalign.train.losses import ConstrainedSettings, constrained_loss, label_log_probs, trained_positions
from trajalign.train.recipes import IGNORE, RecipeConfig, RowBuilder, build_rows
from trajalign.train.trainer import TrainConfig, run_training

CHAT = tiny_handle().chat
BUILDER = RowBuilder(CHAT)
PROMPT = CHAT.prompt_ids("Explain photosynthesis")
TRAJECTORY = list(range(300, 340))


def trained(row):
    return [(index, label) for index, label in enumerate(row.labels) if label != IGNORE]


@given(k=st.integers(1, 40), seed=st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_prefix_recovery_labels_exactly_the_recovery(k, seed):
    import random

    row = BUILDER.prefix_recovery(PROMPT, TRAJECTORY, k, random.Random(seed), "b")
    start = len(PROMPT) + k
    assert row.input_ids[:start] == PROMPT + TRAJECTORY[:k]
    assert [index for index, _ in trained(row)] == list(range(start, len(row.input_ids)))
    assert row.input_ids[start:-1] in BUILDER.recoveries and row.input_ids[-1] == BUILDER.end[0]
    assert all(row.input_ids[index] == label for index, label in trained(row))


@given(j=st.integers(1, 8), start=st.integers(0, 20), length=st.integers(1, 20), seed=st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_insertion_recovery_labels_exactly_the_recovery(j, start, length, seed):
    import random

    row = BUILDER.insertion_recovery(PROMPT, TRAJECTORY, [(j, start, length)], random.Random(seed), "b")
    own = next(refusal for refusal in BUILDER.refusals if row.input_ids[len(PROMPT):len(PROMPT) + j] == refusal[:j])
    context = PROMPT + own[:j] + TRAJECTORY[start:start + length]
    assert row.input_ids[:len(context)] == context
    assert [index for index, _ in trained(row)] == list(range(len(context), len(row.input_ids)))
    assert row.input_ids[len(context):-1] in BUILDER.recoveries


@given(fraction=st.floats(0.05, 1.0), seed=st.integers(0, 10**6))
@settings(max_examples=30, deadline=None)
def test_rto_labels_refusal_openings_along_the_trajectory(fraction, seed):
    import random

    rng = random.Random(seed)
    positions = {m for m in range(len(TRAJECTORY)) if rng.random() < fraction}
    row = BUILDER.rto(PROMPT, TRAJECTORY, positions, rng, "b")
    assert row.input_ids[:len(PROMPT) + len(TRAJECTORY)] == PROMPT + TRAJECTORY
    inside = {index - len(PROMPT): label for index, label in trained(row) if index < len(PROMPT) + len(TRAJECTORY)}
    assert set(inside) == positions
    assert all(label in BUILDER.openings for label in inside.values())


def test_recipe_mix_and_benign_ratio():
    harmful = [(f"h{i}", f"Question number {i}", TRAJECTORY) for i in range(40)]
    benign = [(f"b{i}", f"Write a poem {i}", [300, 301], True) for i in range(40)]
    rows = build_rows(RecipeConfig(name="trajectory", benign_ratio=0.5), CHAT, harmful, benign)
    kinds = [row.kind for row in rows]
    assert kinds.count("anchor") == 20 and len(rows) == 60
    assert {"prefix", "insertion", "refusal"} <= set(kinds)
    again = build_rows(RecipeConfig(name="trajectory", benign_ratio=0.5), CHAT, harmful, benign)
    assert [row.input_ids for row in again] == [row.input_ids for row in rows]
    repeated = build_rows(RecipeConfig(name="refusal-sft", benign_ratio=2.5), CHAT, harmful[:10], benign[:8])
    prompts = Counter(tuple(row.input_ids) for row in repeated if row.kind == "anchor")
    assert sum(prompts.values()) == 25 and len(prompts) == 8 and set(prompts.values()) == {3, 4}


def test_constrained_loss_tends_to_cross_entropy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5, 6, 1], [-100, 2, 2, 8, -100, -100, -100]])
    reference = torch.randn(2, 7, 11)
    positions, targets = trained_positions(labels)
    policy, mask = label_log_probs(logits[:, positions], targets)
    ref, _ = label_log_probs(reference[:, positions], targets)
    tiny_beta = ConstrainedSettings(beta_first=1e-5, beta_early=1e-5, beta_late=1e-5)
    (constrained_gradient,) = torch.autograd.grad(constrained_loss(policy, ref, mask, tiny_beta), logits)
    cross_entropy = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    (ce_gradient,) = torch.autograd.grad(cross_entropy, logits)
    torch.testing.assert_close(constrained_gradient, ce_gradient, atol=1e-5, rtol=1e-3)
    policy, mask = label_log_probs(logits[:, positions], targets)
    strong = constrained_loss(policy, ref, mask, ConstrainedSettings())
    assert torch.isfinite(strong)


def test_trained_positions_cover_exactly_the_labels():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    positions, targets = trained_positions(labels)
    assert positions.tolist() == [0, 1, 2]
    assert targets.tolist() == [[-100, 5, 6], [7, -100, -100]]


def test_beta_schedule_follows_qi_et_al():
    betas = ConstrainedSettings().betas(torch.tensor([1, 2, 5, 6, 40]))
    assert betas.tolist() == pytest.approx([0.5, 2.0, 2.0, 0.1, 0.1])


def tiny_config(tmp_path, **fields) -> TrainConfig:
    defaults = dict(model="tiny", harmful_limit=32, benign=["jbb-benign"], benign_limit=24,
                    trajectories="target", trajectory_tokens=12, anchor_tokens=8, batch_size=8,
                    learning_rate=3e-3, epochs=1, out=tmp_path / "model")
    return TrainConfig(**{**defaults, **fields})


def test_rto_needs_no_extra_forward_pass(tmp_path):
    handle = tiny_handle()
    calls = []
    handle.model.register_forward_hook(lambda module, *args: calls.append(1) if module.training else None)
    config = tiny_config(tmp_path, recipe=RecipeConfig(name="rto", benign_ratio=0.0), epochs=1)
    run_training(config, handle=handle)
    steps = json.loads((config.out / "trajalign-trained.json").read_text())["steps"]
    passes = steps * config.batch_size // config.micro_batch_size  # 32 rows / batch 8, in passes of 4 rows
    assert steps == 4 and len(calls) == passes  # one forward per pass, RTO labels included


def test_a_finished_model_is_reused_only_with_the_settings_it_was_trained_with(tmp_path):
    from trajalign.errors import InputError

    config = tiny_config(tmp_path, recipe=RecipeConfig(name="rto", benign_ratio=0.0), epochs=1)
    run_training(config, handle=tiny_handle())
    trained_at = (config.out / "model.safetensors").stat().st_mtime_ns
    assert run_training(config) == config.out
    saved = config.out / "config.yaml"  # as an older version wrote it, before a field with a default was added
    saved.write_text("".join(line for line in saved.read_text().splitlines(keepends=True)
                             if not line.startswith("save_models_at:")))
    assert run_training(config) == config.out
    assert (config.out / "model.safetensors").stat().st_mtime_ns == trained_at
    with pytest.raises(InputError, match="different config.*learning_rate"):
        run_training(config.model_copy(update={"learning_rate": 1e-4}))


def test_tiny_model_learns_to_refuse_held_out_prompts(tmp_path):
    from trajalign.data.datasets import load_behaviors

    handle = tiny_handle(seed=3)
    harmful = load_behaviors("advbench")[:48]
    # no anchors: a random tiny model's self-distilled answers are noise that would drown the refusal signal
    config = tiny_config(tmp_path, recipe=RecipeConfig(name="refusal-sft", benign_ratio=0.0), epochs=10,
                         learning_rate=1e-2, freeze_embeddings=False)
    run_training(config, handle=handle, harmful=harmful)
    losses = [entry["loss"] for entry in json.loads((config.out / "training_log.json").read_text()) if "loss" in entry]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    handle.model.eval()
    held_out = load_behaviors("advbench")[400:420]
    refused = 0
    for behavior in held_out:
        ids = torch.tensor([handle.chat.prompt_ids(behavior.prompt)])
        output = handle.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        refused += starts_refusal(handle.chat.decode(output[0, ids.shape[1]:].tolist()))
    assert refused >= 16, refused


def test_lora_training_saves_a_loadable_model(tmp_path):
    from trajalign.models import load_model

    save_tiny_model(tmp_path / "base")
    config = tiny_config(tmp_path, model=str(tmp_path / "base"), lora={"r": 4, "alpha": 8, "merge": False},
                         recipe=RecipeConfig(name="prefix-recovery"))
    run_training(config)
    assert (config.out / "adapter_config.json").exists()
    assert load_model(str(config.out)).model is not None


def test_two_process_ddp_over_gloo(tmp_path):
    save_tiny_model(tmp_path / "base")
    out = tmp_path / "ddp"
    # --multi_gpu only selects the multi-process launcher; with no GPU, Trainer runs DDP over gloo on the CPU
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "trajalign.cli", "train", "--model", str(tmp_path / "base"), "--recipe", "trajectory",
               "--harmful-limit", "16", "--benign", "self-instruct-seed", "--benign-limit", "8",
               "--trajectories", "target", "--epochs", "1", "--batch-size", "4", "--out", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TRAJALIGN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    marker = json.loads((out / "trajalign-trained.json").read_text())
    rows = marker["rows"]
    assert marker["steps"] == -(-rows // 8)  # 2 processes x batch 4 per step
    assert Path(out / "model.safetensors").exists()


def test_activation_checkpointing_is_off_under_the_name_the_installed_release_knows():
    from dataclasses import dataclass

    from trl import DPOConfig, SFTConfig

    from trajalign.train.hf_trainer import no_activation_checkpointing

    @dataclass
    class BeforeTheRename:  # transformers 5.17's TrainingArguments knew only this name
        gradient_checkpointing: bool = True

    assert no_activation_checkpointing(BeforeTheRename) == {"gradient_checkpointing": False}
    for arguments_class in (SFTConfig, DPOConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the deprecated alias warns where the new name exists
            arguments = arguments_class(output_dir="unused", use_cpu=True, report_to=[],
                                        **no_activation_checkpointing(arguments_class))
        assert not getattr(arguments, "activation_checkpointing", arguments.gradient_checkpointing)


def test_checkpoints_are_written_every_save_steps_but_not_after_the_last_step(tmp_path, monkeypatch):
    from transformers import Trainer

    saved_at = []
    original = Trainer._save_checkpoint

    def recording(self, model, trial):
        saved_at.append(self.state.global_step)
        return original(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", recording)
    # 32 harmful rows in batches of 8: 4 steps; the one at step 2 is a resume point, one at step 4 would be waste
    config = tiny_config(tmp_path, recipe=RecipeConfig(name="refusal-sft", benign_ratio=0.0), save_steps=2)
    run_training(config, handle=tiny_handle())
    assert json.loads((config.out / "trajalign-trained.json").read_text())["steps"] == 4
    assert saved_at == [2] and (config.out / "model.safetensors").exists()
