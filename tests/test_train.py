"""The training job end to end on a tiny real model: learning, outputs, resume after SIGKILL, divergence, bad data."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_run_dir, randomize_lora_B
from safetensors.torch import load_file, save_file

from loratune.adapters import PREFIX
from loratune.config import LoraConfig
from loratune.train import TrainConfig, lr_factor, train


def _cfg(d: Path, **kw) -> TrainConfig:
    base = dict(model=str(d / "model"), train_data=str(d / "train.jsonl"), eval_data=str(d / "eval.jsonl"),
                batch_size=8, max_steps=12, lr=5e-3, warmup_ratio=0.0, output_dir=str(d / "out"), threads=1, eval_generate=0,
                lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    base.update(kw)
    return TrainConfig(**base)


def _adapter(path: Path) -> dict:
    return load_file(path / "adapter_model.safetensors")


def test_training_lowers_loss_and_writes_outputs(tiny_run_dir):
    res = train(_cfg(tiny_run_dir, max_steps=30, lr=3e-2, eval_every=10, eval_generate=4, max_new_tokens=4), progress=False,
                log=lambda *a: None)
    out = res.output_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20, 30]
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"adapter_config.json", "adapter_model.safetensors"} == {p.name for p in (out / "adapter").iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["disabled"]["same_as_before"] is True
    assert set(res.report) == {"before", "after", "disabled"}
    assert not list((out).glob(".*tmp*"))


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.0) == pytest.approx(1 / 11)
    assert lr_factor(9, 10, 100, 0.0) == pytest.approx(10 / 11)
    assert lr_factor(10, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("packing", [True, False])
def test_grad_accumulation_equals_one_big_batch(tiny_run_dir, packing):
    """Two micro-batches of 4 examples give the same loss and LoRA gradients as one micro-batch of 8."""
    from loratune.data import PackingCollator, PaddingCollator, load_examples
    from loratune.inject import inject_adapter
    from loratune.models import load_model, load_tokenizer
    from loratune.train import accumulate_gradients

    tok = load_tokenizer(str(tiny_run_dir / "model"))
    examples = [load_examples(tiny_run_dir / "train.jsonl", tok)[i] for i in range(8)]
    collate = PackingCollator() if packing else PaddingCollator(tok.pad_token_id)
    model = load_model(str(tiny_run_dir / "model"))
    torch.manual_seed(0)
    inject_adapter(model, LoraConfig(r=4, target_modules="all-linear", init="kaiming"))
    randomize_lora_B(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    results = []
    for micro in ([collate(examples)], [collate(examples[:4]), collate(examples[4:])]):
        loss, tokens = accumulate_gradients(model, micro, torch.device("cpu"), None)
        results.append((loss, tokens, {n: p.grad.clone() for n, p in params.items()}))
        model.zero_grad(set_to_none=True)
    (l1, t1, g1), (l2, t2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-6)
    if packing:
        assert t1 == t2 == sum(len(e) for e in examples)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-6)  # fp32 summation-order noise


def _cli(*args, env=None):
    return [sys.executable, "-m", "loratune", "train", *args]


def _cli_args(d: Path, out: str, steps: int = 24):
    return ["--model", str(d / "model"), "--train-data", str(d / "train.jsonl"), "--eval-data", str(d / "eval.jsonl"),
            "--batch-size", "4", "--max-steps", str(steps), "--lr", "3e-3", "--threads", "1", "--save-every", "4",
            "--keep-last", "2", "--output-dir", out, "--no-progress", "--lora.lora_dropout", "0.1",
            "--lora.target_modules", "all-linear", "--lora.r", "4", "--eval-generate", "0"]


def test_resume_after_sigkill_gives_the_same_adapter(tiny_run_dir):
    d = tiny_run_dir
    ref = subprocess.run(_cli(*_cli_args(d, str(d / "ref"))), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    # Same run, killed with SIGKILL once a mid-run checkpoint exists, then resumed.
    proc = subprocess.Popen(_cli(*_cli_args(d, str(d / "killed"))), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = d / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "step-0000012" / "state.json").exists():
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (d / "killed" / "adapter").exists()
    res = subprocess.run(_cli(*_cli_args(d, str(d / "killed")), "--resume"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout
    want, got = _adapter(d / "ref" / "adapter"), _adapter(d / "killed" / "adapter")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert len(list(ckpts.glob("step-*"))) <= 2  # keep_last


def _resume_after_last_row(cfg: TrainConfig) -> None:
    """Resume the finished run ``cfg`` as if it had been killed just before writing its adapter: every metrics row
    is written, the newest checkpoint is some steps older (what a SIGKILL then leaves, without a subprocess)."""
    shutil.rmtree(Path(cfg.output_dir) / "adapter")
    train(cfg, resume=True, progress=False, log=lambda *a: None)


def _rows(metrics: Path) -> list[dict]:
    """The rows of ``metrics``, without the fields that depend on wall-clock time."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]


def test_resume_drops_metrics_rows_written_after_the_checkpoint(tiny_run_dir):
    """Steps after the checkpoint are recomputed on resume: their old rows go, so each step has one row, the
    same as the uninterrupted run's, and the final eval row comes once, at the end."""
    cfg = _cfg(tiny_run_dir, save_every=4, eval_every=4)
    train(cfg, progress=False, log=lambda *a: None)
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    want = _rows(metrics)
    with open(metrics, "a") as f:
        f.write('{"step": 13, "lo')  # a row torn by the kill
    _resume_after_last_row(cfg)
    got = _rows(metrics)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in got if "eval_loss" in r] == [4, 8, 12]
    assert got[-1].keys() == {"step", "eval_loss"}
    assert got == want
    assert not list(Path(cfg.output_dir).glob(".*tmp*"))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_resume_restores_trained_biases_and_modules_to_save(tmp_path, bias):
    """Trained biases and modules_to_save are part of the adapter: a resumed run must restore them too and end
    bit-identical to the uninterrupted run."""
    d = make_run_dir(tmp_path, attention_bias=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], bias=bias,
                      modules_to_save=["norm"])
    cfg = _cfg(d, lora=lora, save_every=4)
    train(cfg, progress=False, log=lambda *a: None)
    want = _adapter(Path(cfg.output_dir) / "adapter")
    _resume_after_last_row(cfg)
    got = _adapter(Path(cfg.output_dir) / "adapter")

    trained = {f"layers.{i}.self_attn.{m}_proj.base_layer.bias" for i in (0, 1) for m in "qv"} | {"norm.weight"}
    if bias == "all":
        trained |= {f"layers.{i}.self_attn.{m}_proj.bias" for i in (0, 1) for m in "ko"}
    assert {k for k in want if ".lora_" not in k} == {f"{PREFIX}model.{k}" for k in trained}
    base = load_file(d / "model" / "model.safetensors")
    for k in trained:  # they did train: a resume that skipped them would end elsewhere
        assert not torch.equal(want[f"{PREFIX}model.{k}"], base["model." + k.replace(".base_layer", "")]), k
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_run_dir):
    d = tiny_run_dir
    args = _cli_args(d, str(d / "run"), steps=4)
    args[args.index("--save-every") + 1] = "2"
    first = subprocess.run(_cli(*args[:]), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    ckpt = d / "run" / "checkpoints" / "step-0000002"
    before = {p.name: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    # Poison the base model, then resume a longer run: the next loss is NaN.
    weights = d / "model" / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("layers.0.mlp.down_proj.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    args[args.index("--max-steps") + 1] = "8"
    res = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 3
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("loratune train: error: loss became nan at step 3") and "step-0000002" in err
    after = {p.name: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize("content, words", [
    ('{"prompt": "a", "completion": "b"}\nnot json\n', "train.jsonl:2: "),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', "train.jsonl:1: "),
    ("", "train.jsonl"),
])
def test_bad_data_exit_code_2_and_nothing_written(tiny_run_dir, content, words):
    d = tiny_run_dir
    (d / "train.jsonl").write_text(content)
    res = subprocess.run(_cli(*_cli_args(d, str(d / "bad"))), capture_output=True, text=True, timeout=600)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("loratune train: error: ") and words in last
    assert not (d / "bad").exists()


def _packed_lora_model(d: Path, dtype):
    from loratune.data import PackingCollator, load_examples
    from loratune.inject import inject_adapter
    from loratune.models import load_model, load_tokenizer

    tok = load_tokenizer(str(d / "model"))
    examples = [load_examples(d / "train.jsonl", tok)[i] for i in range(8)]
    micro = [PackingCollator()(examples[:5]), PackingCollator()(examples[5:])]
    model = load_model(str(d / "model"), dtype=dtype)
    torch.manual_seed(0)
    inject_adapter(model, LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    randomize_lora_B(model)
    model.train()
    return model, micro


def _loss_and_grads(model, micro, fast: bool, amp):
    from loratune.attention import use_varlen_attention
    from loratune.layers import LoraLayer
    from loratune.train import accumulate_gradients

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.fused = fast
    model.set_attn_implementation("sdpa")  # transformers' block-diagonal mask for packed rows
    if fast:
        assert use_varlen_attention(model)
    loss, _ = accumulate_gradients(model, micro, torch.device("cpu"), amp)
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss, grads


def test_fast_path_matches_straightforward_fp32(tiny_run_dir):
    """Fused LoRA layers + per-example attention (the training path) against unfused LoRA layers + transformers'
    SDPA block-diagonal mask, on packed rows, fp32: same loss (rel 1e-5) and LoRA gradients (rtol 1e-4)."""
    model, micro = _packed_lora_model(tiny_run_dir, torch.float32)
    l0, g0 = _loss_and_grads(model, micro, False, None)
    l1, g1 = _loss_and_grads(model, micro, True, None)
    assert l1 == pytest.approx(l0, rel=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_fast_path_bf16_is_as_accurate_as_straightforward(tiny_run_dir):
    """bf16 weights under bf16 autocast: both paths carry bf16 rounding error (a few % relative L2 on LoRA
    gradients against fp32 math on the same weights); the fast path's error is no larger than 1.25× the
    straightforward path's, and its loss is within 1e-3 relative of fp32's."""
    import copy

    model, micro = _packed_lora_model(tiny_run_dir, torch.bfloat16)
    reference = copy.deepcopy(model).float()
    l_ref, g_ref = _loss_and_grads(reference, micro, False, None)
    errors = {}
    for fast in (False, True):
        loss, g = _loss_and_grads(model, micro, fast, torch.bfloat16)
        assert loss == pytest.approx(l_ref, rel=1e-3)
        errors[fast] = max(((g[n] - g_ref[n]).norm() / g_ref[n].norm()).item() for n in g_ref)
    assert errors[True] <= 1.25 * errors[False] + 1e-3, errors
