"""loratune: LoRA and QLoRA fine-tuning for Hugging Face causal LMs, with PEFT-compatible adapters."""
import os

# OpenMP threads that spin while waiting steal the cores other threads need when the machine is shared (measured
# 4-8x slower training steps on a loaded 2-core CPU). Only a default, and only effective if torch is not yet imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .adapters import load_adapter, read_adapter, save_adapter
from .config import LoraConfig
from .inject import disable_adapters, find_targets, inject_adapter, set_active_adapters, trainable_summary
from .layers import LoraLayer
from .merge import merge_adapters, merge_and_unload, unload, unmerge_adapters
from .model import LoraModel, get_lora_model

__version__ = "0.1.0"
__all__ = [
    "LoraConfig", "LoraLayer", "LoraModel", "get_lora_model", "inject_adapter", "find_targets",
    "set_active_adapters", "disable_adapters", "trainable_summary", "save_adapter", "load_adapter", "read_adapter",
    "merge_adapters", "unmerge_adapters", "merge_and_unload", "unload",
]
