"""Where the unmerged adapter's decode overhead goes (``inference_overhead.py`` measures the total).

1. One adapted layer alone: a [1, 1, 1024] bf16 input through a plain ``nn.Linear`` (2048×1024, 1024×1024,
   1024×2048, bf16) and through a ``LoraLayer`` with an r=8 adapter, alternating call by call (median µs), and the
   ``LoraLayer`` call against a direct call of its inference function (the Python of the module call).
2. Greedy decoding with the KV cache on the Qwen3-0.6B benchmark model, token by token interleaved: the base, the
   unmerged adapter as loratune runs it (update in fp32 from cached casts), and a variant that computes the
   update in bf16 (cached bf16 Aᵀ and (s·B)ᵀ, one ``mm`` and one ``addmm_``); median paired time per token vs
   the base.
3. torch.profiler over interleaved decode steps: the ops' own time per token, base against unmerged.

    PYTHONPATH=src python benchmarks/decode_detail.py [--threads 2]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import loratune  # noqa: F401  (before torch, as the CLI)
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_setup as bs  # noqa: E402

import loratune.fused as fused  # noqa: E402
import loratune.layers as layers  # noqa: E402
from loratune.layers import LoraLayer  # noqa: E402


def one_layer() -> None:
    for out_f, in_f in ((2048, 1024), (1024, 1024), (1024, 2048)):
        lin = nn.Linear(in_f, out_f, bias=False).bfloat16()
        lay = LoraLayer(nn.Linear(in_f, out_f, bias=False).bfloat16())
        lay.add_adapter("a", r=bs.LORA_R, alpha=bs.LORA_ALPHA)
        lay.active = ["a"]
        lay.eval()
        for p in [*lin.parameters(), *lay.parameters()]:
            p.requires_grad_(False)
        x = torch.randn(1, 1, in_f, dtype=torch.bfloat16)
        A, B, s = lay.lora_A["a"], lay.lora_B["a"], lay.scaling["a"]
        calls = {"nn.Linear": lambda: lin(x), "LoraLayer": lambda: lay(x),
                 "inference function": lambda: fused.lora_linear_inference(lay._serving, x, lay.weight, None, A, B, s)}
        ts = {k: [] for k in calls}
        with torch.no_grad():
            for i in range(3000):
                for k, f in calls.items():
                    t = time.perf_counter()
                    f()
                    if i >= 200:
                        ts[k].append(time.perf_counter() - t)
        med = {k: 1e6 * statistics.median(v) for k, v in ts.items()}
        print(f"  {out_f}×{in_f}: nn.Linear {med['nn.Linear']:.1f} µs, LoraLayer {med['LoraLayer']:.1f} µs "
              f"(+{med['LoraLayer'] - med['nn.Linear']:.1f}), of which the module call's Python "
              f"{med['LoraLayer'] - med['inference function']:.1f} µs")


def inference_bf16(cache, x, weight, bias, lora_A, lora_B, scaling):
    """A variant of ``loratune.fused.lora_linear_inference`` that computes the update in the base's dtype."""
    key = (lora_A.data_ptr(), lora_A._version, lora_B.data_ptr(), lora_B._version, scaling, x.dtype, "bf16")
    if cache.get("key") != key:
        cache["a_t"] = lora_A.detach().t().to(x.dtype).contiguous()
        cache["sb_t"] = (lora_B.detach() * scaling).t().to(x.dtype).contiguous()
        cache["key"] = key
    shape = x.shape
    xb = x.reshape(-1, shape[-1])
    y = F.linear(xb, weight, bias)
    y.addmm_(torch.mm(xb, cache["a_t"]), cache["sb_t"])
    return y.view(*shape[:-1], y.shape[-1])


def decoding(cache_dir: Path, tokens: int) -> None:
    from torch.profiler import profile
    from transformers import AutoModelForCausalLM

    from loratune.config import LoraConfig
    from loratune.inject import inject_adapter

    path = str(bs.prepare(cache_dir, 40) / "model")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    lora = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    inject_adapter(lora, LoraConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, target_modules=bs.TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    for m in (base, lora):
        for p in m.parameters():
            p.requires_grad_(False)
    fp32 = layers.lora_linear_inference
    variants = {"base": (base, fp32), "unmerged, fp32 update (loratune)": (lora, fp32),
                "unmerged, bf16 update": (lora, inference_bf16)}
    prompt = torch.randint(10, 1000, (1, 32), generator=g)
    times = {k: [] for k in variants}
    op_ms = collections.Counter()
    with torch.no_grad():
        for rep in range(3):
            outs = {}
            for k, (m, f) in variants.items():
                layers.lora_linear_inference = f
                outs[k] = m(input_ids=prompt, use_cache=True)
            for i in range(tokens):
                for k in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
                    m, f = variants[k]
                    layers.lora_linear_inference = f
                    tok = outs[k].logits[:, -1:].argmax(-1)
                    t = time.perf_counter()
                    if rep == 2 and i >= 4 and k != "unmerged, bf16 update":
                        with profile() as prof:
                            outs[k] = m(input_ids=tok, cache=outs[k].cache, use_cache=True)
                        op_ms[k] += sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
                    else:
                        outs[k] = m(input_ids=tok, cache=outs[k].cache, use_cache=True)
                    if rep < 2 and i >= 4:
                        times[k].append(time.perf_counter() - t)
    layers.lora_linear_inference = fp32
    for k in variants:
        paired = statistics.median(x / y for x, y in zip(times[k], times["base"]))
        print(f"  {k}: {1e3 * statistics.median(times[k]):.1f} ms/token, {paired - 1:+.1%} vs base (paired)")
    n = tokens - 4
    print("  profiled ops' own time per token: " + ", ".join(f"{k} {v / n:.1f} ms" for k, v in op_ms.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=36, help="decoded tokens per repeat (the first 4 untimed)")
    ap.add_argument("--cache-dir", default="/tmp/loratune-bench")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"one adapted layer, [1, 1, in] bf16 input, {a.threads} threads, median of 2,800 alternating calls:")
    one_layer()
    print(f"greedy decoding, Qwen3-0.6B architecture, bf16, r={bs.LORA_R} on q/k/v/o, interleaved token by token:")
    decoding(Path(a.cache_dir), a.tokens)


if __name__ == "__main__":
    main()
