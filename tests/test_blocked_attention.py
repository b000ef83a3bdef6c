"""The blocked CPU attention kernel against SDPA, per example, values and gradients.

Tolerances: fp32 equals SDPA to float rounding (atol 1e-5 of the largest entry). bf16 is checked against fp32
SDPA on the same inputs: the kernel rounds the scores QKᵀ to bf16 as transformers' eager attention does, so its
relative L2 error (about 1 % on these inputs, for the output and each gradient) is required to be within 1.1× (plus
1e-3) of eager attention's error in bf16; the bf16 flash kernel, which keeps scores in fp32, has 0.2-0.5 % there.
"""
import pytest
import torch
import torch.nn.functional as F

from loratune.blocked_attention import BLOCK, varlen_causal_attention

LENS = [5, 1, BLOCK, BLOCK + 1, 2 * BLOCK + 37]


def _inputs(dtype, lens=LENS, hq=4, hk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    # [1, H, T, D] views of a [1, T, H, D] tensor, as transformers passes them
    q = (torch.randn(1, t, hq, d, generator=g) * 2).to(dtype).transpose(1, 2)
    k = (torch.randn(1, t, hk, d, generator=g) * 2).to(dtype).transpose(1, 2)
    v = torch.randn(1, t, hk, d, generator=g).to(dtype).transpose(1, 2)
    go = torch.randn(1, t, hq, d, generator=g).to(dtype)
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    return q, k, v, go, bounds


def _sdpa(q, k, v, bounds):
    outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                           enable_gqa=True).transpose(1, 2) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1)


def _run(fn, q, k, v, go, bounds):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, bounds)
    out.backward(go)
    return [out.detach(), q.grad, k.grad, v.grad]


def test_fp32_equals_sdpa():
    q, k, v, go, bounds = _inputs(torch.float32)
    want = _run(_sdpa, q, k, v, go, bounds)
    got = _run(lambda q, k, v, b: varlen_causal_attention(q, k, v, b, q.shape[-1] ** -0.5), q, k, v, go, bounds)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def _eager(q, k, v, bounds):
    """transformers' eager attention in the input dtype (scores rounded to it, softmax in fp32), per example."""
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        rep = q.shape[1] // k.shape[1]
        qe, ke, ve = q[:, :, s:e], k[:, :, s:e].repeat_interleave(rep, 1), v[:, :, s:e].repeat_interleave(rep, 1)
        w = (qe @ ke.transpose(2, 3)) * q.shape[-1] ** -0.5
        w = w.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((torch.softmax(w, -1, dtype=torch.float32).to(q.dtype) @ ve).transpose(1, 2))
    return torch.cat(outs, dim=1)


def test_bf16_as_accurate_as_eager_attention():
    q, k, v, go, bounds = _inputs(torch.bfloat16)
    want = _run(_sdpa, *(t.float() for t in (q, k, v, go)), bounds)
    got = _run(lambda q, k, v, b: varlen_causal_attention(q, k, v, b, q.shape[-1] ** -0.5), q, k, v, go, bounds)
    eager = _run(_eager, q, k, v, go, bounds)
    for a, e, b in zip(got, eager, want):
        assert a.dtype == torch.bfloat16
        err = lambda x: ((x.float() - b).norm() / b.norm()).item()  # noqa: E731
        assert err(a) <= 1.1 * err(e) + 1e-3 and err(a) < 0.02, (err(a), err(e))


@pytest.mark.parametrize("scale", [0.5, None])
def test_scale_and_no_cross_example_attention(scale):
    """Changing one example's keys leaves the other examples' outputs untouched."""
    q, k, v, _, bounds = _inputs(torch.float32, lens=[7, 9])
    s = scale if scale is not None else q.shape[-1] ** -0.5
    out = varlen_causal_attention(q, k, v, bounds, s)
    k2 = k.clone()
    k2[:, :, 7:] += 1.0
    out2 = varlen_causal_attention(q, k2, v, bounds, s)
    assert torch.equal(out[:, :7], out2[:, :7]) and not torch.equal(out[:, 7:], out2[:, 7:])
    torch.testing.assert_close(out, _sdpa(q * (s * q.shape[-1] ** 0.5), k, v, bounds), rtol=1e-5, atol=1e-5)
