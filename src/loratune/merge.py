"""Merging adapters into the base weights: W ← W + s·B·A, and back.

Merging is explicit (nothing merges behind the user's back), idempotent (a merged adapter is not added twice)
and, by default, safe: a merge that would put NaN/inf into W is refused before W changes.
"""
from __future__ import annotations

from torch import nn

from . import quant
from .inject import CONFIGS_ATTR, active_adapters, adapter_configs, lora_layers, _replace


def merge_adapters(model: nn.Module, adapter_names: list[str] | None = None, safe: bool = True) -> None:
    """Add ΔW of the named adapters (default: the active ones) into the base weights, in place.

    With ``safe``, every layer's merged weight is checked for NaN/inf first, so a refused merge leaves no layer changed.
    """
    names = list(adapter_names) if adapter_names is not None else active_adapters(model)
    unknown = [n for n in names if n not in adapter_configs(model)]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {sorted(adapter_configs(model))}")
    layers = [layer for _, layer in lora_layers(model)]
    if safe:  # check all layers before changing any
        for name, layer in lora_layers(model):
            for a in names:
                if a in layer.lora_A and a not in layer.merged and not layer.delta_weight(a).isfinite().all():
                    raise ValueError(f"adapter {a!r} has NaN/inf in {name}; refusing to merge (nothing was changed)")
    for layer in layers:
        layer.merge([a for a in names if a in layer.lora_A], safe=safe)


def unmerge_adapters(model: nn.Module) -> None:
    """Subtract every merged adapter back out of the base weights (exact up to floating-point rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module) -> nn.Module:
    """Put every plain base module back (merged weights stay merged); the adapters are dropped.

    An NF4 base stays quantized: unloading hands back the base as it was loaded, e.g. to adapt it again. For a
    dense model use :func:`merge_and_unload`, or :func:`loratune.quant.dequantize_model` afterwards.
    """
    for name, layer in list(lora_layers(model)):
        _replace(model, name, layer.unwrapped())
    if hasattr(model, CONFIGS_ATTR):
        object.__delattr__(model, CONFIGS_ATTR)
    return model


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None, safe: bool = True,
                     dequantize: bool = True) -> nn.Module:
    """Merge the named adapters (default: active ones) and return the plain model, e.g. a transformers model.

    On an NF4 (QLoRA) base, a merged layer's weight becomes dense, and with ``dequantize`` (the default) so does
    every weight still quantized (layers without an adapter), in its original dtype like the merged ones
    (:func:`loratune.quant.dequantize_model`): the model holds no packed 4-bit weights and ``save_pretrained``
    writes a checkpoint any transformers model loads. ``dequantize=False`` keeps those layers in NF4.
    """
    merge_adapters(model, adapter_names, safe=safe)
    plain = unload(model)
    if dequantize:
        quant.dequantize_model(plain)
    return plain
