import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_gpt2, make_tiny_qwen3
from loratune import LoraConfig, disable_adapters, find_targets, get_lora_model, inject_adapter, trainable_summary
from loratune.inject import count_parameters, delete_adapter, lora_layers, set_active_adapters

QWEN3_06B = Path(__file__).resolve().parents[1] / "src/loratune/assets/configs/qwen3-0.6b/config.json"


def _randomize_b(model):
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in layer.lora_B.values():
                p.normal_(std=0.1)


def test_qwen3_0_6b_trainable_line_exactly():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(QWEN3_06B.parent)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    inject_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert trainable_summary(model) == "trainable params: 2,293,760 || all params: 598,343,680 || trainable%: 0.3834"


def test_outputs_unchanged_at_init_and_only_lora_trains(tiny_qwen3):
    ids = torch.randint(0, 128, (2, 12))
    ref = tiny_qwen3(ids).logits
    model = get_lora_model(tiny_qwen3, LoraConfig(target_modules="all-linear", init="kaiming"))
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    names = find_targets(tiny_qwen3, LoraConfig(target_modules="all-linear"))
    assert not any("lm_head" in n for n in names)
    assert {n.split(".")[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_target_matching_variants(tiny_qwen3):
    regex = find_targets(tiny_qwen3, LoraConfig(target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj"))
    assert regex == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    layers = find_targets(tiny_qwen3, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0]))
    assert layers == ["model.layers.0.self_attn.q_proj"]
    excl = find_targets(tiny_qwen3, LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "up_proj"]))
    assert not any(n.endswith(("down_proj", "up_proj")) for n in excl) and any(n.endswith("gate_proj") for n in excl)


def test_targets_that_match_nothing_list_the_linear_layers(tiny_qwen3):
    with pytest.raises(ValueError) as err:
        find_targets(tiny_qwen3, LoraConfig(target_modules=["query", "value"]))
    msg = str(err.value)
    assert "matched no module of Qwen3ForCausalLM" in msg and "q_proj" in msg and "down_proj" in msg


def test_targets_of_wrong_type_are_refused(tiny_qwen3):
    with pytest.raises(ValueError, match="LoRA cannot wrap: .*self_attn \\(Qwen3Attention\\)"):
        find_targets(tiny_qwen3, LoraConfig(target_modules=["self_attn"]))


def test_gpt2_conv1d_and_embedding_targets(tiny_gpt2):
    ids = torch.randint(0, 128, (2, 9))
    ref = tiny_gpt2(ids).logits
    model = get_lora_model(tiny_gpt2, LoraConfig(target_modules=["c_attn", "c_proj", "wte"]))
    kinds = {layer.kind for _, layer in lora_layers(model)}
    assert kinds == {"conv1d", "embedding"}
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_disable_adapters_restores_state_even_on_error(tiny_qwen3):
    ids = torch.randint(0, 128, (1, 8))
    ref = tiny_qwen3(ids).logits
    model = get_lora_model(tiny_qwen3, LoraConfig())
    _randomize_b(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, ref)
    with model.disable_adapters():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)
    model.merge_adapter()
    with pytest.raises(RuntimeError):
        with disable_adapters(model.model):
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)  # merged adapter taken out
            raise RuntimeError("boom")
    assert all(layer.merged == ["default"] and not layer.disabled for _, layer in lora_layers(model))
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_several_adapters_switch_and_delete(tiny_qwen3):
    ids = torch.randint(0, 128, (1, 8))
    ref = tiny_qwen3(ids).logits
    model = get_lora_model(tiny_qwen3, LoraConfig(), "a")
    _randomize_b(model)
    out_a = model(ids).logits
    model.add_adapter(LoraConfig(r=2, target_modules=["v_proj", "down_proj"]), "b")
    _randomize_b(model)  # re-randomises a too; take a's output again
    model.set_adapter("a")
    out_a = model(ids).logits
    model.set_adapter("b")
    out_b = model(ids).logits
    assert [n for n, p in model.named_parameters() if p.requires_grad and ".a" in n] == []
    model.set_adapter(["a", "b"])
    both = model(ids).logits
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    model.delete_adapter("b")
    assert model.active_adapters == ["a"]
    torch.testing.assert_close(model(ids).logits, out_a, rtol=1e-6, atol=1e-6)
    assert not any(n.endswith("down_proj") for n, _ in lora_layers(model))  # emptied layers unwrapped
    model.delete_adapter("a")
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown adapter"):
        set_active_adapters(model.model, "a")


def test_duplicate_adapter_name_refused(tiny_qwen3):
    inject_adapter(tiny_qwen3, LoraConfig())
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        inject_adapter(tiny_qwen3, LoraConfig())


def test_bias_and_modules_to_save_trainable(tiny_gpt2):
    inject_adapter(tiny_gpt2, LoraConfig(target_modules=["c_attn"], bias="lora_only", modules_to_save=["ln_f"]))
    trainable = {n for n, p in tiny_gpt2.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.bias" in trainable and "transformer.ln_f.weight" in trainable
    assert "transformer.h.0.attn.c_proj.bias" not in trainable
    trainable_n, total = count_parameters(tiny_gpt2)
    assert trainable_n == sum(p.numel() for p in tiny_gpt2.parameters() if p.requires_grad)


def test_counts_use_logical_shape_of_nf4_weights():
    pytest.importorskip("bitsandbytes")
    from loratune import quant

    model = make_tiny_qwen3()
    _, before = count_parameters(model)
    quant.quantize_model(model)
    inject_adapter(model, LoraConfig(r=4))
    trainable, total = count_parameters(model)
    assert total == before + trainable and trainable == 2 * 4 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64)
