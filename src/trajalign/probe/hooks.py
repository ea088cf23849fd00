"""Finding decoder blocks in any architecture, recording their residual stream, and steering it."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under PEFT (or similar) wrappers."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: `model.layers` (Llama, Qwen, Gemma, Mistral), `transformer.h` (GPT-2)...

    Found structurally: the longest ModuleList whose members share one class and whose length matches the
    config's layer count when the config states one.
    """
    model = unwrap(model)
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [module for module in model.modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0
                  and len({type(child) for child in module}) == 1]
    if expected is not None:
        candidates = [module for module in candidates if len(module) == expected] or candidates
    if not candidates:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return max(candidates, key=len)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def record_block_inputs(model: nn.Module, layers: list[int] | None = None):
    """Yields a dict layer -> residual stream entering that block ([batch, seq, hidden]) for the next forward."""
    blocks = decoder_blocks(model)
    layers = list(range(len(blocks))) if layers is None else layers
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(module, args, kwargs, layer=layer):
            captured[layer] = _hidden(args, kwargs).detach()
        handles.append(blocks[layer].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _output_hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_output_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def ablate_direction(model: nn.Module, direction: torch.Tensor):
    """Project `direction` out of the residual stream everywhere: at every block's input and output."""
    unit = direction / direction.norm()
    blocks = decoder_blocks(model)

    def project(hidden: torch.Tensor) -> torch.Tensor:
        vector = unit.to(hidden.dtype).to(hidden.device)
        return hidden - (hidden @ vector).unsqueeze(-1) * vector

    handles = [block.register_forward_pre_hook(
        lambda module, args, kwargs: _replace_hidden(args, kwargs, project(_hidden(args, kwargs))), with_kwargs=True)
        for block in blocks]
    handles += [block.register_forward_hook(
        lambda module, args, output: _with_output_hidden(output, project(_output_hidden(output))))
        for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def add_vector(model: nn.Module, vector: torch.Tensor, layer: int, scale: float = 1.0):
    """Add `scale * vector` to the residual stream entering block `layer`, at every position."""
    block = decoder_blocks(model)[layer]

    def hook(module, args, kwargs):
        hidden = _hidden(args, kwargs)
        return _replace_hidden(args, kwargs, hidden + scale * vector.to(hidden.dtype).to(hidden.device))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_block_outputs(model: nn.Module, layers: list[int]):
    """Yields a dict layer -> residual stream leaving that block for the next forward, still in the autograd graph
    (training losses read it; `record_block_inputs` is the detached reading for probes)."""
    blocks = decoder_blocks(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [blocks[layer].register_forward_hook(
        lambda module, args, output, layer=layer: captured.__setitem__(layer, _output_hidden(output)))
        for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ablate_directions_where(model: nn.Module, directions: torch.Tensor, where: torch.Tensor):
    """Project directions[layer] out of the residual stream entering each block, at the [batch, seq] positions
    where `where` (a bool tensor broadcast to [batch, seq]) holds; a zero direction leaves its block alone.
    Gradients flow through the projection."""
    blocks = decoder_blocks(model)
    if directions.shape[0] != len(blocks):
        raise ValueError(f"{directions.shape[0]} directions for {len(blocks)} decoder blocks")

    def hook(module, args, kwargs, unit):
        hidden = _hidden(args, kwargs)
        vector = unit.to(hidden.device, hidden.dtype)
        scale = (hidden @ vector) * where.to(hidden.device, hidden.dtype)
        return _replace_hidden(args, kwargs, hidden - scale.unsqueeze(-1) * vector)

    norms = directions.norm(dim=-1, keepdim=True)
    handles = [block.register_forward_pre_hook(partial(hook, unit=direction / norm), with_kwargs=True)
               for block, direction, norm in zip(blocks, directions, norms) if norm > 0]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
