"""LoraModel: a thin, PEFT-like handle on a model with LoRA adapters.

It holds the wrapped model (``.model``), forwards calls and unknown attributes to it (so ``generate``,
``config`` and friends work), and exposes the free functions of :mod:`loratune.inject`,
:mod:`loratune.adapters` and :mod:`loratune.merge` as methods. There is no state here beyond the wrapped model.

Example::

    from transformers import AutoModelForCausalLM
    from loratune import LoraConfig, get_lora_model

    base = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")
    model = get_lora_model(base, LoraConfig(r=8, lora_alpha=16))
    model.print_trainable_parameters()
    # trainable params: 2,293,760 || all params: 598,343,680 || trainable%: 0.3834
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import adapters, inject, merge
from .config import LoraConfig


class LoraModel(nn.Module):
    """A model with LoRA adapters. ``LoraModel(model)`` wraps a model as it is (with or without adapters)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # -- adapters ----------------------------------------------------------------------------------------------
    @property
    def lora_configs(self) -> dict[str, LoraConfig]:
        """Adapter name → config."""
        return inject.adapter_configs(self.model)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters whose outputs are added, in order."""
        return inject.active_adapters(self.model)

    def add_adapter(self, config: LoraConfig, adapter_name: str = "default") -> list[str]:
        """Inject a new adapter and make it the active, trainable one; returns the adapted module names."""
        return inject.inject_adapter(self.model, config, adapter_name)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate these adapters (several add up) and make only them trainable."""
        inject.set_active_adapters(self.model, adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer."""
        inject.delete_adapter(self.model, adapter_name)

    def load_adapter(self, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False) -> LoraConfig:
        """Load a PEFT-format adapter directory as ``adapter_name`` (checked against the model first)."""
        return adapters.load_adapter(self.model, path, adapter_name, is_trainable=is_trainable)

    def save_pretrained(self, path: str | os.PathLike, adapter_name: str | None = None,
                        dtype: torch.dtype | None = None) -> Path:
        """Write the adapter (default: the first active one) in PEFT's format."""
        name = adapter_name or (self.active_adapters or list(self.lora_configs))[0]
        return adapters.save_adapter(self.model, path, name, dtype=dtype)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator["LoraModel"]:
        """Inside the block the model is the base model alone; state is restored on exit, even on error."""
        with inject.disable_adapters(self.model):
            yield self

    # -- merging -----------------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe: bool = True) -> None:
        """W ← W + ΔW for the named (default: active) adapters; idempotent."""
        merge.merge_adapters(self.model, adapter_names, safe=safe)

    def unmerge_adapter(self) -> None:
        """W ← W − ΔW for every merged adapter."""
        merge.unmerge_adapters(self.model)

    def merge_and_unload(self, adapter_names: list[str] | None = None, safe: bool = True,
                         dequantize: bool = True) -> nn.Module:
        """Merge and return the plain wrapped model (e.g. a transformers model ready for ``save_pretrained``); an NF4
        base is dequantized unless ``dequantize=False`` (see :func:`loratune.merge.merge_and_unload`)."""
        return merge.merge_and_unload(self.model, adapter_names, safe=safe, dequantize=dequantize)

    def unload(self) -> nn.Module:
        """Drop the adapters without merging and return the plain wrapped model (an NF4 base stays NF4)."""
        return merge.unload(self.model)

    # -- parameters --------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts."""
        return inject.count_parameters(self.model)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line summary."""
        print(inject.trainable_summary(self.model))

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False) -> "LoraModel":
        """Wrap ``model`` and load an adapter directory into it."""
        wrapped = cls(model)
        wrapped.load_adapter(adapter_path, adapter_name, is_trainable=is_trainable)
        return wrapped


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Inject ``config`` as ``adapter_name`` into ``model`` (in place) and return the :class:`LoraModel` handle."""
    inject.inject_adapter(model, config, adapter_name)
    return LoraModel(model)
