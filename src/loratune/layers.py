"""The LoRA layer: a frozen base weight W plus low-rank updates, ``h = W·x + Σ_a s_a·B_a·(A_a·x)``.

One class, :class:`LoraLayer`, covers the three kinds of base module LoRA is applied to. They differ only in how
the input meets W and A, and in whether W is stored transposed:

===========================  ==================  ===============  =====================
base module                   W stored as         A·x              ΔW in W's layout
===========================  ==================  ===============  =====================
``nn.Linear``                 out×in              ``x @ Aᵀ``       s·B·A
transformers ``Conv1D``       in×out              ``x @ Aᵀ``       (s·B·A)ᵀ
``nn.Embedding``              num×dim             ``Aᵀ[ids]``      (s·B·A)ᵀ
===========================  ==================  ===============  =====================

with A: r×in and B: out×r in every case (for an embedding, in = num_embeddings and out = embedding_dim).
The base ``weight`` and ``bias`` are registered on this layer under their original names, so a model's
state-dict keys for the base are unchanged and plain checkpoints load as they are.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .fused import LoraLinearFunction, lora_linear_inference

LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"


def base_kind(module: nn.Module) -> str | None:
    """Which kind of LoRA-able module this is, or None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return CONV1D
    return None


class LoraLayer(nn.Module):
    """A base module (Linear, Conv1D or Embedding) with any number of named LoRA adapters beside it.

    Each adapter ``a`` holds ``lora_A[a]`` (r×in, Gaussian or Kaiming at init) and ``lora_B[a]`` (out×r, zero at
    init) with scaling ``s_a``. Active, unmerged adapters add ``s·B·(A·x)`` to the base output; B·A is never formed
    in the forward pass. Merged adapters live inside ``weight`` instead.

    A plain Linear base with one active adapter runs as one fused autograd Function (:mod:`loratune.fused`), and
    without grad as the same forward math with the casts of A and s·B cached; set ``fused = False`` (on the class
    or a layer) for the unfused autograd expression, which every case can take.
    """

    fused = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        kind = base_kind(base)
        if kind is None:
            raise TypeError(f"LoRA applies to Linear, Conv1D and Embedding modules, not {type(base).__name__}")
        self.kind = kind
        self.base = [base]  # a list, so the original module is remembered for unload() without being registered
        self.weight = base.weight  # same Parameter objects: keys and storage identical to the wrapped module's
        self.bias = getattr(base, "bias", None)
        if kind == LINEAR:
            self.in_features, self.out_features = base.in_features, base.out_features
        elif kind == CONV1D:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self.lora_A = nn.ParameterDict()  # name -> r×in
        self.lora_B = nn.ParameterDict()  # name -> out×r
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._serving: dict = {}  # inference casts of A and s·B (see loratune.fused.lora_linear_inference)

    # -- adapters ----------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "gaussian",
                    use_rslora: bool = False, dtype: torch.dtype = torch.float32) -> None:
        """Create adapter ``name``: A r×in initialised by ``init``, B out×r zero, s = alpha/r (alpha/√r with rsLoRA)."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        device = self.weight.device
        A = torch.empty(r, self.in_features, dtype=dtype, device=device)
        B = torch.zeros(self.out_features, r, dtype=dtype, device=device)
        if device.type != "meta":
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / r)
            elif init == "kaiming":
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            else:
                nn.init.zeros_(A)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self._serving.clear()
        # Dropout acts on the LoRA branch's input only; embeddings take ids, so they get none.
        p = dropout if self.kind != EMBEDDING else 0.0
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerge it first if it is merged)."""
        if name in self.merged:
            self.unmerge([name])
        for container in (self.lora_A, self.lora_B, self.lora_dropout):
            del container[name]
        del self.scaling[name]
        self.active = [a for a in self.active if a != name]
        self._serving.clear()

    # -- forward -----------------------------------------------------------------------------------------------
    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == LINEAR:
            return quant.linear(x, self.weight, self.bias)
        if self.kind == CONV1D:  # transformers' Conv1D: x @ W + b with W in×out
            return F.linear(x, self.weight.t(), self.bias)
        b = self.base[0]
        return F.embedding(x, self.weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.kind == LINEAR and len(self.active) == 1 and not self.disabled:
            name = self.active[0]
            if name not in self.merged and name in self.lora_A and not quant.is_quantized(self.weight):
                drop = self.lora_dropout[name]
                A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
                if not torch.is_grad_enabled() and not (self.training and isinstance(drop, nn.Dropout)):
                    return lora_linear_inference(self._serving, x, self.weight, self.bias, A, B, s)
                x_d = drop(x) if isinstance(drop, nn.Dropout) and self.training else None
                return LoraLinearFunction.apply(x, x_d, self.weight, self.bias, A, B, s)
        result = self._base_forward(x)  # [..., out]
        if self.disabled:
            return result
        for name in self.active:
            if name in self.merged or name not in self.lora_A:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            if self.kind == EMBEDDING:
                h = F.embedding(x, A.t())  # [..., r]: row ids of Aᵀ (num×r)
            else:
                xa = self.lora_dropout[name](x)
                if not torch.is_autocast_enabled(xa.device.type):
                    xa = xa.to(A.dtype)  # LoRA weights are fp32 by default while the base may be bf16
                h = xa @ A.t()  # [..., in] -> [..., r]
            result = result + ((h @ B.t()) * self.scaling[name]).to(result.dtype)  # [..., r] -> [..., out]
        return result

    # -- ΔW, merge, unmerge ------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s·B·A (out×in) in fp32, returned in the base weight's layout (transposed for Conv1D/Embedding)."""
        delta = (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling[name]  # out×r @ r×in
        return delta if self.kind == LINEAR else delta.t()

    def merge(self, names: list[str] | None = None, safe: bool = True) -> None:
        """W ← W + ΔW for each named adapter (default: the active ones). Merging a merged adapter does nothing.

        With ``safe``, the sum is checked for NaN/inf before W is touched. A quantized W is dequantized:
        the merged weight is dense, in the compute dtype of the quantized one.
        """
        for name in names if names is not None else list(self.active):
            if name in self.merged:
                continue
            if name not in self.lora_A:
                raise KeyError(f"no adapter named {name!r}; this layer has {sorted(self.lora_A)}")
            dense = quant.dequantize(self.weight)
            merged = dense.float() + self.delta_weight(name)
            if safe and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} would put NaN/inf into the base weight; nothing was changed")
            if quant.is_quantized(self.weight):
                self.weight = nn.Parameter(merged.to(dense.dtype), requires_grad=False)
            else:
                with torch.no_grad():
                    self.weight.copy_(merged)  # copy_ casts back to W's dtype
            self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """W ← W − ΔW for each named merged adapter (default: all), last merged first."""
        for name in reversed(list(self.merged)):
            if names is not None and name not in names:
                continue
            with torch.no_grad():
                self.weight.copy_(self.weight.float() - self.delta_weight(name))
            self.merged.remove(name)

    def unwrapped(self) -> nn.Module:
        """The plain base module, holding this layer's (possibly merged) weight and bias."""
        base = self.base[0]
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.lora_A[n].shape[0]}, s={self.scaling[n]:g})" for n in self.lora_A)
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, adapters=[{adapters}], active={self.active}"
