"""The LoRA linear layer's forward and backward as one autograd Function, keeping only what backward needs.

Computes ``y = x·Wᵀ + b + s·(x_d·Aᵀ)·Bᵀ`` (``x_d``: the LoRA branch's input, ``x`` or ``dropout(x)``) for a plain
(not quantized) base weight W: out×in, A: r×in, B: out×r. Compared with the same expression in autograd ops:

* forward: the update is added into the base output in place (``addmm_``) with s folded into B (an out×r
  product), so no [tokens × out] temporaries for ``h·Bᵀ``, ``·s`` and ``+``;
* backward: ``dx = g·W + (g·sB)·A`` accumulates into one buffer (no separate LoRA input gradient plus an add);
  A and B get their gradients (``dA = (g·sB)ᵀ·x_d``, ``dB = s·gᵀ·h``); W and b only if they require grad;
* saved: x_d as it came (for dA; the tensor the base matmul reads anyway when there is no dropout) and
  h = x_d·Aᵀ (tokens × r). When the LoRA branch computes in another dtype than x (fp32 adapters on a bf16 base
  without autocast), x_d is cast again in backward instead of keeping an fp32 copy.

Dtypes follow the unfused layer: the base matmul runs in autocast's dtype when autocast is on (else in x's), the
LoRA matmuls in autocast's dtype (else in the adapter's), gradients come back in each input's dtype.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtypes(x: Tensor, lora_A: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(base dtype, LoRA dtype) as autocast or the unfused layer would pick them."""
    if torch.is_autocast_enabled(x.device.type):
        amp = torch.get_autocast_dtype(x.device.type)
        return amp, amp
    return x.dtype, lora_A.dtype


def lora_linear_forward(x: Tensor, x_d: Tensor | None, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                        lora_B: Tensor, scaling: float, factors: Callable[[torch.dtype], tuple[Tensor, Tensor]] | None
                        = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward math without autograd: (y [..., out], x as the base read it [N, in], the LoRA input [N, in],
    h [N, r]). ``factors(lora_dtype)`` may supply A and (s·B)ᵀ already cast (:func:`lora_linear_inference` caches
    them); by default they are cast here."""
    base_dt, lora_dt = _compute_dtypes(x, lora_A)
    device = x.device.type
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
        shape = x.shape
        xb = x.reshape(-1, shape[-1]).to(base_dt)                              # [N, in]
        y = F.linear(xb, weight.to(base_dt), None if bias is None else bias.to(base_dt))  # [N, out]
        xl = xb if x_d is None else x_d.reshape(-1, shape[-1]).to(base_dt)      # LoRA input, saved as is
        a, sb_t = factors(lora_dt) if factors else (lora_A.to(lora_dt), (lora_B * scaling).to(lora_dt).t())
        h = xl.to(lora_dt) @ a.t()                                             # [N, r]
        if y.dtype == lora_dt:
            y.addmm_(h, sb_t)                                                  # y += h·(sB)ᵀ, in place
        else:
            y += (h @ sb_t).to(y.dtype)
    return y.view(*shape[:-1], y.shape[-1]), xb, xl, h


def lora_linear_inference(cache: dict, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                          lora_B: Tensor, scaling: float) -> Tensor:
    """No-grad forward for serving an unmerged adapter: :func:`lora_linear_forward` with A and (s·B)ᵀ cast once and
    kept in ``cache`` (refreshed whenever A, B, their versions or the compute dtype change), so the update is two
    small matmuls per layer. fp32 adapters stay fp32 here (without autocast): on this CPU small bf16 matmuls are the
    slower choice for decoding (``benchmarks/decode_detail.py``)."""
    def factors(lora_dt: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (lora_A.data_ptr(), lora_A._version, lora_B.data_ptr(), lora_B._version, scaling, lora_dt)
        if cache.get("key") != key:
            cache["a"], cache["sb_t"] = lora_A.detach().to(lora_dt), (lora_B.detach() * scaling).to(lora_dt).t()
            cache["key"] = key
        return cache["a"], cache["sb_t"]

    return lora_linear_forward(x, None, weight, bias, lora_A, lora_B, scaling, factors)[0]


class LoraLinearFunction(torch.autograd.Function):
    """``LoraLinearFunction.apply(x, x_d, W, b, A, B, s)``; ``x_d`` None when the LoRA branch reads x itself."""

    @staticmethod
    def forward(ctx, x: Tensor, x_d: Tensor | None, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                lora_B: Tensor, scaling: float) -> Tensor:
        y, xb, xl, h = lora_linear_forward(x, x_d, weight, bias, lora_A, lora_B, scaling)
        base_dt, lora_dt = _compute_dtypes(x, lora_A)
        ctx.save_for_backward(xb if weight.requires_grad else None, xl, h, weight, lora_A, lora_B)
        ctx.meta = (x.shape, x.dtype, None if x_d is None else x_d.dtype, None if bias is None else bias.dtype,
                    base_dt, lora_dt, scaling)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        xb, xl, h, weight, lora_A, lora_B = ctx.saved_tensors
        shape, x_dtype, xd_dtype, bias_dtype, base_dt, lora_dt, scaling = ctx.meta
        need_x, need_xd, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:6]
        g = grad.reshape(-1, grad.shape[-1])                                   # [N, out]
        gb = g.to(base_dt)
        gl = g.to(lora_dt)
        a, sb = lora_A.to(lora_dt), (lora_B * scaling).to(lora_dt)
        gh = gl @ sb if (need_x or need_xd or need_a) else None               # [N, r]
        dx = dxd = dw = db = da = dbb = None
        if need_x:
            dx = gb @ weight.to(base_dt)                                       # [N, in]
        if need_x and xd_dtype is None:                                        # LoRA input is x: accumulate
            if dx.dtype == lora_dt:
                dx.addmm_(gh, a)
            else:
                dx += (gh @ a).to(dx.dtype)
        if need_xd:
            dxd = (gh @ a).to(xd_dtype).view(*shape)
        if need_a:
            da = (gh.t() @ xl.to(lora_dt)).to(lora_A.dtype)                    # r×in
        if need_bb:
            dbb = ((gl.t() @ h) * scaling).to(lora_B.dtype)                    # out×r
        if need_w:
            dw = (gb.t() @ xb).to(weight.dtype)
        if need_b:
            db = gb.sum(0).to(bias_dtype)
        if dx is not None:
            dx = dx.to(x_dtype).view(*shape)
        return dx, dxd, dw, db, da, dbb, None
