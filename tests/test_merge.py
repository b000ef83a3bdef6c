import pytest
import torch
from torch import nn

from conftest import make_tiny_gpt2, make_tiny_qwen3, randomize_lora_B
from loratune import LoraConfig, get_lora_model, merge_adapters, unmerge_adapters
from loratune.inject import lora_layers


def _adapted(make=make_tiny_qwen3, dtype=torch.float32, **kw):
    return randomize_lora_B(get_lora_model(make(dtype=dtype), LoraConfig(target_modules="all-linear", **kw)))


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_merged_equals_unmerged_and_round_trip_fp32():
    model = _adapted()
    ids = torch.randint(0, 128, (2, 16))
    unmerged = model(ids).logits
    w0 = _weights(model)
    model.merge_adapter()
    model.merge_adapter()  # idempotent
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for n, w in _weights(model).items():
        rel = ((w - w0[n]).norm() / w0[n].norm()).item()
        assert rel < 1e-6, (n, rel)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_gives_plain_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _adapted()
    ids = torch.randint(0, 128, (2, 16))
    unmerged = model(ids).logits
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "Qwen3ForCausalLM"
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not hasattr(plain, "lora_configs") and not list(lora_layers(plain))
    torch.testing.assert_close(plain(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(again(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_merge_conv1d_gpt2():
    model = _adapted(make_tiny_gpt2)
    ids = torch.randint(0, 128, (2, 12))
    unmerged = model(ids).logits
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_bf16_merge_within_bf16_tolerance():
    model = _adapted(dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16))
    unmerged = model(ids).logits.float()
    model.merge_adapter()
    merged = model(ids).logits.float()
    assert (merged - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_safe_merge_refuses_nan_anywhere_and_changes_nothing():
    model = _adapted()
    layers = list(lora_layers(model))
    with torch.no_grad():
        layers[-1][1].lora_A["default"][0, 0] = float("nan")
    w0 = _weights(model)
    with pytest.raises(ValueError, match="NaN/inf in model.layers.1.mlp.down_proj"):
        merge_adapters(model.model)
    assert all(torch.equal(w0[n], w) for n, w in _weights(model).items())
    assert all(not layer.merged for _, layer in layers)


def test_merge_named_adapter_only():
    model = _adapted()
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]), "other")
    merge_adapters(model.model, ["default"])
    assert all(layer.merged == (["default"] if "default" in layer.lora_A else []) for _, layer in lora_layers(model))
    unmerge_adapters(model.model)
    assert all(not layer.merged for _, layer in lora_layers(model))
    with pytest.raises(ValueError, match="unknown adapter"):
        merge_adapters(model.model, ["nope"])
