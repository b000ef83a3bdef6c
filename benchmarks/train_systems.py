"""The three training systems of ``train_throughput.py``, each run in its own process on the same plan.

A plan (JSON, written by the driver) names the model dir, the data file, the optimizer steps (lists of example
indices; step 0 is the warm-up) and the micro-batch size. Every system trains the same LoRA (r=8, alpha=16,
dropout 0, q/k/v/o) with AdamW (lr 2e-4), gradient clipping at 1.0, and the same examples per optimizer step;
it prints one JSON line: per-step seconds, real (non-padding) tokens and scored tokens, peak RSS.

* ``loratune``: loratune's training path (``loratune.train``): packed rows of at most ``micro`` examples and
  ``micro × 1024`` tokens (best-fit, ``PackedBatchSampler``), ``accumulate_gradients`` (decoder without LM head,
  chunked CE at labelled positions), per-example attention, fused LoRA layers, bf16 weights, bf16 autocast, and
  (as in ``recipes/qwen3-0.6b-lora.yaml``; ``--no-compile`` to turn off) the regional torch.compile of norms and
  MLPs, whose compiling happens in the untimed warm-up step.
* ``peft_trainer``: PEFT ``get_peft_model`` + ``transformers.Trainer`` (CPU, ``bf16``), micro-batches of
  ``micro`` examples padded to their longest, completion-only labels (-100 on prompt and padding), gradient
  accumulation to the same examples per step, in the plan's length-grouped order.
* ``peft_loop``: the same PEFT model in a plain PyTorch loop over the same padded micro-batches.

The PEFT options (weight dtype, autocast, attention implementation) come from ``--peft-config``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if len(sys.argv) > 1 and sys.argv[1] == "loratune":
    # Before torch, as `loratune train` does: loratune's OpenMP wait-policy default (spin on an idle machine, sleep
    # on a busy one; see loratune/__init__.py) applies to the loratune system. The PEFT systems get torch's default.
    import loratune  # noqa: F401

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_setup as bs  # noqa: E402

PEFT_CONFIGS = {
    "bf16-autocast-sdpa": dict(dtype=torch.bfloat16, autocast=True, attn="sdpa"),
    "bf16-sdpa": dict(dtype=torch.bfloat16, autocast=False, attn="sdpa"),
    "fp32-autocast-sdpa": dict(dtype=torch.float32, autocast=True, attn="sdpa"),
    "bf16-autocast-eager": dict(dtype=torch.bfloat16, autocast=True, attn="eager"),
}


LOAD_PEAK: list[float] = []


def reset_peak_rss() -> None:
    """Remember the peak RSS so far (model loading) and reset it to the current RSS (Linux ``clear_refs`` 5), so
    that the final peak is the training phase's."""
    LOAD_PEAK.append(vm_hwm_mib() or 0.0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def vm_hwm_mib() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


PROBES: list[float] = []


def probe() -> None:
    """bf16 GEMM rate right now (about a second, untimed): the machine's speed while this step runs."""
    PROBES.append(bs.gemm_peak(seconds=1.0))


def load_examples(plan: dict) -> list:
    from loratune.data import load_examples as load
    from loratune.models import load_tokenizer

    tok = load_tokenizer(plan["model"])
    return load(plan["data"], tok, max_seq_len=plan["max_seq_len"]), tok


def scored(example) -> int:
    """Positions with a target (shifted labels): every labelled token but the first of the example."""
    return int((example.labels[1:] != -100).sum())


def result(step_seconds: list[float], steps: list[list[int]], examples, extra: dict) -> dict:
    return {"step_seconds": step_seconds,
            "step_tokens": [sum(len(examples[i]) for i in s) for s in steps],
            "step_scored": [sum(scored(examples[i]) for i in s) for s in steps],
            "step_lengths": [[len(examples[i]) for i in s] for s in steps],
            **extra}


# ------------------------------------------------------------------------------------------------ loratune
def run_loratune(plan: dict, compile_blocks: bool) -> dict:
    from loratune.attention import use_varlen_attention
    from loratune.compile import compile_available, compile_regions
    from loratune.config import LoraConfig
    from loratune.data import PackedBatchSampler, PackingCollator
    from loratune.inject import inject_adapter
    from loratune.models import load_model
    from loratune.train import accumulate_gradients

    examples, _ = load_examples(plan)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    model = load_model(plan["model"], dtype=torch.bfloat16)
    inject_adapter(model, LoraConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, lora_dropout=0.0, target_modules=bs.TARGETS))
    use_varlen_attention(model)
    compiled = compile_blocks and compile_available(device) and compile_regions(model)
    model.config.use_cache = False
    model.train()
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    budget = plan["micro"] * plan["max_seq_len"]
    collate = PackingCollator(budget)
    reset_peak_rss()
    times, rows = [], []
    for k, step in enumerate(plan["steps"]):
        if k:
            probe()
        t = time.perf_counter()
        packs = PackedBatchSampler([len(examples[i]) for i in step], budget, seed=0,
                                   max_examples=plan["micro"]).batches(0)
        micro = [collate([examples[step[j]] for j in pack]) for pack in packs]
        accumulate_gradients(model, micro, device, torch.bfloat16)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        rows.append(len(micro))
    return result(times, plan["steps"], examples, {"load_s": load_s, "micro_batches": rows,
                                                   "compiled_modules": int(compiled or 0)})


# ----------------------------------------------------------------------------------------------------- PEFT
def peft_model(plan: dict, cfg: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plan["model"], dtype=cfg["dtype"], attn_implementation=cfg["attn"])
    model.config.use_cache = False
    lora = LoraConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, lora_dropout=0.0, target_modules=bs.TARGETS,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class PadCollator:
    """Right-pads to the longest example; labels -100 on the prompt (already in the examples) and on padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, x in enumerate(items):
            n = len(x["input_ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = x["input_ids"], x["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def flat_items(plan: dict, examples) -> list[dict]:
    """The plan's examples in order (steps back to back, each step's examples longest first)."""
    items = []
    for step in plan["steps"]:
        for i in sorted(step, key=lambda i: -len(examples[i])):
            items.append({"input_ids": examples[i].input_ids.long(), "labels": examples[i].labels.long()})
    return items


def run_peft_trainer(plan: dict, cfg: dict) -> dict:
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    examples, tok = load_examples(plan)
    t0 = time.perf_counter()
    model = peft_model(plan, cfg)
    load_s = time.perf_counter() - t0
    items = flat_items(plan, examples)
    accum = len(plan["steps"][0]) // plan["micro"]
    starts: list[float] = []
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            reset_peak_rss()

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step:
                probe()
            starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - starts[-1])

    class InOrder(Trainer):
        # The plan's order already is group_by_length's (longest-first within one mega-batch, steps shuffled):
        # keep it so that every system sees the same examples in every optimizer step.
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=plan["micro"], gradient_accumulation_steps=accum,
            max_steps=len(plan["steps"]), learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=1.0, bf16=cfg["autocast"], use_cpu=True, train_sampling_strategy="group_by_length",
            logging_strategy="no", save_strategy="no", report_to=[], dataloader_num_workers=0,
            remove_unused_columns=False, optim="adamw_torch", seed=0, disable_tqdm=True)
        trainer = InOrder(model=model, args=args, train_dataset=items, data_collator=PadCollator(tok.pad_token_id),
                          callbacks=[Clock()])
        trainer.train()
    return result(times, plan["steps"], examples, {"load_s": load_s, "config": cfg_name(cfg)})


def run_peft_loop(plan: dict, cfg: dict) -> dict:
    import contextlib

    examples, tok = load_examples(plan)
    t0 = time.perf_counter()
    model = peft_model(plan, cfg)
    model.train()
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    collate = PadCollator(tok.pad_token_id)
    items = flat_items(plan, examples)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg["autocast"] else contextlib.nullcontext
    reset_peak_rss()
    times, pos = [], 0
    for k, step in enumerate(plan["steps"]):
        if k:
            probe()
        t = time.perf_counter()
        mine, pos = items[pos: pos + len(step)], pos + len(step)
        micro = [collate(mine[j: j + plan["micro"]]) for j in range(0, len(mine), plan["micro"])]
        n_items = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        for mb in micro:
            with amp():
                loss = model(**mb, num_items_in_batch=n_items).loss  # summed over tokens / n_items
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return result(times, plan["steps"], examples, {"load_s": load_s, "config": cfg_name(cfg)})


def cfg_name(cfg: dict) -> str:
    return next(k for k, v in PEFT_CONFIGS.items() if v == cfg)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["loratune", "peft_trainer", "peft_loop"])
    ap.add_argument("plan")
    ap.add_argument("--peft-config", default="bf16-autocast-sdpa", choices=list(PEFT_CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="loratune: no regional torch.compile")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    plan = json.loads(Path(a.plan).read_text())
    load_before, cpu0, wall0 = loadavg(), time.process_time(), time.perf_counter()
    if a.system == "loratune":
        out = run_loratune(plan, not a.no_compile)
    elif a.system == "peft_trainer":
        out = run_peft_trainer(plan, PEFT_CONFIGS[a.peft_config])
    else:
        out = run_peft_loop(plan, PEFT_CONFIGS[a.peft_config])
    train_peak = vm_hwm_mib() or bs.peak_rss_mib()
    out.update(gemm_probes=PROBES, loadavg=[load_before, loadavg()],
               cpu_share=(time.process_time() - cpu0) / (time.perf_counter() - wall0))
    out.update(system=a.system, threads=a.threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
               train_peak_rss_mib=train_peak,
               peak_rss_mib=max([train_peak, *LOAD_PEAK]), load_peak_rss_mib=max(LOAD_PEAK, default=None))
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
