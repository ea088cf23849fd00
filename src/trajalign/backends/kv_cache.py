"""Everything that depends on transformers' KV-cache internals, in one place: the forward keyword, the layout of
a DynamicCache's layers, and building, widening, stacking, selecting and trimming one.

Keys and values are [rows, heads, columns, head_dim] per layer. Keys are stored after their rotary embedding, so
a row's columns need not line up with anyone else's: only the attention mask says which columns a row sees.
"""

from __future__ import annotations

import inspect

import torch

LayerStates = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values)


def cache_keyword(model) -> str:
    """The forward() keyword for a KV cache: `cache` in recent transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def output_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's KV cache."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def has_sliding_window_layers(config) -> bool:
    if not getattr(config, "sliding_window", None) or not getattr(config, "use_sliding_window", True):
        return False
    return any("sliding" in str(kind) for kind in getattr(config, "layer_types", None) or [])


def row_states(cache, lengths: list[int]) -> list[LayerStates | None]:
    """Per row of a prefilled cache: its first `length` columns per layer ([heads, length, head_dim]), or None."""
    layers = layer_tensors(cache)
    return [[(keys[row, :, :length], values[row, :, :length]) for keys, values in layers] if length else None
            for row, length in enumerate(lengths)]


def right_aligned(states: list[LayerStates | None], lengths: list[int], width: int, config, dtype,
                  device) -> LayerStates:
    """New cache rows of `width` columns: each row's first `length` cached columns at the right end, zeros before."""
    layers_count, heads, head_dim = kv_shape(config)
    layers = []
    for layer_index in range(layers_count):
        keys = torch.zeros((len(states), heads, width, head_dim), dtype=dtype, device=device)
        values = torch.zeros_like(keys)
        for row, (state, length) in enumerate(zip(states, lengths)):
            if length:
                keys[row, :, width - length:] = state[layer_index][0][:, :length]
                values[row, :, width - length:] = state[layer_index][1][:, :length]
        layers.append((keys, values))
    return layers


def layer_tensors(cache) -> LayerStates:
    return [(layer.keys, layer.values) for layer in cache.layers]


def restore(cache, layers: LayerStates) -> None:
    """Put back the tensors `layer_tensors` returned: a forward pass replaces them (it concatenates its new
    columns into new tensors) but never writes into them."""
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.keys, layer.values = keys, values


def from_layers(layers: LayerStates, config):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers, config=config)


def pad_left(cache, extra: int) -> None:
    """Widen every row by `extra` leading columns (zeros; the caller masks them)."""
    for layer in cache.layers:
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, extra, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, extra, 0))


def append_rows(cache, layers: LayerStates) -> None:
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.keys = torch.cat([layer.keys, keys])
        layer.values = torch.cat([layer.values, values])


def select_rows(cache, rows: torch.Tensor) -> None:
    cache.batch_select_indices(rows)


def drop_leading_columns(cache, count: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, count:]
        layer.values = layer.values[:, :, count:]
