"""Chunked causal-LM loss against the straightforward full-logits F.cross_entropy (values and gradients)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratune.data import PackingCollator
from loratune.loss import (
    IGNORE_INDEX,
    causal_lm_loss,
    count_trainable_tokens,
    default_chunk_size,
    shift_labels,
)

B, T, H, V = 3, 11, 16, 37


def naive_loss(h, w, labels, bias=None, *, shift=True, reduction="mean"):
    """Reference: full fp32 logits, then F.cross_entropy."""
    logits = F.linear(h, w, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(seed=0, dtype=torch.float32, mask_frac=0.4, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype) * 0.3
    b = torch.randn(V, generator=g, dtype=dtype) * 0.1 if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < mask_frac] = IGNORE_INDEX
    return h, w, b, labels


def grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    loss = out.loss if hasattr(out, "loss") else out
    loss.backward()
    return loss.detach(), [x.grad if x is not None else None for x in leaves], out


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 1000, None])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_full_logits_cross_entropy(chunk_size, reduction):
    h, w, b, labels = make_inputs(bias=True)
    ref, (gh_ref, gw_ref, gb_ref), _ = grads(lambda h, w, b: naive_loss(h, w, labels, b, reduction=reduction), h, w, b)
    got, (gh, gw, gb), out = grads(
        lambda h, w, b: causal_lm_loss(h, w, labels, lm_head_bias=b, chunk_size=chunk_size, reduction=reduction),
        h, w, b)
    assert out.num_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum()) > 0
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())
    for g, r in ((gh, gh_ref), (gw, gw_ref), (gb, gb_ref)):
        assert rel_err(g, r) < 1e-6
    # Positions without a (shifted) target get exactly zero gradient, the last position included.
    no_target = shift_labels(labels) == IGNORE_INDEX
    assert torch.all(gh[no_target] == 0) and torch.all(gh[:, -1] == 0)


def test_float64_is_exact_to_rounding():
    h, w, b, labels = make_inputs(seed=3, dtype=torch.float64)
    ref, (gh_ref, gw_ref), _ = grads(lambda h, w: naive_loss(h, w, labels), h, w)
    got, (gh, gw), _ = grads(lambda h, w: causal_lm_loss(h, w, labels, chunk_size=5), h, w)
    assert abs(got.item() - ref.item()) < 1e-12 * abs(ref.item())
    assert rel_err(gh, gh_ref) < 1e-12 and rel_err(gw, gw_ref) < 1e-12


@pytest.mark.parametrize("chunk_size", [2, 9])
def test_reduction_none_matches_per_token_losses_and_gradients(chunk_size):
    h, w, b, labels = make_inputs(seed=1, bias=True)
    weights = torch.rand(B, T)  # an arbitrary weighting of per-token losses exercises the recompute backward

    def ref_fn(h, w, b):
        per = naive_loss(h, w, labels, b, reduction="none").view(B, T - 1)
        return (per * weights[:, :-1]).sum(), per

    def got_fn(h, w, b):
        out = causal_lm_loss(h, w, labels, lm_head_bias=b, chunk_size=chunk_size, reduction="none")
        return (out.loss * weights).sum(), out

    hr, wr, br = (x.detach().clone().requires_grad_(True) for x in (h, w, b))
    ref, per_ref = ref_fn(hr, wr, br)
    ref.backward()
    hg, wg, bg = (x.detach().clone().requires_grad_(True) for x in (h, w, b))
    got, out = got_fn(hg, wg, bg)
    got.backward()
    assert out.loss.shape == (B, T) and out.loss.dtype == torch.float32
    assert torch.all(out.loss[:, -1] == 0)
    assert rel_err(out.loss[:, :-1], per_ref) < 1e-6
    assert out.num_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())
    for a, r in ((hg.grad, hr.grad), (wg.grad, wr.grad), (bg.grad, br.grad)):
        assert rel_err(a, r) < 1e-6


def test_shift_false_takes_labels_as_already_aligned():
    h, w, _, labels = make_inputs(seed=2)
    ref, (gh_ref,), _ = grads(lambda h: naive_loss(h, w, labels, shift=False), h)
    got, (gh,), out = grads(lambda h: causal_lm_loss(h, w, labels, shift=False, chunk_size=4), h)
    assert abs(got.item() - ref.item()) <= 1e-6 * ref.item()
    assert rel_err(gh, gh_ref) < 1e-6
    assert out.num_tokens == int((labels != IGNORE_INDEX).sum())
    # Shifting by hand then shift=False is the same as shift=True.
    a = causal_lm_loss(h, w, shift_labels(labels), shift=False).loss
    b = causal_lm_loss(h, w, labels).loss
    assert torch.equal(a, b)


def test_two_dimensional_input_and_frozen_weight():
    h, w, _, labels = make_inputs(seed=4)
    h2, labels2 = h[0], labels[0]  # [T, H], [T]
    ref = naive_loss(h2, w, labels2)
    hl = h2.clone().requires_grad_(True)
    out = causal_lm_loss(hl, w, labels2, chunk_size=3)  # w does not require grad
    out.loss.backward()
    assert abs(out.loss.item() - ref.item()) <= 1e-6 * ref.item()
    assert w.grad is None and hl.grad is not None and hl.grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_gives_connected_zero(reduction):
    h, w, _, labels = make_inputs(seed=5)
    labels = labels.clone()
    labels[:, 1:] = IGNORE_INDEX  # labels[:, 0] is never a target with shift=True
    hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = causal_lm_loss(hl, wl, labels, reduction=reduction)
    assert out.num_tokens == 0
    assert torch.all(out.loss == 0) and not torch.isnan(out.loss).any()
    out.loss.sum().backward()  # still part of the graph: accumulation loops need not special-case it
    assert torch.all(hl.grad == 0) and torch.all(wl.grad == 0)
    assert count_trainable_tokens(labels) == 0


def test_gradient_accumulation_equals_one_big_batch():
    """Σ_mb (sum-loss_mb / total tokens) accumulates exactly the gradient of the big batch's mean loss, even
    when micro-batches have very different numbers of trainable tokens."""
    h, w, _, labels = make_inputs(seed=6, mask_frac=0.2)
    labels = labels.clone()
    labels[0, 3:] = IGNORE_INDEX  # micro-batch 1 has few tokens, micro-batch 2 many
    wl = w.clone().requires_grad_(True)
    big = causal_lm_loss(h, wl, labels, chunk_size=4)
    big.loss.backward()
    grad_big = wl.grad.clone()
    wl.grad = None
    micro = [(h[:1], labels[:1]), (h[1:], labels[1:])]
    total = sum(count_trainable_tokens(lab) for _, lab in micro)
    assert total == big.num_tokens
    acc_loss = 0.0
    for hm, lm in micro:
        out = causal_lm_loss(hm, wl, lm, reduction="sum", chunk_size=4)
        (out.loss / total).backward()
        acc_loss += out.loss.item() / total
    assert abs(acc_loss - big.loss.item()) <= 1e-6 * big.loss.item()
    assert rel_err(wl.grad, grad_big) < 1e-6
    # The naive alternative (mean of per-micro-batch means) is measurably different here.
    means = [causal_lm_loss(hm, w, lm).loss.item() for hm, lm in micro]
    assert abs(sum(means) / 2 - big.loss.item()) > 1e-3


def _packed_inputs(seed=7, lengths=(5, 1, 7, 4)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) * 0.3
    examples = []
    for n in lengths:
        ids = torch.randint(0, V, (n,), generator=g)
        labels = ids.clone()
        labels[0] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels, "h": torch.randn(n, H, generator=g)})
    return w, examples


def test_packed_row_has_no_loss_across_example_boundaries():
    w, examples = _packed_inputs()
    batch = PackingCollator()(examples)
    h = torch.cat([e["h"] for e in examples]).unsqueeze(0)  # [1, T, H]
    per_example = sum(causal_lm_loss(e["h"], w, e["labels"], reduction="sum").loss for e in examples)
    n_per_example = sum(causal_lm_loss(e["h"], w, e["labels"]).num_tokens for e in examples)
    for pos in (None, batch["position_ids"]):
        out = causal_lm_loss(h, w, batch["labels"], position_ids=pos, reduction="sum", chunk_size=3)
        assert out.num_tokens == n_per_example
        assert abs(out.loss.item() - per_example.item()) <= 1e-6 * per_example.item()


def test_position_ids_guard_boundaries_even_with_unmasked_first_labels():
    """Labels whose example-first tokens are *not* -100 (e.g. plain input_ids) would leak one loss term per
    boundary; position_ids alone prevents it."""
    w, examples = _packed_inputs(seed=8)
    h = torch.cat([e["h"] for e in examples]).unsqueeze(0)
    ids = torch.cat([e["input_ids"] for e in examples]).unsqueeze(0)
    pos = torch.cat([torch.arange(len(e["input_ids"])) for e in examples]).unsqueeze(0)
    per_example = sum(causal_lm_loss(e["h"], w, e["input_ids"], reduction="sum").loss for e in examples)
    leaky = causal_lm_loss(h, w, ids, reduction="sum")
    guarded = causal_lm_loss(h, w, ids, position_ids=pos, reduction="sum")
    assert leaky.num_tokens == guarded.num_tokens + len(examples) - 1
    assert abs(guarded.loss.item() - per_example.item()) <= 1e-6 * per_example.item()
    assert count_trainable_tokens(ids, position_ids=pos) == guarded.num_tokens


def test_bfloat16_close_to_naive_bfloat16():
    h, w, _, labels = make_inputs(seed=9)
    h, w = h.bfloat16(), w.bfloat16()
    ref, (gh_ref,), _ = grads(lambda h: naive_loss(h, w, labels), h)
    got, (gh,), _ = grads(lambda h: causal_lm_loss(h, w, labels, chunk_size=5), h)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item()  # same bf16 logits, fp32 softmax in both
    assert gh.dtype == torch.bfloat16 and rel_err(gh, gh_ref) < 1e-2


def test_bfloat16_gradient_is_the_rounded_fp32_softmax_gradient():
    """The chunk loop never materialises upcast logits, yet its hidden-state gradient is exactly (bitwise) the
    straightforward one: fp32 softmax − one-hot, rounded once to bf16, times W."""
    h, w, _, labels = make_inputs(seed=10)
    h, w = h.bfloat16(), w.bfloat16()
    targets = shift_labels(labels)
    mask = targets != IGNORE_INDEX
    hs, t = h[mask], targets[mask]
    logits = F.linear(hs, w).float()
    shifted = (logits - logits.amax(-1, keepdim=True)).exp()
    probs = shifted / shifted.sum(-1, keepdim=True)
    probs[torch.arange(len(t)), t] -= 1.0
    want = probs.to(torch.bfloat16) @ w
    _, (gh,), _ = grads(lambda h: causal_lm_loss(h, w, labels, chunk_size=4, reduction="sum"), h)
    assert torch.equal(gh[mask], want) and not gh[~mask].any()


def test_no_grad_mode():
    h, w, _, labels = make_inputs(seed=10)
    hl = h.clone().requires_grad_(True)
    with torch.no_grad():
        out = causal_lm_loss(hl, w, labels, chunk_size=4)
    assert out.loss.grad_fn is None
    assert abs(out.loss.item() - naive_loss(h, w, labels).item()) <= 1e-6 * out.loss.item()


def test_matches_transformers_model_loss(tiny_qwen3):
    """Hidden states + lm_head of a real (tiny) Qwen3 give the loss transformers computes itself."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 9))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    hidden = tiny_qwen3.model(input_ids=ids).last_hidden_state
    ours = causal_lm_loss(hidden, tiny_qwen3.lm_head.weight, labels, chunk_size=5).loss
    ref = tiny_qwen3(input_ids=ids, labels=labels).loss
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()


def test_argument_errors():
    h, w, _, labels = make_inputs()
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(h, w, labels, reduction="avg")
    with pytest.raises(ValueError, match="disagree"):
        causal_lm_loss(h, w, labels[:, :-1])
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        causal_lm_loss(h, w[:, :-1], labels)
    bad = labels.clone()
    bad[0, 2] = V
    with pytest.raises(ValueError, match="outside the vocabulary"):
        causal_lm_loss(h, w, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lm_loss(h, w, labels, chunk_size=0)


def test_default_chunk_size_bounds_chunk_logits():
    assert default_chunk_size(151_936) * 151_936 <= 1 << 24
    assert default_chunk_size(151_936) >= 100
    assert default_chunk_size(10) > 1000
