"""Padding-free attention for packed rows: every example attends causally to itself, with no T×T mask.

A packed row holds several examples back to back (``loratune.data.PackingCollator``). With ``attn_implementation
= "sdpa"`` transformers turns the restarting ``position_ids`` into a dense [T, T] block-diagonal mask, and SDPA then
does the work of a T-token sequence: on CPU it cannot skip masked blocks, and with a mask it also copies the
key/value heads for grouped-query attention. For a row of n examples that is up to n² times the necessary work.

:data:`NAME` is an attention implementation registered with transformers' ``AttentionInterface`` that instead
attends within each example: the cost is Σ lᵢ² instead of T², nothing [T, T] is ever built, and the key/value
heads are not repeated. On CPU it runs :mod:`loratune.blocked_attention` (batched matmuls per block of queries,
softmax recomputed in backward; several times the speed of the CPU flash kernel); elsewhere, or with attention
dropout, SDPA once per example (``is_causal=True``, ``enable_gqa=True``, flash kernels on GPUs). Both give the
results of the block-diagonal mask, to float rounding in fp32 (see the module for bf16).

Example boundaries come from ``cu_seq_lens_q`` (the flash-attention varlen keyword that transformers forwards
to the attention function; ``loratune.train.batch_loss`` passes it) or, failing that, from ``position_ids``
restarting at 0. Everything else (padding masks, a KV cache, single tokens) is handed to transformers' own SDPA
path unchanged, so one model can train packed and generate with the same implementation.

Use :func:`use_varlen_attention` (it switches a model only where this is known to be safe: models that support
transformers' flash-attention path, which forward those keywords to the attention function).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocked_attention import varlen_causal_attention

NAME = "loratune_varlen"
BLOCKED_ON_CPU = True
"""Use :mod:`loratune.blocked_attention` on CPU (False: SDPA once per example there too, as on other devices;
``benchmarks/step_variants.py`` compares the two)."""
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
    _registered = True


def use_varlen_attention(model: nn.Module) -> bool:
    """Switch ``model`` from SDPA/eager to :data:`NAME` when it supports varlen keywords; returns whether it did."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current not in ("sdpa", "eager") or not getattr(model, "_supports_flash_attn", False) \
            or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    model.set_attn_implementation(NAME)
    return getattr(model.config, "_attn_implementation", None) == NAME


def varlen_kwargs(model: nn.Module, batch: dict, device: torch.device) -> dict:
    """The flash-attention varlen keywords for a packed ``batch`` (``cu_seqlens``, ``max_seqlen`` from
    ``PackingCollator``) when ``model`` attends with :data:`NAME` or flash attention; {} otherwise."""
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", None))
    if "cu_seqlens" not in batch or not (impl == NAME or impl.startswith("flash_attention")):
        return {}
    cu = batch["cu_seqlens"].to(device=device, dtype=torch.int32)
    longest = int(batch["max_seqlen"]) if "max_seqlen" in batch else int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def varlen_mask(*, batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
                q_offset: int = 0, kv_offset: int = 0, **kwargs):
    """No mask for a row without padding and without cached keys (causality and example boundaries are applied in
    :func:`varlen_attention_forward`); transformers' SDPA mask otherwise."""
    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def example_bounds(length: int, cu_seq_lens: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> list[int] | None:
    """Start offsets of the examples in a packed row of ``length`` tokens plus ``length`` at the end, or None when
    the row is one sequence. ``cu_seq_lens``: [n+1] cumulative lengths; ``position_ids``: [1, T] restarting at 0."""
    if cu_seq_lens is not None:
        bounds = [int(b) for b in cu_seq_lens.tolist()]
        if bounds[0] != 0 or bounds[-1] != length or any(b >= a for a, b in zip(bounds[1:], bounds)):
            raise ValueError(f"cu_seq_lens {bounds} does not split a row of {length} tokens")
    elif position_ids is not None and position_ids.shape[0] == 1 and position_ids.shape[-1] == length:
        starts = (position_ids[0, 1:] == 0).nonzero().flatten() + 1
        if starts.numel() == 0:
            return None
        bounds = [0, *starts.tolist(), length]
    else:
        return None
    return bounds if len(bounds) > 2 else None


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, S, D] → ([B, T, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, _, length, _ = query.shape
    bounds = None
    if attention_mask is None and batch == 1 and length > 1 and key.shape[2] == length:
        bounds = example_bounds(length, kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"))
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if BLOCKED_ON_CPU and query.device.type == "cpu" and not (module.training and dropout):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return varlen_causal_attention(query, key, value, bounds, scale), None  # [1, T, Hq, D]
    gqa = query.shape[1] != key.shape[1]
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    # torch.split, not slicing: its backward concatenates the pieces' gradients once, where n slices would each
    # scatter into a zero-filled [1, H, T, D] gradient that is then summed.
    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                           enable_gqa=gqa).transpose(1, 2)    # [1, lᵢ, Hq, D] each
            for q, k, v in zip(query.split(lens, 2), key.split(lens, 2), value.split(lens, 2))]
    return torch.cat(outs, dim=1), None                                        # [1, T, Hq, D], one copy
