"""The refusal direction (Arditi et al. 2024): difference in means, then selection by its causal effect."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trajalign.batching import batches, pad_right
from trajalign.errors import TrajalignError
from trajalign.probe.hooks import ablate_direction, add_vector, decoder_blocks, record_block_inputs
from trajalign.refusals import REFUSALS


def refusal_opening_ids(chat, refusals: tuple[str, ...] = REFUSALS) -> list[int]:
    """First tokens of refusal texts, at the answer start and after a space (mid-answer)."""
    return sorted({chat.encode_span(text)[0] for text in refusals}
                  | {chat.encode_span(" " + text)[0] for text in refusals})


@torch.inference_mode()
def mean_activations(handle, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean residual stream entering each block at the post-instruction positions: [layers, positions, hidden],
    accumulated in float64. Right padding keeps every real token's position id as in an unpadded pass."""
    positions = len(handle.chat.post_instruction_ids)
    layers = len(decoder_blocks(handle.model))
    total = None
    for batch in batches([handle.chat.prompt_ids(prompt) for prompt in prompts], batch_size):
        input_ids, attention_mask = pad_right(batch, handle.tokenizer.pad_token_id, handle.device)
        with record_block_inputs(handle.model) as captured:
            handle.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        index = torch.stack([torch.arange(len(ids) - positions, len(ids)) for ids in batch]).to(handle.device)
        stacked = torch.stack([captured[layer] for layer in range(layers)])  # [layers, batch, seq, hidden]
        gathered = stacked.gather(2, index[None, :, :, None].expand(layers, -1, -1, stacked.shape[-1]))
        summed = gathered.double().sum(dim=1)
        total = summed if total is None else total + summed
    return total / len(prompts)


def refusal_scores(handle, prompts: list[str], opening_ids: list[int],
                   batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: log-odds that the answer opens with a refusal token, log p / (1 - p), p = their mass; and the
    next-token log-distribution at the answer start ([prompts, vocab])."""
    return context_refusal_scores(handle, [handle.chat.prompt_ids(prompt) for prompt in prompts], opening_ids,
                                  batch_size)


@torch.inference_mode()
def context_refusal_scores(handle, contexts: list[list[int]], opening_ids: list[int],
                           batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per context (token ids): log-odds that the next token opens a refusal, and the next-token log-distribution
    ([contexts, vocab]). One teacher-forced pass per batch, right-padded, so every position id is as unpadded;
    the prefix all contexts share (a prompt, say) is run once and its keys and values reused by every batch."""
    from trajalign.backends import kv_cache

    shared = _shared_prefix(contexts)
    prefix_layers = None
    if shared:
        output = handle.model(input_ids=torch.tensor([contexts[0][:shared]], device=handle.device), use_cache=True,
                              logits_to_keep=1)
        prefix_layers = [(layer.keys, layer.values) for layer in kv_cache.output_cache(output).layers]
    scores, distributions = [], []
    for batch in batches(contexts, batch_size):
        tails = [ids[shared:] for ids in batch]
        input_ids, attention_mask = pad_right(tails, handle.tokenizer.pad_token_id, handle.device)
        ends = sorted({len(ids) - 1 for ids in tails})  # logits only where some row ends: not [batch, seq, vocab]
        inputs = {"input_ids": input_ids, "use_cache": shared > 0,
                  "logits_to_keep": torch.tensor(ends, device=handle.device)}
        if shared:
            layers = [(keys.expand(len(batch), -1, -1, -1), values.expand(len(batch), -1, -1, -1))
                      for keys, values in prefix_layers]
            inputs[kv_cache.cache_keyword(handle.model)] = kv_cache.from_layers(layers, handle.model.config)
            inputs["position_ids"] = (shared + torch.arange(input_ids.shape[1], device=handle.device)).expand(
                len(batch), -1)
            attention_mask = torch.cat([attention_mask.new_ones((len(batch), shared)), attention_mask], dim=1)
        logits = handle.model(attention_mask=attention_mask, **inputs).logits
        columns = torch.tensor([ends.index(len(ids) - 1) for ids in tails])
        log_probs = logits[torch.arange(len(batch)), columns].double().log_softmax(-1)
        mass = log_probs[:, opening_ids].logsumexp(-1)
        scores.append(mass - torch.log1p(-mass.exp().clamp(max=1 - 1e-12)))
        distributions.append(log_probs)
    return torch.cat(scores), torch.cat(distributions)


def _shared_prefix(contexts: list[list[int]]) -> int:
    """Tokens at the start of every context, less one: each context keeps a last token to read the logits at."""
    shortest = min(len(ids) for ids in contexts) - 1
    length = 0
    while length < shortest and all(ids[length] == contexts[0][length] for ids in contexts):
        length += 1
    return length


@dataclass
class RefusalDirection:
    direction: torch.Tensor
    layer: int
    position: int
    mean_diff: torch.Tensor
    metadata: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"direction": self.direction.float().contiguous(), "mean_diff": self.mean_diff.float().contiguous()},
                  str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(
            {"layer": self.layer, "position": self.position, **self.metadata}, indent=2))

    @staticmethod
    def tensors_file(path: Path) -> Path:
        """The .safetensors file of a direction saved at `path` (the stem, or either of its two files)."""
        return Path(path).with_suffix(".safetensors")

    @classmethod
    def load(cls, path: Path) -> "RefusalDirection":
        from safetensors.torch import load_file

        from trajalign.errors import InputError

        path = Path(path)
        tensors_file, meta_file = cls.tensors_file(path), path.with_suffix(".json")
        if not tensors_file.exists() or not meta_file.exists():
            raise InputError(f"{path}: a direction needs both {tensors_file.name} and {meta_file.name}")
        tensors = load_file(str(tensors_file))
        meta = json.loads(meta_file.read_text())
        return cls(tensors["direction"], meta.pop("layer"), meta.pop("position"), tensors["mean_diff"], meta)


def select_direction(handle, harmful: list[str], harmless: list[str], batch_size: int = 16,
                     positions: list[int] | None = None, layer_step: int = 1, kl_ceiling: float = 0.1,
                     prune_layer_fraction: float = 0.2, progress=None) -> RefusalDirection:
    """Diff-in-means for every (layer, post-instruction position); choose the candidate whose ablation lowers the
    refusal score on harmful prompts most, among those whose addition raises it on harmless prompts, whose
    ablation moves harmless next-token distributions by KL < kl_ceiling, outside the last 20% of layers.
    `progress(done, total, "direction candidates")` follows the candidates."""
    mean_diff = mean_activations(handle, harmful, batch_size) - mean_activations(handle, harmless, batch_size)
    openings = refusal_opening_ids(handle.chat)
    layers, width = mean_diff.shape[0], mean_diff.shape[1]
    positions = positions if positions is not None else list(range(-width, 0))
    harmful_base, _ = refusal_scores(handle, harmful, openings, batch_size)
    harmless_base, harmless_dist = refusal_scores(handle, harmless, openings, batch_size)
    candidates = []
    grid = [(layer, position) for layer in range(0, int(layers * (1 - prune_layer_fraction)), layer_step)
            for position in positions]
    for tried, (layer, position) in enumerate(grid):
        if progress:
            progress(tried, len(grid), "direction candidates")
        vector = mean_diff[layer, position].float()
        if vector.norm() <= 1e-6 * mean_diff.norm(dim=-1).max():
            continue  # the same token at the same place in both classes (e.g. embeddings): no direction
        with ablate_direction(handle.model, vector):
            ablated, _ = refusal_scores(handle, harmful, openings, batch_size)
            _, ablated_harmless = refusal_scores(handle, harmless, openings, batch_size)
        with add_vector(handle.model, vector, layer):
            steered, _ = refusal_scores(handle, harmless, openings, batch_size)
        kl = (harmless_dist.exp() * (harmless_dist - ablated_harmless)).sum(-1).mean().item()
        candidates.append({"layer": layer, "position": position, "ablation_score": ablated.mean().item(),
                           "steering_score": steered.mean().item(), "kl": kl})
    if not candidates:
        raise TrajalignError(f"no candidate refusal direction in the first {int(layers * (1 - prune_layer_fraction))} "
                             f"layers: the classes' mean activations do not differ there")
    allowed = [c for c in candidates if c["kl"] < kl_ceiling and c["steering_score"] > harmless_base.mean().item()]
    chosen = min(allowed or candidates, key=lambda c: c["ablation_score"])
    return RefusalDirection(
        direction=mean_diff[chosen["layer"], chosen["position"]].float(), layer=chosen["layer"],
        position=chosen["position"], mean_diff=mean_diff,
        metadata={"harmful_baseline_score": harmful_base.mean().item(),
                  "harmless_baseline_score": harmless_base.mean().item(), "chosen": chosen,
                  "filters_passed": bool(allowed), "candidates": candidates, "model": handle.spec,
                  "n_harmful": len(harmful), "n_harmless": len(harmless)})


def steering_effect(handle, direction: RefusalDirection, harmful: list[str], harmless: list[str],
                    new_tokens: int = 24, batch_size: int = 16, progress=None) -> dict[str, float]:
    """Refusal rates (keyword judge, greedy answers) with and without ablating / adding the direction;
    `progress(done, total, unit)` follows each of the four generations."""
    from trajalign.data.datasets import Behavior
    from trajalign.data.trajectories import generate_answers
    from trajalign.judges import starts_refusal

    def refusal_rate(prompts: list[str], label: str) -> float:
        behaviors = [Behavior(id=str(index), prompt=prompt, dataset="probe") for index, prompt in enumerate(prompts)]
        answers = generate_answers(handle, behaviors, new_tokens, batch_size, cache_dir=None,
                                   progress=progress and (lambda done, total, unit: progress(done, total, label)))
        return sum(starts_refusal(handle.chat.decode(ids)) for ids in answers.values()) / len(prompts)

    rates = {"harmful_refusal": refusal_rate(harmful, "harmful answers"),
             "harmless_refusal": refusal_rate(harmless, "harmless answers")}
    with ablate_direction(handle.model, direction.direction):
        rates["harmful_refusal_ablated"] = refusal_rate(harmful, "harmful answers, direction ablated")
    with add_vector(handle.model, direction.direction, direction.layer):
        rates["harmless_refusal_added"] = refusal_rate(harmless, "harmless answers, direction added")
    return rates
