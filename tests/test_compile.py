"""Regional torch.compile of the repeated blocks' norms and MLPs: what is compiled, and that training is unchanged.

Tolerance: fp32; inductor fuses the elementwise chains (no intermediate rounding changes in fp32, but a different
summation order in the norms' means), so loss and LoRA gradients agree to rtol 1e-4 / atol 1e-6.
"""
import pytest
import torch

from conftest import make_tiny_qwen3, randomize_lora_B
from loratune.compile import compile_available, compile_regions, repeated_blocks, uncompile
from loratune.config import LoraConfig
from loratune.data import PackingCollator
from loratune.inject import inject_adapter
from loratune.train import accumulate_gradients

pytestmark = pytest.mark.skipif(not compile_available(torch.device("cpu")), reason="torch.compile unavailable")


def _model():
    model = make_tiny_qwen3()
    torch.manual_seed(0)
    inject_adapter(model, LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    randomize_lora_B(model)
    model.train()
    return model


def _compiled(model):
    return sorted(n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None)


def test_compiles_norms_and_mlps_but_not_lora_or_attention():
    model = _model()
    keys = set(model.state_dict())
    assert len(repeated_blocks(model)) == 2
    assert compile_regions(model) == 10
    assert _compiled(model) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_norm", "self_attn.k_norm", "mlp", "input_layernorm", "post_attention_layernorm"))
    assert set(model.state_dict()) == keys
    uncompile(model)
    assert _compiled(model) == []


def test_compiled_training_step_matches_eager():
    model = _model()
    g = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(0, 128, (n,), generator=g)} for n in (7, 12, 5)]
    for e in examples:
        e["labels"] = e["input_ids"].clone()
    micro = [PackingCollator()(examples[:2]), PackingCollator()(examples[2:])]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    results = []
    for compiled in (False, True):
        if compiled:
            compile_regions(model)
        loss, _ = accumulate_gradients(model, micro, torch.device("cpu"), None)
        results.append((loss, {n: p.grad.clone() for n, p in params.items()}))
        model.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
