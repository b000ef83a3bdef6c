"""What each technique of loratune's training path is worth: one micro-batch, forward + backward, with one technique
switched off at a time, variants alternating in one process (medians of wall and CPU time), plus the activation
memory autograd keeps for backward (bytes of saved tensors, parameters excluded, each storage counted once).

Techniques (all on in ``full``):

* ``varlen``: per-example attention for packed rows (off: transformers' SDPA with the block-diagonal mask);
* ``fused``: the fused LoRA autograd Function (off: the unfused autograd expression);
* ``head``: LM head only at labelled positions, chunked CE (off: full logits at every position, upcast to fp32,
  ``F.cross_entropy``: what ``model(..., labels=...)`` does);
* ``compile``: regional torch.compile of norms and MLPs (off: eager).

    PYTHONPATH=src python benchmarks/train_ablation.py [--threads 1] [--repeats 3] [--rows 33,45,13,21]

One thread by default: on a shared machine CPU time at one thread is the steadiest measure of work; the effects
under two threads are reported by ``train_throughput.py`` end to end.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_setup as bs  # noqa: E402

TECHNIQUES = ("varlen", "fused", "head", "compile")


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", type=int, default=64, help="synthetic data set size (rows index into it)")
    ap.add_argument("--rows", default="33,45,13,21", help="example indices packed into the micro-batch")
    ap.add_argument("--cache-dir", default="/tmp/loratune-bench")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import loratune.train as lt
    from loratune.attention import use_varlen_attention
    from loratune.compile import compile_available, compile_regions, uncompile
    from loratune.config import LoraConfig
    from loratune.data import PackingCollator, load_examples
    from loratune.inject import inject_adapter
    from loratune.layers import LoraLayer
    from loratune.models import load_model, load_tokenizer

    cache = bs.prepare(Path(a.cache_dir), a.examples)
    tok = load_tokenizer(str(cache / "model"))
    data = load_examples(cache / f"train-{a.examples}-0.jsonl", tok, max_seq_len=1024)
    rows = [data[int(i)] for i in a.rows.split(",")]
    batch = PackingCollator()(rows)
    model = load_model(str(cache / "model"), dtype=torch.bfloat16)
    inject_adapter(model, LoraConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, target_modules=bs.TARGETS))
    model.train()
    params = list(model.parameters())
    device = torch.device("cpu")
    head_weight = lt.lm_head_weight
    can_compile = compile_available(device)

    def configure(off: set[str]) -> None:
        model.set_attn_implementation("sdpa")
        if "varlen" not in off:
            use_varlen_attention(model)
        LoraLayer.fused = "fused" not in off
        lt.lm_head_weight = (lambda m: (None, None)) if "head" in off else head_weight
        uncompile(model)
        if "compile" not in off and can_compile:
            compile_regions(model)

    def forward():
        with lt.autocast(device, torch.bfloat16):
            return lt.batch_loss(model, batch, device)[0]

    variants = {"full (all techniques)": set(), **{f"without {t}": {t} for t in TECHNIQUES},
                "straightforward (all off)": set(TECHNIQUES)}
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    mem = {}
    names = list(variants)
    for rep in range(a.repeats + 1):
        for v in (names if rep % 2 == 0 else names[::-1]):
            configure(variants[v])
            if rep == 0:  # warm-up (compiles), and the activation memory
                forward().backward()
                model.zero_grad(set_to_none=True)
                mem[v] = saved_bytes(forward, params)
                continue
            t, c = time.perf_counter(), time.process_time()
            forward().backward()
            model.zero_grad(set_to_none=True)
            wall[v].append(time.perf_counter() - t)
            cpu[v].append(time.process_time() - c)
    configure(set())
    tokens = batch["input_ids"].shape[1]
    print(f"\nmicro-batch: {len(rows)} packed examples, {tokens} tokens ({[len(r) for r in rows]}); {a.threads} "
          f"thread(s), {a.repeats} alternating repeats, forward + backward, bf16 weights + autocast"
          f"{'' if can_compile else '; torch.compile unavailable: compile variants are eager'}\n")
    print("| variant | wall s (median) | CPU s (median) | CPU time vs full | saved activations, MiB |")
    print("|---|---:|---:|---:|---:|")
    full = statistics.median(cpu[names[0]])
    for v in names:
        c = statistics.median(cpu[v])
        print(f"| {v} | {statistics.median(wall[v]):.2f} | {c:.2f} | {c / full:.2f}× | {mem[v] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
