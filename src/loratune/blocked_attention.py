"""Causal attention of the examples of a packed row on CPU: blocked over queries, matmuls on the GEMM path, the
softmax recomputed in backward instead of stored.

PyTorch's CPU flash-attention kernel reaches a small fraction of the bf16 GEMM rate (on the reference 2-core CPU,
42-120 GFLOP/s useful for 128-1024-token examples, against 380-400 for a large GEMM). This does the same
computation as batched matmuls, per example and per block of ``BLOCK`` queries, on the keys up to the block's end
only (so the causal half is skipped at block granularity):

    forward   S = scale·Q_b·Kᵀ (keys 0..end of block), causal mask on the diagonal block, P = softmax(S), O_b = P·V
    backward  P recomputed; dV += Pᵀ·dO_b; dP = dO_b·Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)); dQ_b = scale·dS·K;
              dK += scale·dSᵀ·Q_b

Grouped-query attention needs no key/value copies: the query heads of one key/value head are stacked along the
rows of the matmul. Saved for backward: q, k, v only (no [l, l] probabilities, no output, no log-sum-exp).

Precision: in bf16, S and dP are rounded to bf16 once (the matmul output), the softmax and its backward work in
fp32 inside and round their results to bf16: the precision of transformers' eager attention in bf16, within the
same relative error as the flash kernel against an fp32 reference (~0.5 % on gradients); dK and dV accumulate in
fp32. In fp32 it equals SDPA to float rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 128
"""Queries per block: measured fastest on the reference CPU for 128-1024-token examples (256 is 0-10 % slower)."""


def _probs(q_blk: Tensor, k_t: Tensor, start: int, end: int, scale: float, groups: int, mask: Tensor) -> Tensor:
    """softmax(scale·q_blk·kᵀ[:, :, :end]) with the causal mask on the diagonal block: [Hk, g·n, end].
    ``k_t``: the example's keys transposed once, [Hk, D, l] contiguous (the matmul reads a column slice)."""
    hk, rows, _ = q_blk.shape
    s = torch.baddbmm(q_blk.new_empty(1, 1, 1), q_blk, k_t[:, :, :end], beta=0.0, alpha=scale)
    s.view(hk, groups, rows // groups, end)[..., start:].masked_fill_(mask, float("-inf"))
    return torch.softmax(s, dim=-1)


class VarlenCausalAttention(torch.autograd.Function):
    """``apply(q [Hq, T, D], k [Hk, T, D], v [Hk, T, D], bounds, scale)`` → [T, Hq, D]: causal attention within
    each example ``[bounds[i], bounds[i+1])`` of the row."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float) -> Tensor:
        hq, length, d = q.shape
        hk = k.shape[0]
        g = hq // hk
        out = q.new_empty(length, hk, g, d)                                    # [T, Hk, g, D] = [T, Hq, D]
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            qe, ke, ve = q[:, s0:s1].view(hk, g, s1 - s0, d), k[:, s0:s1], v[:, s0:s1]
            k_t = ke.transpose(1, 2).contiguous()
            for a in range(0, s1 - s0, BLOCK):
                b = min(s1 - s0, a + BLOCK)
                n = b - a
                mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
                p = _probs(qe[:, :, a:b].reshape(hk, g * n, d), k_t, a, b, scale, g, mask)
                out[s0 + a: s0 + b] = torch.bmm(p, ve[:, :b]).view(hk, g, n, d).permute(2, 0, 1, 3)
        ctx.save_for_backward(q, k, v)
        ctx.bounds, ctx.scale = bounds, scale
        return out.view(length, hq, d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v = ctx.saved_tensors
        bounds, scale = ctx.bounds, ctx.scale
        hq, length, d = q.shape
        hk = k.shape[0]
        g = hq // hk
        do = grad_out.reshape(length, hk, g, d)
        dq = q.new_empty(hk, g, length, d)
        acc = torch.promote_types(k.dtype, torch.float32)
        dk = torch.zeros(hk, length, d, dtype=acc, device=k.device)
        dv = torch.zeros(hk, length, d, dtype=acc, device=v.device)
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            qe, ke, ve = q[:, s0:s1].view(hk, g, s1 - s0, d), k[:, s0:s1], v[:, s0:s1]
            k_t, v_t = ke.transpose(1, 2).contiguous(), ve.transpose(1, 2).contiguous()
            for a in range(0, s1 - s0, BLOCK):
                b = min(s1 - s0, a + BLOCK)
                n = b - a
                mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
                q_blk = qe[:, :, a:b].reshape(hk, g * n, d)
                do_blk = do[s0 + a: s0 + b].permute(1, 2, 0, 3).reshape(hk, g * n, d)
                p = _probs(q_blk, k_t, a, b, scale, g, mask)
                dv[:, s0: s0 + b] += torch.bmm(p.transpose(1, 2), do_blk)
                dp = torch.bmm(do_blk, v_t[:, :, :b])
                ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
                dq[:, :, s0 + a: s0 + b] = torch.baddbmm(q_blk.new_empty(1, 1, 1), ds, ke[:, :b], beta=0.0,
                                                         alpha=scale).view(hk, g, n, d)
                dk[:, s0: s0 + b] += torch.baddbmm(q_blk.new_empty(1, 1, 1), ds.transpose(1, 2), q_blk, beta=0.0,
                                                   alpha=scale)
        return dq.view(hq, length, d), dk.to(k.dtype), dv.to(v.dtype), None, None


def varlen_causal_attention(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float) -> Tensor:
    """q [1, Hq, T, D], k/v [1, Hk, T, D] → [1, T, Hq, D]."""
    return VarlenCausalAttention.apply(q[0], k[0], v[0], bounds, scale).unsqueeze(0)
