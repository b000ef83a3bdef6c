"""NF4 base weights for QLoRA (loratune.quant, bitsandbytes backend).

Bounds asserted below were measured on Gaussian weights (std 0.02, bf16, seeds 0-4, 256×1024 and
1024×1024) with bitsandbytes 0.50.2 on x86-64: relative Frobenius error 0.0919-0.0921, mean abs
error 1.454e-3-1.460e-3, max abs error 1.07e-2-1.17e-2, max |error| / block absmax 0.156-0.159
(the widest NF4 gap, between -1 and -0.6962, allows 0.152, plus the double-quantized absmax's own
error), bytes 0.2585× of bf16 (0.2813× without double quantization).
"""
from __future__ import annotations

import copy
import io
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from loratune import quant
from conftest import make_tiny_qwen3, needs_backend


def _gauss(out_f, in_f, seed=0, dtype=torch.bfloat16, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * std).to(dtype)


# --------------------------------------------------------------------------------------------- round trip
@needs_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_dequantize_error_bounds(dtype):
    w = _gauss(256, 1024, seed=1, dtype=dtype)
    q = quant.quantize_nf4(w)
    d = quant.dequantize(q)
    assert d.shape == w.shape and d.dtype == dtype
    wf, err = w.float(), (d.float() - w.float()).abs()
    rel = (torch.linalg.norm(d.float() - wf) / torch.linalg.norm(wf)).item()
    assert 0.05 < rel < 0.10  # measured 0.092: really 4-bit, and NF4-accurate
    assert err.mean().item() < 1.7e-3  # measured 1.46e-3
    assert err.max().item() < 1.5e-2  # measured 1.17e-2
    block_absmax = wf.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    assert (err.reshape(-1, 64) <= 0.17 * block_absmax + 1e-6).all()  # measured ≤ 0.159 × absmax


@needs_backend
def test_memory_ratio_and_double_quant():
    w = _gauss(1024, 1024)
    bf16_bytes = w.numel() * 2
    q = quant.quantize_nf4(w)
    q_nodq = quant.quantize_nf4(w, double_quant=False)
    r, r_nodq = quant.weight_nbytes(q) / bf16_bytes, quant.weight_nbytes(q_nodq) / bf16_bytes
    assert r <= 0.3 and r_nodq <= 0.3
    assert 0.25 <= r < r_nodq  # 4.13 vs 4.5 bits per weight: double quant saves the fp32 absmax
    assert quant.weight_nbytes(w) == bf16_bytes
    assert q.quant_state.nested and not q_nodq.quant_state.nested
    # double quantization of the scales barely changes the error
    e1 = (quant.dequantize(q).float() - w.float()).norm()
    e2 = (quant.dequantize(q_nodq).float() - w.float()).norm()
    assert abs(e1 - e2) / e2 < 0.02


@needs_backend
def test_quantized_parameter_properties():
    w = _gauss(128, 192)
    q = quant.quantize_nf4(w, block_size=64)
    assert isinstance(q, nn.Parameter) and not q.requires_grad
    assert quant.is_quantized(q) and not quant.is_quantized(w) and not quant.is_quantized(nn.Parameter(w))
    assert quant.logical_shape(q) == torch.Size([128, 192]) and quant.logical_dtype(q) == torch.bfloat16
    assert quant.logical_shape(w) == w.shape and quant.logical_dtype(w) == w.dtype
    assert q.dtype == torch.uint8 and q.numel() == 128 * 192 // 2  # packed: two codes per byte
    # deterministic: the same weight quantizes to the same bytes (re-quantizing a checkpoint is reproducible)
    q2 = quant.quantize_nf4(w.clone())
    assert torch.equal(q.data, q2.data) and torch.equal(quant.dequantize(q), quant.dequantize(q2))
    for bad, exc in [(torch.randn(64), ValueError), (torch.zeros(64, 64, dtype=torch.int32), ValueError), (q, ValueError)]:
        with pytest.raises(exc):
            quant.quantize_nf4(bad)
    with pytest.raises(ValueError, match="block_size"):
        quant.quantize_nf4(w, block_size=48)


@needs_backend
def test_dequantize_dtypes():
    w = _gauss(64, 128)
    assert quant.dequantize(w) is w
    assert quant.dequantize(w, torch.float32).dtype == torch.float32
    q = quant.quantize_nf4(w)
    d16, d32 = quant.dequantize(q), quant.dequantize(q, torch.float32)
    assert d16.dtype == torch.bfloat16 and d32.dtype == torch.float32 and d32.shape == (64, 128)
    assert not d32.requires_grad
    # decoded straight in fp32 (what an fp32 matmul uses); bf16 is that value rounded
    assert torch.allclose(d32.to(torch.bfloat16).float(), d16.float(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- linear
@needs_backend
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_dequantized_reference(x_dtype, autocast, with_bias):
    g = torch.Generator().manual_seed(3)
    w = _gauss(96, 128, seed=2)
    q = quant.quantize_nf4(w)
    bias = (torch.randn(96, generator=g) * 0.1).to(torch.bfloat16 if x_dtype == torch.bfloat16 else x_dtype) \
        if with_bias else None
    x = torch.randn(2, 7, 128, generator=g).to(x_dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    gy = torch.randn(2, 7, 96, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = quant.linear(x, q, bias)
        y_ref = F.linear(x_ref, quant.dequantize(q, x_dtype), bias)
    assert y.shape == (2, 7, 96) and y.dtype == y_ref.dtype
    (y.float() * gy).sum().backward()
    (y_ref.float() * gy).sum().backward()
    assert x.grad is not None and x.grad.dtype == x_dtype and x.grad.shape == x.shape
    tol = dict(rtol=1e-2, atol=1e-2) if (autocast or x_dtype == torch.bfloat16) else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), **tol)
    # and the input gradient is gy @ W_deq, the analytic one
    dx = (gy.reshape(-1, 96) @ quant.dequantize(q, torch.float32)).reshape_as(x)
    torch.testing.assert_close(x.grad.float(), dx, rtol=3e-2, atol=3e-2)
    assert q.grad is None


@needs_backend
def test_F_linear_and_nn_linear_dispatch_to_nf4():
    lin = nn.Linear(128, 64).to(torch.bfloat16)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    q = quant.quantize_nf4(lin.weight.detach())
    ref = quant.linear(x, q, lin.bias)
    torch.testing.assert_close(F.linear(x, q, lin.bias), ref, rtol=0, atol=0)
    torch.testing.assert_close(F.linear(input=x, weight=q, bias=lin.bias), ref, rtol=0, atol=0)
    lin.weight = q
    torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="features"):
        quant.linear(torch.randn(5, 64, dtype=torch.bfloat16), q)


@needs_backend
def test_linear_under_checkpointing_and_without_input_grad():
    from torch.utils.checkpoint import checkpoint

    q = quant.quantize_nf4(_gauss(64, 128))
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    y = checkpoint(lambda t: quant.linear(t, q).float().tanh(), x, use_reentrant=False)
    y.sum().backward()
    g1 = x.grad.clone()
    x.grad = None
    quant.linear(x, q).float().tanh().sum().backward()
    torch.testing.assert_close(g1, x.grad, rtol=0, atol=0)
    # frozen input (e.g. first layer after a frozen embedding): plain forward, no graph
    y0 = quant.linear(x.detach(), q)
    assert y0.grad_fn is None
    torch.testing.assert_close(y0, quant.linear(x, q).detach(), rtol=0, atol=0)


def test_plain_weight_paths_need_no_backend():
    w, b, x = torch.randn(8, 16), torch.randn(8), torch.randn(3, 16)
    torch.testing.assert_close(quant.linear(x, w, b), F.linear(x, w, b))
    assert not quant.is_quantized(w) and quant.dequantize(w) is w and quant.logical_shape(w) == (8, 16)


@needs_backend
def test_pickle_deepcopy_and_device_moves_keep_nf4():
    lin = nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    lin.weight = quant.quantize_nf4(lin.weight.detach())
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y = lin(x)
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    for other in (copy.deepcopy(lin), torch.load(buf, weights_only=False)):
        assert quant.is_quantized(other.weight)
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    lin.to("cpu")
    lin.to(torch.float32)  # a dtype cast leaves the NF4 weight alone: uint8 data, original dtype kept
    assert quant.is_quantized(lin.weight) and quant.logical_dtype(lin.weight) == torch.bfloat16
    assert quant.is_quantized(lin.weight.to("cpu"))
    # on the weight itself a float cast means "the values": the dense dequantized [out, in] tensor
    for dense, dt in [(lin.weight.to(torch.float32), torch.float32), (lin.weight.float(), torch.float32),
                      (lin.weight.bfloat16(), torch.bfloat16), (lin.weight.to("cpu", torch.float16), torch.float16)]:
        assert not quant.is_quantized(dense) and dense.shape == (64, 128) and dense.dtype == dt
        torch.testing.assert_close(dense, quant.dequantize(lin.weight, dt), rtol=0, atol=0)
    torch.testing.assert_close(lin(x), y, rtol=0, atol=0)
    torch.testing.assert_close(lin(x.float()), F.linear(x.float(), quant.dequantize(lin.weight, torch.float32)))


# --------------------------------------------------------------------------------------------- models
@needs_backend
def test_quantize_model_tiny_qwen3():
    ref = make_tiny_qwen3(dtype=torch.bfloat16)
    model = make_tiny_qwen3(dtype=torch.bfloat16)
    keys = list(model.state_dict())
    emb = model.get_input_embeddings().weight
    report = quant.quantize_model(model)
    assert report["quantized"] == 14  # 2 layers × (q, k, v, o, gate, up, down): 64×64, 32×64, 128×64, 64×128
    assert "lm_head" in report["skipped"] and len(report["quantized_names"]) == 14
    assert report["bytes_before"] == 2 * 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # bf16 bytes
    assert report["bytes_after"] == quant.quantized_nbytes(model) < 0.4 * report["bytes_before"]
    assert report["ratio"] == pytest.approx(report["bytes_after"] / report["bytes_before"])
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            assert quant.is_quantized(mod.weight) == (name != "lm_head"), name
    assert model.get_input_embeddings().weight is emb and not quant.is_quantized(emb)
    assert model.lm_head.weight is emb  # tied output embeddings untouched
    assert quant.parameter_nbytes(model) < quant.parameter_nbytes(ref)

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits.float(), model(ids).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert rel < 0.2 and cos > 0.98 and agree >= 0.9  # measured 0.103, 0.9947, 1.0

    # state_dict / named_parameters stay usable, and a quantized state dict loads back into the model
    sd = model.state_dict()
    assert list(sd) == keys
    model.load_state_dict(sd)
    assert all(not p.requires_grad for n, p in model.named_parameters() if quant.is_quantized(p))
    # device / dtype moves don't crash and keep the NF4 weights
    model.to("cpu")
    model.to(torch.bfloat16)
    assert quant.is_quantized(model.model.layers[0].mlp.down_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), b, rtol=0, atol=0)
    # gradients reach the input through the frozen NF4 base
    e = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=e).logits.float().square().mean().backward()
    assert e.grad is not None and e.grad.abs().sum() > 0
    # idempotent: a second call finds nothing left to do
    again = quant.quantize_model(model)
    assert again["quantized"] == 0 and sum(r == "already quantized" for r in again["skipped"].values()) == 14


@needs_backend
def test_quantize_model_skip_patterns_and_min_size():
    model = make_tiny_qwen3(dtype=torch.bfloat16)
    rep = quant.quantize_model(model, skip=("lm_head", "mlp.down_proj", "q_proj"), min_size=64 * 128)
    assert rep["quantized_names"] == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")]
    assert rep["skipped"]["model.layers.0.mlp.down_proj"].startswith("skip pattern")
    assert rep["skipped"]["model.layers.1.self_attn.q_proj"].startswith("skip pattern")
    assert rep["skipped"]["model.layers.0.self_attn.k_proj"].startswith("smaller than min_size")


@needs_backend
def test_lora_layer_on_nf4_base():
    from loratune.layers import LoraLayer

    torch.manual_seed(0)
    base = nn.Linear(128, 64, bias=True).to(torch.bfloat16)
    base.weight = quant.quantize_nf4(base.weight.detach())
    layer = LoraLayer(base)
    layer.add_adapter("default", r=4, alpha=8)
    layer.active = ["default"]
    with torch.no_grad():
        layer.lora_B["default"].normal_(std=0.1)
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    expected = quant.linear(x, layer.weight, layer.bias) + (
        (x.float() @ layer.lora_A["default"].t() @ layer.lora_B["default"].t()) * layer.scaling["default"]
    ).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert x.grad is not None and layer.lora_A["default"].grad is not None
    merged_ref = quant.dequantize(layer.weight).float() + layer.delta_weight("default")
    layer.merge(["default"])
    assert not quant.is_quantized(layer.weight)
    torch.testing.assert_close(layer.weight.float(), merged_ref.to(torch.bfloat16).float())


# --------------------------------------------------------------------------------------------- no backend
def test_missing_backend_gives_clear_error(monkeypatch):
    def no_bnb():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(quant, "_import_backend", no_bnb)
    with pytest.raises(RuntimeError, match=r"bitsandbytes.*pip install.*quantize: none") as ei:
        quant.check_backend_available()
    assert isinstance(ei.value.__cause__, ImportError)
    with pytest.raises(RuntimeError, match="quantize: none"):
        quant.quantize_nf4(torch.randn(64, 64))
    with pytest.raises(RuntimeError, match="quantize: none"):
        quant.quantize_model(make_tiny_qwen3())
    # plain-weight paths keep working without the backend
    w = torch.randn(8, 16)
    assert quant.linear(torch.randn(2, 16), w).shape == (2, 8) and quant.dequantize(w) is w


def test_old_or_broken_backend_gives_clear_error(monkeypatch):
    monkeypatch.setattr(quant, "_import_backend", lambda: types.SimpleNamespace(__version__="0.42.0"))
    with pytest.raises(RuntimeError, match=r">=0\.50.*found 0\.42\.0.*quantize: none"):
        quant.check_backend_available()

    def broken(bnb, device):
        raise OSError("libbitsandbytes_cpu.so: cannot open shared object file")

    monkeypatch.setattr(quant, "_import_backend", lambda: types.SimpleNamespace(__version__="0.50.2"))
    monkeypatch.setattr(quant, "_smoke_test", broken)
    monkeypatch.setattr(quant, "_checked_devices", set())
    with pytest.raises(RuntimeError, match=r"fail on device 'cpu'.*cannot open shared object.*quantize: none"):
        quant.check_backend_available("cpu")
