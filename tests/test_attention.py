"""Per-example (varlen) attention for packed rows against the straightforward implementations.

Tolerances: fp32 models; the per-example kernels see the same numbers as transformers' block-diagonal SDPA mask, so
logits agree to float rounding (atol 1e-5), LoRA gradients to rtol 1e-4 / atol 1e-5 of their largest entry
(summation order; on CPU the per-example kernel is loratune.blocked_attention, checked in bf16 there too).
"""
import pytest
import torch

from conftest import make_tiny_qwen3, randomize_lora_B
from loratune.attention import NAME, example_bounds, use_varlen_attention, varlen_kwargs
from loratune.config import LoraConfig
from loratune.data import PackingCollator
from loratune.inject import inject_adapter
from loratune.train import batch_loss

LENS = [5, 9, 3, 7]


def _packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in LENS:
        ids = torch.randint(0, 128, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples, PackingCollator()(examples)


def test_packed_logits_equal_separate_forwards():
    model = make_tiny_qwen3()
    examples, batch = _packed()
    separate = torch.cat([model(input_ids=e["input_ids"][None], use_cache=False).logits for e in examples], dim=1)
    dense = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert use_varlen_attention(model) and model.config._attn_implementation == NAME
    from_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    from_cu = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                    **varlen_kwargs(model, batch, torch.device("cpu"))).logits
    for got in (dense, from_positions, from_cu):
        torch.testing.assert_close(got, separate, rtol=1e-5, atol=1e-5)


def test_loss_and_lora_gradients_match_dense_mask():
    """batch_loss with varlen attention = batch_loss with transformers' SDPA block-diagonal mask."""
    torch.manual_seed(0)
    model = make_tiny_qwen3()
    inject_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    randomize_lora_B(model)
    model.train()
    _, batch = _packed(1)
    results = []
    for switch in (False, True):
        if switch:
            assert use_varlen_attention(model)
        loss, n = batch_loss(model, batch, torch.device("cpu"))
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (l0, n0, g0), (l1, n1, g1) = results
    assert n0 == n1 > 0
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5 * g0[k].abs().max().item())


def test_padding_masks_and_generation_are_unchanged():
    model = make_tiny_qwen3()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    want = model(input_ids=ids, attention_mask=mask).logits
    want_gen = model.generate(ids[1:, :5], max_new_tokens=4, do_sample=False)
    assert use_varlen_attention(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(ids[1:, :5], max_new_tokens=4, do_sample=False), want_gen)


def test_example_bounds():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert example_bounds(6, position_ids=pos) == [0, 3, 5, 6]
    assert example_bounds(6, position_ids=torch.arange(6)[None]) is None
    assert example_bounds(6, cu_seq_lens=torch.tensor([0, 2, 6])) == [0, 2, 6]
    assert example_bounds(6, cu_seq_lens=torch.tensor([0, 6])) is None
    with pytest.raises(ValueError, match="does not split"):
        example_bounds(6, cu_seq_lens=torch.tensor([0, 4, 5]))


def test_gpt2_packed_logits_equal_separate_forwards(tiny_gpt2):
    examples, batch = _packed()
    separate = torch.cat([tiny_gpt2(input_ids=e["input_ids"][None], use_cache=False).logits for e in examples], dim=1)
    assert use_varlen_attention(tiny_gpt2)
    got = tiny_gpt2(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                    **varlen_kwargs(tiny_gpt2, batch, torch.device("cpu"))).logits
    torch.testing.assert_close(got, separate, rtol=1e-5, atol=1e-5)


def test_other_modules_are_left_alone():
    plain = torch.nn.Linear(2, 2)
    assert not use_varlen_attention(plain)
    assert varlen_kwargs(plain, {"cu_seqlens": torch.tensor([0, 3])}, torch.device("cpu")) == {}
