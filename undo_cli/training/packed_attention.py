"""sdpa run once per sequence of a packed row: packing without the quadratic attention, on any device.

A packed micro-batch (`collate.PackedCollator`: one row, position_ids restarting
at 0, no padding) is what FlashAttention's varlen kernel runs natively. With
sdpa or eager, transformers instead builds a block-diagonal mask over the whole
row and attends over (sum of lengths)^2 positions: for a micro-batch of 8
examples, ~8x the attention work of the same examples padded (bench/train.py
measured the packed path at 0.87x TRL's padded one on CPU because of it).

Here the same kernel, torch's `scaled_dot_product_attention`, runs once per
sequence with `is_causal` (sum of squares, no mask built), and everything else
in the model (projections, MLP, norms) still runs on the packed row, so no
position is padded anywhere. It is registered with transformers'
`AttentionInterface` under the name `sdpa_packed` and its mask function with
`AttentionMaskInterface` (transformers' own extension points,
https://huggingface.co/docs/transformers/attention_interface).

    from undo_cli.training import packed_attention
    if packed_attention.supports(model):
        packed_attention.enable(model)     # model.config._attn_implementation == "sdpa_packed"

Anything that is not one packed row without a cache (generation with a KV
cache, a padded batch, a batch of several rows) takes transformers' sdpa path
unchanged, mask included, so the student can still `generate` (on-policy
training). The sequence boundaries come from `cu_seq_lens_q` when the collator
gives them, else from the position_ids' restarts; they are read to the host
once per forward (not once per layer).

Limits: only for models whose attention is plain causal attention over the
whole sequence (no sliding window, no logit soft-capping, no bidirectional
blocks: `supports` checks the config); the attention name is a runtime setting
and is not saved with the model (transformers leaves `_attn_implementation` out
of config.json).
"""

from __future__ import annotations

from typing import Any

NAME = "sdpa_packed"
_registered = False
_memo: list = [None, None]  # (the boundary tensor last seen, its boundaries as ints): one host read per forward


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, _packed_mask)
    _registered = True


def supports(model) -> bool:
    """True when the model uses sdpa over plain causal full attention, so running it per sequence is exact."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if str(getattr(config, "_attn_implementation", "") or "") not in ("sdpa", NAME):
        return False
    # transformers' own modelling code dispatches attention by name; remote code may not (nor know packed rows)
    if not type(base).__module__.startswith("transformers.models."):
        return False
    if not getattr(config, "is_causal", True) or getattr(config, "sub_configs", None):  # multimodal, enc-dec
        return False
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "alibi", False):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    window = getattr(config, "sliding_window", None)
    return not window or getattr(config, "use_sliding_window", True) is False


def enable(model) -> None:
    """Switch `model` (a transformers model, PEFT-wrapped or not) to per-sequence sdpa for packed rows."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(NAME)


def _packed_mask(*args: Any, **kwargs: Any):
    """No mask for one unpadded row without a cache (the attention splits it itself); else sdpa's mask."""
    from transformers.masking_utils import sdpa_mask

    if (kwargs.get("attention_mask") is None and kwargs.get("batch_size") == 1
            and kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("kv_offset")):
        return None
    return sdpa_mask(*args, **kwargs)


def _boundaries(kwargs: dict[str, Any]) -> list[int] | None:
    """[0, end of sequence 1, end of sequence 2, ...] of the packed row, or None if unknown."""
    source = kwargs.get("cu_seq_lens_q")
    if source is None:
        source = kwargs.get("position_ids")
    if source is None:
        return None
    if _memo[0] is source:
        return _memo[1]
    if source.ndim == 1:  # cu_seq_lens: already the boundaries
        bounds = [int(x) for x in source.tolist()]
    else:  # position_ids [1, T]: a sequence starts wherever the position restarts at 0
        positions = source[0]
        starts = (positions == 0).nonzero().flatten().tolist()
        bounds = (starts if starts and starts[0] == 0 else [0, *starts]) + [int(positions.shape[0])]
    _memo[0], _memo[1] = source, bounds
    return bounds


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs: Any):
    """transformers' sdpa, once per sequence when given one packed row; as is otherwise."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        bounds = _boundaries(kwargs)
    if bounds is None or len(bounds) <= 2:  # not packed, or one sequence: plain sdpa (causal without a mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rest = {k: v for k, v in kwargs.items()
            if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    # split, not slices: its backward concatenates the pieces' gradients once, where each slice's
    # backward would write into a zeroed tensor of the whole row (n sequences x the row's size).
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    outputs = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True,
                                      **rest)[0]
               for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))]
    return torch.cat(outputs, dim=1), None  # [1, T, heads, head_dim], as sdpa_attention_forward returns
