"""One teacher-forced pass per trajectory gives, at every depth k, the model's internal reading of it."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from trajalign.batching import batches, pad_right
from trajalign.probe.hooks import record_block_inputs


class DepthReading(BaseModel):
    behavior_id: str
    depth: int
    onset_score: float  # log-probability mass of refusal openings as the next token after k trajectory tokens
    projections: dict[int, float]  # residual stream at the last injected token, on the unit refusal direction
    kl_to_reference: float | None = None
    reference_projections: dict[int, float] = Field(
        default_factory=dict, description="the same residual stream on another model's unit refusal direction "
                                          "(the original model's), so models can be compared on one axis")


@torch.inference_mode()
def probe_trajectories(handle, items: list[tuple[str, list[int], list[int]]], opening_ids: list[int],
                       direction: torch.Tensor | None = None, layers: list[int] | None = None,
                       reference=None, batch_size: int = 16, reference_direction: torch.Tensor | None = None,
                       reference_layers: list[int] | None = None) -> list[DepthReading]:
    """items: (behavior id, prompt ids, trajectory ids). Depth k reads the position of the last of the prompt +
    k trajectory tokens, whose output is the next-token distribution a prefill at depth k starts from.
    `reference_direction` (read at `reference_layers`) gives the projections on another model's direction."""
    unit = direction / direction.norm() if direction is not None else None
    layers = layers if direction is not None else []
    reference_unit = reference_direction / reference_direction.norm() if reference_direction is not None else None
    reference_layers = reference_layers if reference_direction is not None else []
    readings = []
    for batch in batches(items, batch_size):
        sequences = [prompt + trajectory for _, prompt, trajectory in batch]
        input_ids, attention_mask = pad_right(sequences, handle.tokenizer.pad_token_id, handle.device)
        with record_block_inputs(handle.model, sorted(set(layers) | set(reference_layers))) as captured:
            logits = handle.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        reference_logits = reference.model(input_ids=input_ids, attention_mask=attention_mask,
                                           use_cache=False).logits if reference is not None else None
        for row, (behavior_id, prompt, trajectory) in enumerate(batch):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(trajectory), device=logits.device)
            log_probs = logits[row, positions].double().log_softmax(-1)
            onset = log_probs[:, opening_ids].logsumexp(-1)
            projections = {layer: (captured[layer][row, positions].double() @ unit.double().to(logits.device))
                           for layer in layers}
            reference_projections = {
                layer: captured[layer][row, positions].double() @ reference_unit.double().to(logits.device)
                for layer in reference_layers}
            kl = None
            if reference_logits is not None:
                reference_log_probs = reference_logits[row, positions].double().log_softmax(-1)
                kl = (log_probs.exp() * (log_probs - reference_log_probs)).sum(-1)
            for depth in range(len(trajectory) + 1):
                readings.append(DepthReading(
                    behavior_id=behavior_id, depth=depth, onset_score=onset[depth].item(),
                    projections={layer: values[depth].item() for layer, values in projections.items()},
                    kl_to_reference=kl[depth].item() if kl is not None else None,
                    reference_projections={layer: values[depth].item()
                                           for layer, values in reference_projections.items()}))
    return readings
