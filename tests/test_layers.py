"""LoraLayer numerics against a dense reference: h = W·x + s·B·A·x."""
import pytest
import torch
from torch import nn

from loratune.layers import LoraLayer


def _linear_layer(dtype=torch.float32, r=4, alpha=8.0, init="gaussian"):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, dtype=dtype)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=r, alpha=alpha, init=init)
    layer.active = ["a"]
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    return base, layer


def test_base_keys_are_unchanged():
    base = nn.Linear(4, 3)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=2, alpha=2)
    keys = set(layer.state_dict())
    assert {"weight", "bias"} <= keys and keys - {"weight", "bias"} == {"lora_A.a", "lora_B.a"}
    assert layer.weight is base.weight


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_output_unchanged_at_init(init):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=4, alpha=8, init=init)
    layer.active = ["a"]
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A["a"].abs().sum() > 0 and layer.lora_B["a"].abs().sum() == 0


def test_gaussian_init_std_is_one_over_r():
    layer = LoraLayer(nn.Linear(4096, 8))
    layer.add_adapter("a", r=16, alpha=16, init="gaussian")
    assert layer.lora_A["a"].std().item() == pytest.approx(1 / 16, rel=0.02)


def test_forward_equals_dense_reference():
    base, layer = _linear_layer()
    x = torch.randn(5, 16)
    A, B, s = layer.lora_A["a"], layer.lora_B["a"], layer.scaling["a"]
    ref = x @ (base.weight + s * B @ A).T + base.bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_round_trip_and_idempotence():
    base, layer = _linear_layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 16)
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # idempotent: merging again adds nothing
    assert layer.merged == ["a"]
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight, w0 + layer.delta_weight("a"))
    layer.unmerge()
    rel = (layer.weight - w0).norm() / w0.norm()
    assert rel < 1e-6 and layer.merged == []


def test_safe_merge_refuses_nan_and_leaves_weight():
    base, layer = _linear_layer()
    with torch.no_grad():
        layer.lora_B["a"][0, 0] = float("nan")
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.merge()
    assert torch.equal(layer.weight, w0) and layer.merged == []


def test_conv1d_and_embedding_match_dense_reference():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 16)  # nf=out=12, nx=in=16, weight 16×12
    layer = LoraLayer(conv)
    layer.add_adapter("a", r=3, alpha=6)
    layer.active = ["a"]
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(2, 5, 16)
    dW = layer.scaling["a"] * layer.lora_B["a"] @ layer.lora_A["a"]  # out×in
    torch.testing.assert_close(layer(x), x @ (conv.weight + dW.T) + conv.bias, rtol=1e-5, atol=1e-5)

    emb = nn.Embedding(20, 6, padding_idx=0)
    layer = LoraLayer(emb)
    layer.add_adapter("a", r=2, alpha=2)
    layer.active = ["a"]
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    ids = torch.tensor([[1, 5, 19, 0]])
    dW = (layer.lora_B["a"] @ layer.lora_A["a"]).T  # num×dim
    torch.testing.assert_close(layer(ids), (emb.weight + dW)[ids], rtol=1e-5, atol=1e-5)
    out = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_with_fp32_lora(dtype):
    base, layer = _linear_layer(dtype=dtype)
    assert layer.lora_A["a"].dtype == torch.float32
    x = torch.randn(4, 16, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = x.float() @ (base.weight.float() + layer.delta_weight("a")).T + base.bias.float()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).shape == (4, 12)


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=4, alpha=8, dropout=0.5)
    layer.active = ["a"]
    layer.train()
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout on the LoRA input cannot reach the output
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    layer.eval()
    A, B, s = layer.lora_A["a"], layer.lora_B["a"], layer.scaling["a"]
    torch.testing.assert_close(layer(x), base(x) + s * x @ A.T @ B.T)


def test_gradients_only_reach_lora():
    base, layer = _linear_layer()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.lora_A["a"].grad is not None and layer.lora_B["a"].grad is not None
    assert layer.weight.grad is None


def test_several_adapters_add_up():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoraLayer(base)
    for name in ("a", "b"):
        layer.add_adapter(name, r=2, alpha=4)
        with torch.no_grad():
            layer.lora_B[name].normal_()
    x = torch.randn(2, 8)
    layer.active = ["a", "b"]
    both = layer(x)
    ref = base(x) + x @ (layer.delta_weight("a") + layer.delta_weight("b")).T
    torch.testing.assert_close(both, ref, rtol=1e-5, atol=1e-5)
    layer.merge(["a"])
    torch.testing.assert_close(layer(x), both, rtol=1e-5, atol=1e-5)  # a merged, b still on the side
    layer.delete_adapter("a")  # unmerges first
    layer.active = ["b"]
    torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_weight("b").T, rtol=1e-5, atol=1e-5)


def test_rejects_unsupported_module():
    with pytest.raises(TypeError, match="Linear, Conv1D and Embedding"):
        LoraLayer(nn.LayerNorm(4))


# -- the fused LoRA Function against the unfused autograd expression and a float64 reference ----------------------
def _fused_vs_unfused(dtype, autocast, dropout, base_grad, seed=0):
    """(unfused, fused) output, input gradient and parameter gradients for the same layer, input, dropout mask, g."""
    torch.manual_seed(seed)
    layer = LoraLayer(nn.Linear(64, 48, dtype=dtype))
    layer.add_adapter("a", r=4, alpha=6, dropout=dropout)  # s = 1.5: not a power of two, so rounding shows
    layer.active = ["a"]
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    layer.weight.requires_grad_(base_grad)
    layer.bias.requires_grad_(base_grad)
    layer.train()
    x = torch.randn(2, 7, 64, dtype=dtype)
    g = torch.randn(2, 7, 48)
    out = {}
    for fused in (False, True):
        layer.fused = fused
        torch.manual_seed(1)  # same dropout mask
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xx)
        y.backward(g.to(y.dtype))
        out[fused] = (y.detach(), xx.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
        for p in layer.parameters():
            p.grad = None
    layer.fused = True
    return out[False], out[True]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base_grad", [False, True])
def test_fused_matches_unfused_fp32(dropout, base_grad):
    """fp32: fused output and every gradient equal the unfused autograd expression to float rounding (abs error
    ≤ 1e-6 × the largest entry: the two sum in different orders)."""
    (y0, dx0, g0), (y1, dx1, g1) = _fused_vs_unfused(torch.float32, False, dropout, base_grad)
    assert g1.keys() == g0.keys() == ({"lora_A.a", "lora_B.a"} | ({"weight", "bias"} if base_grad else set()))
    for a, b in [(y1, y0), (dx1, dx0)] + [(g1[k], g0[k]) for k in g0]:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, True), (torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_matches_unfused_low_precision(dtype, autocast, dropout):
    """bf16 base and/or autocast: same dtypes as unfused; values within bf16 rounding (rtol 2⁻⁶ of the largest
    entry: the fused path rounds once where the unfused one rounds up to three times)."""
    (y0, dx0, g0), (y1, dx1, g1) = _fused_vs_unfused(dtype, autocast, dropout, False)
    assert (y1.dtype, dx1.dtype) == (y0.dtype, dx0.dtype) and g1.keys() == g0.keys()
    for a, b in [(y1, y0), (dx1, dx0)] + [(g1[k], g0[k]) for k in g0]:
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2 ** -6 * b.float().abs().max().item())


def test_fused_path_is_taken_only_where_it_applies():
    base, layer = _linear_layer()
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoraLinearFunctionBackward"
    with torch.no_grad():  # inference runs the same math without the autograd Function
        torch.testing.assert_close(layer(x), y.detach(), rtol=1e-6, atol=1e-6)
    layer.add_adapter("b", r=2, alpha=2)
    layer.active = ["a", "b"]  # several adapters: unfused
    assert type(layer(x).grad_fn).__name__ != "LoraLinearFunctionBackward"
    layer.active = ["a"]
    layer.merge()  # merged: the base alone
    torch.testing.assert_close(layer(x), layer.unwrapped()(x))


def test_inference_path_bf16_and_cache_refresh():
    """No grad, bf16 base, fp32 adapter: the update is computed in bf16 from cached casts of A and s·B; it is within
    bf16 rounding (1 % of the largest output) of fp32 math and follows in-place changes of B (the cache is keyed on
    tensor versions)."""
    base, layer = _linear_layer(dtype=torch.bfloat16)
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    ref = lambda: (x.float() @ (base.weight.float() + layer.delta_weight("a")).T + base.bias.float())  # noqa: E731
    with torch.no_grad():
        close = lambda: torch.testing.assert_close(layer(x).float(), ref(), rtol=0, atol=1e-2 * ref().abs().max())  # noqa: E731
        close()
        layer.lora_B["a"].mul_(-3.0)
        close()
        layer.eval()
        assert layer(x).dtype == torch.bfloat16
