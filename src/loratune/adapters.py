"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are named as PEFT names them for a causal LM, the adapter name left out::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight      # r×in
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight      # out×r
    base_model.model.model.embed_tokens.lora_embedding_A                # r×num_embeddings
    base_model.model.model.embed_tokens.lora_embedding_B                # dim×r
    base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias    # bias of an adapted layer (bias != none)
    base_model.model.score.weight                                       # modules_to_save

so adapters written here load in PEFT (and vLLM), and PEFT's load here. Only safetensors are read or written;
nothing is unpickled. Loading checks every key and shape against the model before touching it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoraConfig
from .inject import adapter_configs, find_targets, inject_adapter, lora_layers, modules_to_save_parameters, set_active_adapters
from .layers import EMBEDDING, LoraLayer, base_kind

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _lora_keys(name: str, kind: str) -> tuple[str, str]:
    if kind == EMBEDDING:
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The adapter's live parameters under PEFT's keys: A, B, trained biases, modules_to_save.

    The one list of what an adapter holds, so that saving (:func:`adapter_state_dict`) and restoring
    (:func:`copy_adapter_tensors`, a checkpoint's resume) can never disagree about it.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {sorted(configs)}")
    config = configs[adapter_name]
    out: dict[str, nn.Parameter] = {}
    wrapped_bias_names = set()
    for name, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        key_a, key_b = _lora_keys(name, layer.kind)
        out[key_a] = layer.lora_A[adapter_name]
        out[key_b] = layer.lora_B[adapter_name]
        if config.bias != "none" and layer.bias is not None:
            out[f"{PREFIX}{name}.base_layer.bias"] = layer.bias
            wrapped_bias_names.add(f"{name}.bias")
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and pname not in wrapped_bias_names:
                out[PREFIX + pname] = p
    for pname, p in modules_to_save_parameters(model, config).items():
        out[PREFIX + pname] = p
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (A, B, trained biases, modules_to_save), detached, contiguous."""
    return {k: v.detach().contiguous() for k, v in adapter_parameters(model, adapter_name).items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``path``, atomically.

    The files are written to a temporary directory beside ``path`` and renamed into place, so a crash never leaves
    a half-written adapter. ``dtype`` optionally casts the tensors (e.g. bf16 for smaller files).
    """
    config = adapter_configs(model).get(adapter_name)
    tensors = adapter_state_dict(model, adapter_name)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return write_adapter(tensors, config, path, base_model_name_or_path)


def write_adapter(tensors: dict[str, torch.Tensor], config: LoraConfig, path: str | os.PathLike,
                  base_model_name_or_path: str | None = None) -> Path:
    """Write PEFT-keyed ``tensors`` (as :func:`adapter_state_dict` gives them) and ``config`` to ``path``,
    atomically; what :func:`save_adapter` does once it has the tensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_peft_dict(base_model_name_or_path), indent=2) + "\n")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing an existing ``dst`` with as short a window as rename allows."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory: its config (validated) and tensors (safetensors only; .bin files are refused)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: not an adapter directory")
    if not weights_file.is_file():
        if (path / "adapter_model.bin").exists():
            raise ValueError(f"{path}/adapter_model.bin is a pickle file; loratune only reads safetensors "
                             "(convert it once with PEFT in a trusted environment)")
        raise FileNotFoundError(f"{weights_file} is missing")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    config = LoraConfig.from_peft_dict(data, source=str(config_file))
    return config, load_file(weights_file)


def expected_adapter_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Every key an adapter with ``config`` must hold for ``model``, with its shape (model left untouched)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in find_targets(model, config):
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoraLayer) else None
        kind = layer.kind if layer else base_kind(module)
        if layer is not None:
            in_f, out_f = layer.in_features, layer.out_features
        elif kind == EMBEDDING:
            in_f, out_f = module.num_embeddings, module.embedding_dim
        elif kind == "conv1d":
            in_f, out_f = module.weight.shape
        else:
            in_f, out_f = module.in_features, module.out_features
        r = config.rank_for(name)
        key_a, key_b = _lora_keys(name, kind)
        shapes[key_a], shapes[key_b] = (r, in_f), (out_f, r)
    return shapes


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> LoraConfig:
    """Load an adapter directory into ``model`` as ``adapter_name`` and make it the active adapter.

    Every tensor is checked first — a key for a module that does not exist or is not a target, a missing key,
    a wrong shape, NaN/inf values — and the model is left unchanged if anything is wrong. With ``is_trainable``
    the adapter's parameters require grad (to continue training); otherwise nothing in the model does.
    """
    config, tensors = read_adapter(path)
    where = Path(path) / WEIGHTS_NAME
    try:
        expected = expected_adapter_shapes(model, config)
    except ValueError as err:
        raise ValueError(f"{Path(path) / CONFIG_NAME}: does not fit this model: {err}") from None
    params = _extra_parameters(model, config, expected)
    extra: dict[str, torch.Tensor] = {}  # bias / modules_to_save tensors: key -> model parameter
    for key, tensor in tensors.items():
        if key in expected:
            if tuple(tensor.shape) != expected[key]:
                raise ValueError(f"{where}: {key} has shape {tuple(tensor.shape)}, the model needs {expected[key]} "
                                 f"(r={config.rank_for(_module_of(key))})")
        else:
            target = params.get(key)
            if target is None:
                raise ValueError(f"{where}: unexpected key {key}: it is not a LoRA tensor of a targeted module "
                                 f"of {type(model).__name__}, nor a bias or modules_to_save parameter the config names")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{where}: {key} has shape {tuple(tensor.shape)}, the model's parameter has {tuple(target.shape)}")
            extra[key] = target
        if not tensor.is_floating_point():
            raise ValueError(f"{where}: {key} has dtype {tensor.dtype}; adapter tensors must be floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where}: {key} contains NaN or inf")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{where}: missing {len(missing)} tensor(s) the config targets, e.g. {missing[0]}")

    # Everything checked: now change the model.
    inject_adapter(model, config, adapter_name)
    copied = copy_adapter_tensors(model, tensors, adapter_name)
    with torch.no_grad():
        for key, param in extra.items():
            if key not in copied:  # what PEFT writes besides the adapter: base weights of adapted embeddings
                param.copy_(tensors[key])
    set_active_adapters(model, [adapter_name])
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return config


def copy_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str = "default",
                         convert: Callable[[torch.Tensor, nn.Parameter], torch.Tensor] | None = None) -> set[str]:
    """Copy PEFT-keyed ``tensors`` into the existing adapter ``adapter_name`` in place (the parameters stay the same
    objects, so an optimizer holding them keeps working); returns the keys copied.

    A and B must all be there. Trained biases and modules_to_save are copied when present: an adapter file may
    leave them out, a checkpoint (written by :func:`adapter_state_dict`) holds them all. ``convert`` makes a full
    tensor fit its parameter (e.g. sharding it like an FSDP2 DTensor).
    """
    copied = set()
    with torch.no_grad():
        for key, param in adapter_parameters(model, adapter_name).items():
            if key not in tensors and ".lora_" not in key:  # a missing A or B is a KeyError below
                continue
            param.copy_(convert(tensors[key], param) if convert else tensors[key])
            copied.add(key)
    return copied


def _module_of(key: str) -> str:
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
        name = name.removesuffix(suffix)
    return name


def _extra_parameters(model: nn.Module, config: LoraConfig, expected: dict[str, tuple[int, ...]]) -> dict[str, nn.Parameter]:
    """Non-LoRA keys an adapter file may hold for ``config``, mapped to the model parameter each one sets.

    Biases (when ``config.bias`` trains them), modules_to_save parameters, and the base weights PEFT writes for
    adapted embeddings (``...embed_tokens.base_layer.weight``, its save_embedding_layers default).
    """
    targets = {_module_of(k) for k in expected}
    out: dict[str, nn.Parameter] = {}
    for pname, p in model.named_parameters():
        module, _, leaf = pname.rpartition(".")
        peft_name = f"{module}.base_layer.{leaf}" if module in targets else pname
        trained_bias = leaf == "bias" and (config.bias == "all" or (config.bias == "lora_only" and module in targets))
        if trained_bias or (module in targets and leaf == "weight"):
            out[PREFIX + peft_name] = p
    for pname, p in modules_to_save_parameters(model, config).items():
        out[PREFIX + pname] = p
    return out
