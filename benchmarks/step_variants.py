"""Variants of loratune's training step on the throughput benchmark's own micro-batches, alternating in one process:
forward + backward of the timed steps of ``train_throughput.py``'s plan (packed as loratune packs them), tokens/s
and the CPU share (CPU seconds / wall seconds; 2.0 = both cores busy all the time).

Variants (``--variants``, comma-separated; the default runs all):

* ``full``: the training path as ``train_throughput.py`` runs it (blocked CPU attention, compile, malloc_trim);
* ``notrim``: without ``malloc_trim`` after each micro-batch;
* ``sdpa``: SDPA once per example instead of the blocked CPU attention kernel.

The OpenMP wait policy is a process-wide setting: compare it by running the script twice,

    PYTHONPATH=src python benchmarks/step_variants.py --variants full                  # idle machine: spin
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python benchmarks/step_variants.py --variants full

``--busy`` keeps a second 2-thread job (bf16 GEMMs in a loop, spinning OpenMP threads) running beside the
measurement: the shared-machine case that loratune's PASSIVE default is for.

``--ce`` instead times the softmax-gradient part of one cross-entropy chunk ([110, 151936] bf16 logits), the
mixed-dtype way (``torch.sub(bf16, fp32)``, division into a bf16 output) against loratune's (one upcast copy, then
in place in fp32).

Needs the plan that ``train_throughput.py`` writes (run it, or its ``--quick``, once).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import loratune  # noqa: F401  (before torch, as the CLI: its OpenMP wait-policy default applies)
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_setup as bs  # noqa: E402


def ce_chunk(threads: int) -> None:
    torch.set_num_threads(threads)
    raw = torch.randn(110, 151936).bfloat16()

    def mixed():
        m = raw.amax(-1, keepdim=True).float()
        e = torch.sub(raw, m)
        norm = e.exp_().sum(-1, keepdim=True)
        return torch.div(e, norm, out=torch.empty(e.shape, dtype=torch.bfloat16))

    def upcast():
        m = raw.amax(-1, keepdim=True).float()
        e = raw.float().sub_(m)
        norm = e.exp_().sum(-1, keepdim=True)
        return e.div_(norm).to(torch.bfloat16)

    times = {"mixed dtypes": [], "upcast copy + in place": []}
    for i in range(25):
        for k, f in times.items():
            t = time.perf_counter()
            (mixed if k == "mixed dtypes" else upcast)()
            if i >= 5:
                f.append(time.perf_counter() - t)
    diff = (mixed().float() - upcast().float()).abs().max().item()
    print(f"softmax gradient of one [110, 151936] chunk, {threads} threads, median of 20 (max difference {diff:.2g}):")
    for k, v in times.items():
        print(f"  {k}: {1e3 * statistics.median(v):.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="full,notrim,sdpa")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ce", action="store_true", help="time one cross-entropy chunk instead")
    ap.add_argument("--busy", action="store_true", help="run a competing 2-thread GEMM loop alongside")
    ap.add_argument("--cache-dir", default="/tmp/loratune-bench")
    a = ap.parse_args()
    if a.ce:
        return ce_chunk(a.threads)
    if a.busy:
        import subprocess

        hog = ("import time, torch; torch.set_num_threads(2); x = torch.randn(1024, 1024)\n"
               "while True:\n    [x @ x for _ in range(20)]; time.sleep(0.01)")
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        competitor = subprocess.Popen([sys.executable, "-c", hog], env=env)
        try:
            return measure(a)
        finally:
            competitor.kill()
    measure(a)


def measure(a: argparse.Namespace) -> None:
    import loratune.attention as attention
    import loratune.train as lt
    from loratune.compile import compile_regions
    from loratune.config import LoraConfig
    from loratune.data import PackedBatchSampler, PackingCollator, load_examples
    from loratune.inject import inject_adapter
    from loratune.models import load_model, load_tokenizer

    torch.set_num_threads(a.threads)
    plan = json.loads((Path(a.cache_dir) / "plan.json").read_text())
    tok = load_tokenizer(plan["model"])
    examples = load_examples(plan["data"], tok, max_seq_len=plan["max_seq_len"])
    model = load_model(plan["model"], dtype=torch.bfloat16)
    inject_adapter(model, LoraConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, target_modules=bs.TARGETS))
    attention.use_varlen_attention(model)
    compile_regions(model)
    model.config.use_cache = False
    model.train()
    budget = plan["micro"] * plan["max_seq_len"]
    collate = PackingCollator(budget)
    steps = []
    for step in plan["steps"]:
        packs = PackedBatchSampler([len(examples[i]) for i in step], budget, seed=0,
                                   max_examples=plan["micro"]).batches(0)
        steps.append([collate([examples[step[j]] for j in pack]) for pack in packs])
    device = torch.device("cpu")
    trim = lt.release_free_memory

    def configure(v: str) -> None:
        lt.release_free_memory = (lambda d: None) if v == "notrim" else trim
        attention.BLOCKED_ON_CPU = v != "sdpa"

    names = a.variants.split(",")
    wall = {v: [] for v in names}
    cpu = {v: [] for v in names}
    for rep in range(a.repeats + 1):  # repeat 0: warm-up on the plan's warm-up step
        for v in (names if rep % 2 == 0 else names[::-1]):
            configure(v)
            t, c = time.perf_counter(), time.process_time()
            for micro in (steps[1:] if rep else steps[:1]):
                lt.accumulate_gradients(model, micro, device, torch.bfloat16)
                model.zero_grad(set_to_none=True)
            if rep:
                wall[v].append(time.perf_counter() - t)
                cpu[v].append(time.process_time() - c)
    configure("full")
    tokens = sum(int(mb["input_ids"].numel()) for micro in steps[1:] for mb in micro)
    print(f"{len(steps) - 1} timed steps, {tokens:,} tokens, {a.threads} threads, {a.repeats} alternating repeats, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    for v in names:
        w = statistics.median(wall[v])
        print(f"  {v}: {tokens / w:.1f} tokens/s (runs {', '.join(f'{tokens / x:.1f}' for x in wall[v])}), "
              f"CPU share {statistics.median(cpu[v]) / w:.2f}")


if __name__ == "__main__":
    main()
