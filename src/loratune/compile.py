"""Regional ``torch.compile``: the norms and MLPs of a model's repeated blocks, never the LoRA layers or attention.

Outside its matmuls, a decoder block is a chain of small elementwise steps (RMSNorm's upcast, square, mean,
rsqrt, scale and downcast; SiLU(gate)·up), each a pass over memory and, on a CPU, a parallel region of its own;
in eager mode autograd also keeps their fp32 intermediates for backward. Compiled, each norm and each MLP's
elementwise part becomes one fused kernel per direction and keeps only its bf16 inputs (on Qwen3-0.6B: 28 % less
activation memory per token).

What is compiled: inside every repeated block (the elements of a ``ModuleList`` whose members share one class,
i.e. the decoder layers), each submodule that holds no LoRA layer and is not a bare Linear/Embedding/Dropout;
submodules holding LoRA layers (the attention with q/k/v/o adapters) are searched further, so e.g. Qwen3's
q_norm/k_norm are compiled and the attention itself stays eager. All blocks share one compiled graph per input
rank/dtype (``dynamic=True``: token counts vary every step), so compile time does not grow with depth.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .layers import LoraLayer

logger = logging.getLogger(__name__)
_SKIP = (nn.Linear, nn.Embedding, nn.Dropout, nn.Identity, LoraLayer)


def compile_available(device: torch.device) -> bool:
    """Whether torch.compile works here (it needs a C++ compiler on CPU, triton on CUDA): compiles a tiny function."""
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)
        fn(torch.ones(8, device=device))
        return True
    except Exception as exc:  # missing compiler, unsupported platform, ...
        logger.warning("torch.compile is not usable here (%s); training runs eagerly", str(exc).splitlines()[0])
        return False


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of every ModuleList of ≥ 2 modules of one class (a transformer's layers)."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            blocks.extend(module)
    return blocks


def _has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


def compile_regions(model: nn.Module) -> int:
    """Compile the LoRA-free submodules of the repeated blocks in place (``Module.compile``, state-dict keys
    unchanged); returns how many were compiled."""
    count = 0

    def visit(module: nn.Module) -> None:
        nonlocal count
        for child in module.children():
            if isinstance(child, LoraLayer):
                continue
            if _has_lora(child):
                visit(child)
            elif not isinstance(child, _SKIP) and next(child.parameters(), None) is not None:
                child.compile(dynamic=True)  # a norm, an MLP: something with weights besides bare matmuls
                count += 1

    for block in repeated_blocks(model):
        visit(block)
    return count


def uncompile(model: nn.Module) -> None:
    """Undo :func:`compile_regions` (the modules run eagerly again)."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
