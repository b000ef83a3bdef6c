"""Inference cost of a LoRA adapter: base model vs merged adapter vs unmerged adapter (loratune, and PEFT for
reference), per token, side by side in one process.

Model: the synthetic Qwen3-0.6B of ``train_throughput.py`` (bf16 weights, random), LoRA r=8, alpha=16 on
q/k/v/o with random non-zero B (an adapter after training, not the zero update of a fresh one). Measured, with the
variants alternating in every repeat (medians reported):

* prefill: one forward over a [1, --prefill] prompt without cache → tokens/s;
* decode: greedy decoding of --new tokens after a 32-token prompt with the KV cache, one forward per token, the
  variants taking turns token by token (so all see the same load); each forward timed → the median ms per token,
  and the median over tokens of each variant's time ÷ the base's time for the same token position.

    PYTHONPATH=src python benchmarks/inference_overhead.py [--threads 2] [--repeats 5]
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


def build(cache: Path) -> dict[str, torch.nn.Module]:
    from peft import LoraConfig as PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loratune.config import LoraConfig
    from loratune.inject import inject_adapter
    from loratune.merge import merge_and_unload

    path = str(cache / "model")

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    def randomize(model):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)

    lora = load()
    inject_adapter(lora, LoraConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, target_modules=bs.TARGETS))
    randomize(lora)
    merged = load()
    inject_adapter(merged, LoraConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, target_modules=bs.TARGETS))
    merged.load_state_dict(lora.state_dict())
    merged = merge_and_unload(merged)
    peft = get_peft_model(load(), PeftConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, target_modules=bs.TARGETS))
    randomize(peft)
    for m in (lora, merged, peft):
        for p in m.parameters():
            p.requires_grad_(False)
    return {"base": load(), "merged (loratune)": merged, "unmerged LoRA (loratune)": lora,
            "unmerged LoRA (PEFT)": peft.eval()}


@torch.no_grad()
def prefill_s(model, ids) -> float:
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


@torch.no_grad()
def decode_interleaved(models: dict, prompt, new: int) -> dict[str, list[float]]:
    """Seconds of each greedy single-token forward with the KV cache, the models taking turns token by token."""
    outs = {k: m(input_ids=prompt, use_cache=True) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(new):
        for k in (list(models) if i % 2 == 0 else list(models)[::-1]):
            token = outs[k].logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            outs[k] = models[k](input_ids=token, cache=outs[k].cache, use_cache=True)
            times[k].append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--cache-dir", default="/tmp/loratune-bench")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cache = bs.prepare(Path(a.cache_dir), 40)
    models = build(cache)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 150000, (1, a.prefill), generator=g)
    prompt = ids[:, :32]
    ref = models["unmerged LoRA (loratune)"](input_ids=ids[:, :64], use_cache=False).logits.float()
    err = (models["merged (loratune)"](input_ids=ids[:, :64], use_cache=False).logits.float() - ref).abs().max()
    for m in models.values():  # warm-up
        prefill_s(m, ids[:, :64])
    decode_interleaved(models, prompt, 4)
    pre = {k: [] for k in models}
    dec = {k: [] for k in models}
    for rep in range(a.repeats):
        names = list(models) if rep % 2 == 0 else list(models)[::-1]
        for k in names:
            pre[k].append(prefill_s(models[k], ids))
        for k, t in decode_interleaved(models, prompt, a.new).items():
            dec[k] += t
    peak = bs.gemm_peak(threads=a.threads)
    base_pre, base_dec = statistics.median(pre["base"]), statistics.median(dec["base"])
    print(f"\n{a.threads} threads, {a.repeats} alternating repeats; prefill [1, {a.prefill}] tokens (median of the "
          f"repeats), decode {a.new} new tokens per repeat after a 32-token prompt (greedy, KV cache; median over "
          f"all {a.repeats * a.new} token steps), bf16 weights; bf16 GEMM peak "
          f"{peak:.0f} GFLOP/s; max |logit| difference merged vs unmerged {err:.3g}\n")
    print("| model | prefill tokens/s | prefill time vs base | decode ms/token | decode time vs base (paired) |")
    print("|---|---:|---:|---:|---:|")
    for k in models:
        p, d = statistics.median(pre[k]), statistics.median(dec[k])
        paired = statistics.median(x / y for x, y in zip(dec[k], dec["base"]))
        print(f"| {k} | {a.prefill / p:.1f} | {p / base_pre - 1:+.1%} | {1000 * d:.1f} | {paired - 1:+.1%} |")


if __name__ == "__main__":
    main()
