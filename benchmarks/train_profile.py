"""Where loratune's training time goes: torch.profiler over one micro-batch (forward + backward) of the training
path (varlen attention, fused LoRA, chunked CE, regional compile), ops grouped by what they do.

    PYTHONPATH=src python benchmarks/train_profile.py [--threads 2] [--rows 33,45,13,21] [--top 15]
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_setup as bs  # noqa: E402

GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


ATTENTION = {"aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data", "aten::masked_fill_"}


def category(name: str, shapes: list, vocab: int, rank: int) -> str:
    dims = [tuple(s) for s in shapes if isinstance(s, (list, tuple))]
    if any(vocab in s for s in dims):
        return "LM head + chunked CE (labelled positions)"
    if "scaled_dot_product" in name or name in ATTENTION:
        return "attention (per example)"
    if name in GEMMS:
        if any(rank in s for s in dims if len(s) == 2):
            return "LoRA matmuls (rank 8)"
        return "frozen-base matmuls"
    if name.startswith(("cpp_fused", "Torch-Compiled", "CompiledFunction", "## Call CompiledFxGraph")) or \
            "inductor" in name.lower():
        return "compiled norms/MLP kernels"
    return "other ops (copies, rotary, residuals, casts, ...)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--rows", default="", help="example indices to pack (default: 4 examples near 400 tokens)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--only", default="", help="list top ops of categories containing this text")
    ap.add_argument("--cache-dir", default="/tmp/loratune-bench")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import loratune.train as lt
    from loratune.attention import use_varlen_attention
    from loratune.compile import compile_available, compile_regions
    from loratune.config import LoraConfig
    from loratune.data import PackingCollator, load_examples
    from loratune.inject import inject_adapter
    from loratune.models import load_model, load_tokenizer

    cache = bs.prepare(Path(a.cache_dir), a.examples)
    tok = load_tokenizer(str(cache / "model"))
    data = load_examples(cache / f"train-{a.examples}-0.jsonl", tok, max_seq_len=1024)
    if a.rows:
        idx = [int(i) for i in a.rows.split(",")]
    else:
        idx = sorted(range(len(data)), key=lambda i: abs(len(data[i]) - 400))[:4]
    batch = PackingCollator()([data[i] for i in idx])
    model = load_model(str(cache / "model"), dtype=torch.bfloat16)
    inject_adapter(model, LoraConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, target_modules=bs.TARGETS))
    use_varlen_attention(model)
    device = torch.device("cpu")
    if compile_available(device):
        compile_regions(model)
    model.train()

    def step():
        with lt.autocast(device, torch.bfloat16):
            loss, _ = lt.batch_loss(model, batch, device)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t
    vocab = model.config.vocab_size
    cats: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    for e in prof.key_averages(group_by_input_shape=True):
        if e.self_cpu_time_total <= 0:
            continue
        shapes = str(e.input_shapes)
        c = category(e.key, e.input_shapes, vocab, bs.LORA_R)
        cats[c] += e.self_cpu_time_total / 1e6
        ops[(c, e.key, shapes[:70])] += e.self_cpu_time_total / 1e6
    total = sum(cats.values())
    tokens = batch["input_ids"].shape[1]
    print(f"\none micro-batch: {len(idx)} packed examples {[len(data[i]) for i in idx]} = {tokens} tokens; "
          f"{a.threads} threads; forward + backward {wall:.2f} s wall under the profiler "
          f"(self time of the main thread's ops: {total:.2f} s)\n")
    print("| where | seconds | share |\n|---|---:|---:|")
    for c, sec in cats.most_common():
        print(f"| {c} | {sec:.2f} | {100 * sec / total:.0f}% |")
    print(f"\n| top ops | seconds |\n|---|---:|")
    for (c, name, shapes), sec in [x for x in ops.most_common() if a.only in x[0][0]][: a.top]:
        print(f"| {name} {shapes} | {sec:.2f} |")


if __name__ == "__main__":
    main()
