"""Putting LoRA layers into a model: which modules, freezing, adapter switching, parameter summary.

All functions work on any ``nn.Module`` (a transformers model or not). A model's adapters are recorded in
``model.lora_configs`` (adapter name → :class:`LoraConfig`), which is all the state there is besides the layers.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from . import quant
from .config import ALL_LINEAR, LoraConfig, layer_index, matches
from .layers import CONV1D, LINEAR, LoraLayer, base_kind

CONFIGS_ATTR = "lora_configs"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters injected into ``model``, by name (empty if none)."""
    return getattr(model, CONFIGS_ATTR, None) or {}


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (lm_head), which 'all-linear' leaves alone, as PEFT does."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or (isinstance(module, LoraLayer) and out in module.base):
            heads.add(name)
    return heads or {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct short names (last dotted part) of the model's Linear/Conv1D layers, e.g. ['down_proj', 'q_proj']."""
    names = {n.split(".")[-1] for n, m in model.named_modules()
             if base_kind(m) in (LINEAR, CONV1D) or (isinstance(m, LoraLayer) and m.kind != "embedding")}
    return sorted(names)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``config`` adapts in ``model``; raises ValueError naming the problem when none or a wrong type match.

    Matching follows PEFT: a list entry matches a name exactly or as a dotted suffix, a string is a full-match
    regex, exclude_modules and modules_to_save win over targets, layers_to_transform filters by layer index.
    """
    heads = _output_head_names(model)
    saved = config.modules_to_save or ()
    found, wrong_type = [], []
    for name, module in model.named_modules():
        if not name or _within(name, saved) or _within(name, ("lora_A", "lora_B", "lora_dropout")):
            continue
        kind = module.kind if isinstance(module, LoraLayer) else base_kind(module)
        if config.target_modules == ALL_LINEAR:
            hit = kind in (LINEAR, CONV1D) and name not in heads
        else:
            hit = matches(config.target_modules, name)
        if not hit or (config.exclude_modules and matches(config.exclude_modules, name)):
            continue
        if config.layers_to_transform is not None and layer_index(name) not in config.layers_to_transform:
            continue
        if kind is None:
            wrong_type.append(f"{name} ({type(module).__name__})")
        else:
            found.append(name)
    if wrong_type:
        raise ValueError(
            f"target_modules {_show(config.target_modules)} matched modules LoRA cannot wrap: {', '.join(wrong_type[:5])}"
            f"{' …' if len(wrong_type) > 5 else ''}; LoRA wraps Linear, Conv1D and Embedding layers"
        )
    if not found:
        raise ValueError(
            f"target_modules {_show(config.target_modules)} matched no module of {type(model).__name__}"
            f"{' within layers_to_transform ' + str(list(config.layers_to_transform)) if config.layers_to_transform else ''}; "
            f"its linear layers are: {', '.join(linear_module_names(model)) or 'none'}"
        )
    return found


def _within(name: str, modules: tuple[str, ...] | list[str]) -> bool:
    """Is ``name`` one of ``modules`` (by dotted suffix) or inside one of them?"""
    parts = name.split(".")
    return any(m in parts or name.endswith("." + m) or f".{m}." in f".{name}." for m in modules)


def _show(spec: object) -> str:
    return repr(spec) if isinstance(spec, str) else "[" + ", ".join(spec) + "]"  # type: ignore[arg-type]


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                   lora_dtype: torch.dtype = torch.float32) -> list[str]:
    """Add adapter ``adapter_name`` to ``model`` in place; returns the names of the adapted modules.

    Target modules are replaced by :class:`LoraLayer` wrappers (or get one more adapter if already wrapped). The
    new adapter becomes the only active one, and only its parameters (plus modules_to_save and the biases that
    ``config.bias`` names) require grad.
    """
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name must be non-empty and contain no '.', got {adapter_name!r}")
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"model already has an adapter named {adapter_name!r}; delete it first or pick another name")
    targets = find_targets(model, config)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module)
            _replace(model, name, module)
        module.add_adapter(adapter_name, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
                           config.init, config.use_rslora, dtype=lora_dtype)
    configs = dict(configs)
    configs[adapter_name] = config
    object.__setattr__(model, CONFIGS_ATTR, configs)  # plain attribute, not a submodule or buffer
    set_active_adapters(model, [adapter_name])
    return targets


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_active_adapters(model: nn.Module, names: list[str] | str) -> None:
    """Make ``names`` the active adapters (their outputs add up) and the only trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    configs = adapter_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {sorted(configs)}")
    for _, layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.lora_A]
    mark_trainable(model, names)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters, in order (taken from the first LoRA layer)."""
    for _, layer in lora_layers(model):
        return list(layer.active)
    return []


def mark_trainable(model: nn.Module, adapter_names: list[str]) -> None:
    """Freeze everything, then unfreeze the named adapters' A and B, their modules_to_save and chosen biases."""
    configs = adapter_configs(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapter_names:
        config = configs[name]
        for layer_name, layer in lora_layers(model):
            if name in layer.lora_A:
                layer.lora_A[name].requires_grad_(True)
                layer.lora_B[name].requires_grad_(True)
                if config.bias == "lora_only" and layer.bias is not None:
                    layer.bias.requires_grad_(True)
        if config.bias == "all":
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.requires_grad_(True)
        for pname, p in modules_to_save_parameters(model, config).items():
            p.requires_grad_(True)


def modules_to_save_parameters(model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
    """Parameters of the config's modules_to_save, by full name."""
    if not config.modules_to_save:
        return {}
    out = {}
    for mname, module in model.named_modules():
        if mname and any(mname == m or mname.endswith("." + m) for m in config.modules_to_save):
            for pname, p in module.named_parameters():
                out[f"{mname}.{pname}"] = p
    return out


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; layers left with no adapter go back to their plain module."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"unknown adapter {name!r}; the model has {sorted(configs)}")
    for layer_name, layer in list(lora_layers(model)):
        if name in layer.lora_A:
            layer.delete_adapter(name)
        if not layer.lora_A:
            _replace(model, layer_name, layer.unwrapped())
    configs = {k: v for k, v in configs.items() if k != name}
    object.__setattr__(model, CONFIGS_ATTR, configs)
    remaining = [a for a in active_adapters(model) if a in configs] or list(configs)[:1]
    if configs:
        set_active_adapters(model, remaining)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; merged adapters are unmerged for it and re-merged after."""
    layers = [layer for _, layer in lora_layers(model)]
    state = [(layer.disabled, list(layer.merged)) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, state):
            layer.disabled = disabled
            layer.merge(merged, safe=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared tensor counted once, as PEFT counts them."""
    trainable = total = 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        n = quant.logical_shape(p).numel()  # an NF4 weight counts its logical out×in, not its packed bytes
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """``trainable params: 2,293,760 || all params: 598,343,680 || trainable%: 0.3834`` (PEFT's exact format)."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
