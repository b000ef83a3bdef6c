import json

import pytest

from loratune.config import LoraConfig
from loratune.plan import format_plan, make_plan


def test_qwen3_0_6b_plan_numbers():
    plan = make_plan("qwen3-0.6b", LoraConfig(r=8, lora_alpha=16))
    rows = {r.name: r for r in plan.rows}
    assert rows["q_proj"].w_shape == (2048, 1024) and rows["q_proj"].a_shape == (8, 1024)
    assert rows["q_proj"].b_shape == (2048, 8) and rows["q_proj"].count == 28
    assert rows["o_proj"].w_shape == (1024, 2048) and rows["o_proj"].a_shape == (8, 2048)
    assert {n: r.per_layer for n, r in rows.items()} == {"q_proj": 24576, "k_proj": 16384, "v_proj": 16384, "o_proj": 24576}
    assert plan.trainable == 2_293_760 and plan.total == 598_343_680
    text = format_plan(plan)
    assert "trainable params: 2,293,760 || all params: 598,343,680 || trainable%: 0.3834" in text


def test_memory_estimate_components():
    base = make_plan("qwen3-0.6b", LoraConfig(), batch_size=2, seq_len=256)
    m = base.memory
    assert m["weights"] == pytest.approx(596_049_920 * 2)  # bf16 base
    assert m["lora_params_grads_adamw"] == 2_293_760 * 16
    assert m["total"] == pytest.approx(m["weights"] + m["lora_params_grads_adamw"] + m["activations"])
    nf4 = make_plan("qwen3-0.6b", LoraConfig(), batch_size=2, seq_len=256, quantize="nf4").memory
    assert nf4["weights"] < 0.5 * m["weights"]  # the embedding stays bf16; the linears drop to ~4.1 bits
    ckpt = make_plan("qwen3-0.6b", LoraConfig(), batch_size=2, seq_len=256, gradient_checkpointing=True).memory
    assert ckpt["activations"] < m["activations"]
    bigger = make_plan("qwen3-0.6b", LoraConfig(), batch_size=4, seq_len=256).memory
    assert bigger["activations"] > m["activations"] and bigger["weights"] == m["weights"]


def test_plan_on_local_dir(tiny_qwen3_dir):
    plan = make_plan(str(tiny_qwen3_dir), LoraConfig(r=4, target_modules="all-linear"))
    assert {r.name for r in plan.rows} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be an integer ≥ 1"):
        make_plan("qwen3-0.6b", LoraConfig(), batch_size=0)
    with pytest.raises(ValueError, match="matched no module"):
        make_plan("qwen3-0.6b", LoraConfig(target_modules=["c_attn"]))
