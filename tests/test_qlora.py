"""QLoRA end to end on the tiny Qwen3 fixture: NF4 base (loratune.quant) + LoRA training + merge/export + adapters.

The unit-level NF4 properties (Gaussian round trip, bytes, linear/grad exactness) live in test_quant.py; here the
whole job is exercised the way a user runs it. Every tolerance below was measured on this fixture
(``tiny_run_dir``: hidden 64, init std 0.2, all 14 projections quantized since 64×64 ≥ min_size 1024) with
bitsandbytes 0.50.2, torch 2.13 CPU, seeds 0-2, 10 steps at lr 1e-2; the measured values are quoted next to
each bound.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import needs_backend, randomize_lora_B
from loratune import get_lora_model, merge_and_unload, quant
from loratune.cli import main
from loratune.config import LoraConfig
from loratune.models import load_model, load_with_adapters, quantize_base
from loratune.train import TrainConfig, evaluate_loss, load_data, train


STEPS, LR = 10, 1e-2


def _cfg(d: Path, quantize: str = "nf4", out: str = "out", **kw) -> TrainConfig:
    base = dict(model=str(d / "model"), train_data=str(d / "train.jsonl"), eval_data=str(d / "eval.jsonl"),
                quantize=quantize, max_steps=STEPS, lr=LR, batch_size=8, warmup_ratio=0.0, eval_generate=0, threads=1,
                output_dir=str(d / out),
                lora=LoraConfig(r=8, lora_alpha=16))  # the default targets: q/k/v/o; the MLP stays NF4, unadapted
    base.update(kw)
    return TrainConfig(**base)


def _quiet(*_args) -> None:
    pass


def _eval_loss(cfg: TrainConfig, model, tok) -> float:
    _, eval_set, _ = load_data(cfg, tok)
    return evaluate_loss(model, eval_set, cfg, tok, torch.device("cpu"), None)


def _probe(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(0))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# --------------------------------------------------------------------------------------------- quantize / dequantize
@needs_backend
def test_tiny_model_nf4_round_trip_error_bounds(tiny_run_dir):
    dense = load_model(str(tiny_run_dir / "model"), dtype=torch.float32)
    model = load_model(str(tiny_run_dir / "model"), dtype=torch.float32)
    report = quant.quantize_model(model)
    assert report["quantized"] == 14 and set(report["skipped"]) == {"lm_head"}  # 7 projections × 2 layers; the tied
    # head (= the embedding) stays dense
    assert model.get_input_embeddings().weight.dtype == torch.float32
    ref = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        if not quant.is_quantized(p):
            assert torch.equal(p, ref[name])
            continue
        w, d = ref[name].detach(), quant.dequantize(p)
        assert d.shape == w.shape == quant.logical_shape(p) and d.dtype == torch.float32
        rel = ((d - w).norm() / w.norm()).item()
        assert 0.05 < rel < 0.10, (name, rel)  # measured 0.090-0.094 (std-0.2 Gaussian weights, 4 bits)
        err, absmax = (d - w).abs().reshape(-1, 64), w.abs().reshape(-1, 64).amax(dim=1, keepdim=True)
        assert (err <= 0.17 * absmax + 1e-6).all(), name  # NF4's widest gap is 0.152 of the block absmax
    # whole model: the 4-bit base alone moves the logits by 39% (relative Frobenius). That is 4× test_quant's 0.10 on
    # the default-init tiny model, because this fixture's 10× larger weights (init std 0.2) amplify each layer's 9%
    # error through attention and the MLP. It is what the adapter trains on top of.
    ids = _probe()
    y, yq = _logits(dense, ids), _logits(model, ids)
    assert ((yq - y).norm() / y.norm()).item() < 0.5


@needs_backend
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_nf4_base_releases_the_checkpoint_memory_map(tiny_run_dir):
    # from_pretrained memory-maps model.safetensors; once the linears are NF4, the dense remainder is copied so that
    # the map (and the resident pages of the bf16 weights that were quantized) is released
    import gc

    ckpt = str((tiny_run_dir / "model" / "model.safetensors").resolve())
    mapped = lambda: any(line.rstrip().endswith(ckpt) for line in open("/proc/self/maps"))
    dense, _ = load_with_adapters(str(tiny_run_dir / "model"), dtype=torch.float32)  # the file's dtype: mapped
    assert mapped()
    del dense
    gc.collect()
    model, _ = load_with_adapters(str(tiny_run_dir / "model"), dtype=torch.float32, quantize="nf4")
    gc.collect()
    assert not mapped()
    assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)  # still tied
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


# --------------------------------------------------------------------------------------------- training
@needs_backend
def test_nf4_training_lowers_loss_like_bf16_lora(tiny_run_dir):
    d = tiny_run_dir
    q = train(_cfg(d, "nf4", "nf4"), progress=False, log=_quiet)
    p = train(_cfg(d, "none", "lora", dtype="bf16"), progress=False, log=_quiet)
    rows = [json.loads(line) for line in (q.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and all(map(torch.isfinite, torch.tensor(losses)))
    # step 1's loss is the base model's (B = 0); measured 6.61 → eval 3.09-3.19 after 10 steps
    assert q.eval_loss < 0.6 * losses[0] and sum(losses[-3:]) / 3 < 0.6 * losses[0]
    # QLoRA learns about as well as LoRA on a bf16 base: measured eval loss 3.09-3.19 vs 3.01-3.15
    assert abs(q.eval_loss - p.eval_loss) < 0.25
    # the adapter file is the same PEFT format whatever the base precision was
    cq = json.loads((q.adapter_dir / "adapter_config.json").read_text())
    cp = json.loads((p.adapter_dir / "adapter_config.json").read_text())
    assert cq == cp and cq["peft_type"] == "LORA" and "quantization_config" not in cq
    tq, tp = load_file(q.adapter_dir / "adapter_model.safetensors"), load_file(p.adapter_dir / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in tq.items()} == {k: (v.shape, v.dtype) for k, v in tp.items()}
    assert len(tq) == 16 and all(v.dtype == torch.float32 for v in tq.values())  # 4 modules × 2 layers × (A, B)
    assert all(k.startswith("base_model.model.model.layers.") for k in tq)


# --------------------------------------------------------------------------------------------- adapters across bases
@needs_backend
def test_adapter_from_nf4_base_loads_on_fp32_and_bf16_bases(tiny_run_dir):
    d = tiny_run_dir
    cfg = _cfg(d, "nf4", "nf4")
    adapter = [str(train(cfg, progress=False, log=_quiet).adapter_dir)]
    model_dir, ids = str(d / "model"), _probe()
    results = {}
    for key, quantize, dtype, adapters in [("nf4+A", "nf4", torch.float32, adapter), ("nf4", "nf4", torch.float32, []),
                                           ("fp32+A", "none", torch.float32, adapter), ("fp32", "none", torch.float32, []),
                                           ("bf16+A", "none", torch.bfloat16, adapter)]:
        model, tok = load_with_adapters(model_dir, adapters, dtype=dtype, quantize=quantize)
        results[key] = (_logits(model, ids), _eval_loss(cfg, model, tok))
    logit, loss = {k: v[0] for k, v in results.items()}, {k: v[1] for k, v in results.items()}
    dev = lambda a, b: (logit[a] - logit[b]).abs().max().item()

    # the adapter moves the outputs much more than the base precision does (measured 7.0-7.3 vs 3.2-3.5)
    assert dev("nf4+A", "nf4") > 1.5 * dev("fp32+A", "nf4+A")
    # on a dense base the adapted model differs from the QLoRA model by the base's own NF4 error, no more
    # (measured: 0.92-0.96× the fp32-vs-NF4 base deviation, for fp32 and for bf16 bases)
    for key in ("fp32+A", "bf16+A"):
        assert dev(key, "nf4+A") <= 1.25 * dev("fp32", "nf4"), key
    # and what it learned carries over: eval loss 6.29 → 3.08-3.15 on fp32, vs 6.10 → 3.11-3.19 on NF4
    for key in ("fp32+A", "bf16+A"):
        assert abs(loss[key] - loss["nf4+A"]) < 0.15, (key, loss)
        assert loss[key] < loss["fp32"] - 2.0, (key, loss)

    # real PEFT loads it on an fp32 base and computes the same function as loratune
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter[0])
    torch.testing.assert_close(_logits(peft_model, ids), logit["fp32+A"], rtol=1e-4, atol=1e-4)

    # and the other way round: an adapter trained on a bf16 base loads on an NF4 base
    bf16_adapter = str(train(_cfg(d, "none", "lora", dtype="bf16"), progress=False, log=_quiet).adapter_dir)
    model, tok = load_with_adapters(model_dir, [bf16_adapter], quantize="nf4")
    assert _eval_loss(cfg, model, tok) < results["nf4"][1] - 2.0


# --------------------------------------------------------------------------------------------- library merge
def _qlora_model(model_dir: Path):
    """The fixture on an NF4 base with random adapters on q/k/v/o only, so the MLP stays NF4 and unadapted."""
    model = load_model(str(model_dir), dtype=torch.float32)
    quantize_base(model, "nf4")
    torch.manual_seed(0)  # A's init: the same adapter every call
    return randomize_lora_B(get_lora_model(model, LoraConfig(r=8, lora_alpha=16)))


@needs_backend
def test_merge_and_unload_dequantizes_layers_without_adapter(tiny_run_dir):
    model = _qlora_model(tiny_run_dir / "model")
    ids = _probe()
    y_qlora = _logits(model, ids)
    plain = model.merge_and_unload()
    assert not any(quant.is_quantized(p) for p in plain.parameters())
    mlp, attn = plain.model.layers[0].mlp.up_proj.weight, plain.model.layers[0].self_attn.q_proj.weight
    assert mlp.dtype == attn.dtype == torch.float32 and mlp.shape == (128, 64) and not mlp.requires_grad
    # the merge is exact: the plain fp32 model computes the QLoRA model (same tolerance as the CLI's fp32 merge)
    torch.testing.assert_close(_logits(plain, ids), y_qlora, rtol=1e-4, atol=1e-4)

    kept = merge_and_unload(_qlora_model(tiny_run_dir / "model").model, dequantize=False)
    assert quant.is_quantized(kept.model.layers[0].mlp.up_proj.weight)
    assert not quant.is_quantized(kept.model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(_logits(kept, ids), y_qlora, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- CLI: train + merge
def _cli(capsys, *args) -> str:
    """``loratune ARGS`` in this process (the same entry point as the console script; tests/test_cli.py covers the
    subprocess plumbing): asserts exit code 0 and returns stdout."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@needs_backend
def test_cli_train_and_merge_nf4(tiny_run_dir, capsys):
    from transformers import AutoModelForCausalLM

    d = tiny_run_dir
    model_dir, out = str(d / "model"), d / "out"
    _cli(capsys, "train", "--model", model_dir, "--train-data", str(d / "train.jsonl"), "--eval-data",
         str(d / "eval.jsonl"), "--quantize", "nf4", "--max-steps", str(STEPS), "--lr", str(LR), "--batch-size", "8",
         "--warmup-ratio", "0", "--eval-generate", "0", "--threads", "1", "--output-dir", str(out), "--no-progress")
    assert "quantize: nf4" in (out / "train_config.yaml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["eval_loss"] < 4.0  # base ≈ 6.1
    adapter = str(out / "adapter")

    # merge onto the NF4 base, written in the default save dtype (bf16)
    merged = d / "merged"
    stdout = _cli(capsys, "merge", "--model", model_dir, "--adapter", adapter, "--quantize", "nf4", "--output",
                  str(merged))
    m = re.search(r"max \|logit difference\| merged vs unmerged on a probe batch: (\S+) \(max \|logit\| (\S+)\)",
                  stdout)
    assert m, stdout
    printed_dev, printed_scale = float(m.group(1)), float(m.group(2))
    assert printed_dev <= 0.05 * printed_scale  # measured 0.11-0.21 of 6.1-7.6 (1.8-2.9%)

    # a plain transformers checkpoint: every tensor dense bf16 with the original shapes (no packed NF4 codes)
    tensors = load_file(merged / "model.safetensors")
    original = load_file(d / "model" / "model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in original.items()}
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert plain.dtype == torch.bfloat16 and not any(quant.is_quantized(p) for p in plain.parameters())

    # merged bf16 vs the unmerged QLoRA model (NF4 base + adapter, fp32 compute): within the bf16 cast's error
    qlora, _ = load_with_adapters(model_dir, [adapter], quantize="nf4")
    ids = _probe()
    y_qlora, y_merged = _logits(qlora, ids), _logits(plain, ids)
    dev, scale = (y_merged - y_qlora).abs().max().item(), y_qlora.abs().max().item()
    assert dev <= 0.05 * scale, (dev, scale)  # measured 1.8-2.9% of max |logit|
    assert (y_merged.argmax(-1) == y_qlora.argmax(-1)).float().mean() >= 0.9

    # the merge itself is exact: in fp32 the merged model is the QLoRA model (dequantized W + s·B·A)
    merged32 = d / "merged32"
    _cli(capsys, "merge", "--model", model_dir, "--adapter", adapter, "--quantize", "nf4", "--output", str(merged32),
         "--save-dtype", "fp32")
    plain32 = AutoModelForCausalLM.from_pretrained(merged32)
    torch.testing.assert_close(_logits(plain32, ids), y_qlora, rtol=1e-4, atol=1e-4)  # measured max 8.6e-6
    # the library's merge_and_unload gives the same plain model, every weight dense (no NF4 layer left behind)
    library = merge_and_unload(qlora).state_dict()
    assert not any(quant.is_quantized(p) for p in library.values())
    for k, v in plain32.state_dict().items():
        torch.testing.assert_close(library[k], v, rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------------------------- no backend
def test_missing_backend_is_a_one_line_error_with_exit_code_2(tiny_run_dir, monkeypatch, capsys):
    def no_bnb():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(quant, "_import_backend", no_bnb)
    d = tiny_run_dir
    code = main(["train", "--model", str(d / "model"), "--train-data", str(d / "train.jsonl"), "--quantize", "nf4",
                 "--max-steps", "1", "--output-dir", str(d / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("loratune train: error: QLoRA needs the bitsandbytes 4-bit backend")
    assert "pip install" in err[0] and "quantize: none" in err[0]
    assert not (d / "out").exists()

    code = main(["merge", "--model", str(d / "model"), "--adapter", str(d), "--quantize", "nf4", "--output",
                 str(d / "merged")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("loratune merge: error: QLoRA needs the bitsandbytes")
    assert not (d / "merged").exists()
