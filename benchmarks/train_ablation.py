"""What each technique of loratune's training path is worth: one packed micro-batch, forward + backward, with one
technique switched off at a time. Every (variant, repeat) runs in a process of its own, so each variant's peak RSS
is its own and nothing one variant allocates (or compiles) stays around for the next; variants alternate within
each repeat; medians of wall and CPU time are reported, with the activation memory autograd keeps for backward
(bytes of the distinct saved storages, parameters excluded).

Techniques (all on in ``full``):

* ``varlen``: per-example attention for packed rows (off: transformers' SDPA with the block-diagonal mask);
* ``fused``: the fused LoRA autograd Function (off: the unfused autograd expression);
* ``head``: LM head only at labelled positions, chunked CE (off: full logits at every position, upcast to fp32,
  ``F.cross_entropy``: what ``model(..., labels=...)`` does);
* ``compile``: regional torch.compile of norms and MLPs (off: eager).

    PYTHONPATH=src python benchmarks/train_ablation.py [--threads 2] [--repeats 2] [--timed 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TECHNIQUES = ("varlen", "fused", "head", "compile")
VARIANTS = {"full (all techniques)": [], **{f"without {t}": [t] for t in TECHNIQUES},
            "straightforward (all off)": list(TECHNIQUES)}


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (parameters excluded)."""
    import torch

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


def child(off: list[str], a: argparse.Namespace) -> dict:
    """One variant in this process: warm-up step (compiles), saved-activation bytes, then ``a.timed`` timed steps."""
    import loratune  # noqa: F401  (before torch, as the CLI: its OpenMP wait-policy default applies)
    import torch

    import bench_setup as bs
    import loratune.train as lt
    from loratune.attention import use_varlen_attention
    from loratune.compile import compile_available, compile_regions
    from loratune.config import LoraConfig
    from loratune.data import PackingCollator, load_examples
    from loratune.inject import inject_adapter
    from loratune.layers import LoraLayer
    from loratune.models import load_model, load_tokenizer

    torch.set_num_threads(a.threads)
    cache = bs.prepare(Path(a.cache_dir), a.examples)
    tok = load_tokenizer(str(cache / "model"))
    data = load_examples(cache / f"train-{a.examples}-0.jsonl", tok, max_seq_len=1024)
    idx = sorted(range(len(data)), key=lambda i: abs(len(data[i]) - 400))[:4]  # as train_profile.py
    batch = PackingCollator()([data[i] for i in idx])
    model = load_model(str(cache / "model"), dtype=torch.bfloat16)
    inject_adapter(model, LoraConfig(r=bs.LORA_R, lora_alpha=bs.LORA_ALPHA, target_modules=bs.TARGETS))
    device = torch.device("cpu")
    if "varlen" not in off:
        use_varlen_attention(model)
    LoraLayer.fused = "fused" not in off
    if "head" in off:
        lt.lm_head_weight = lambda m: (None, None)  # batch_loss then takes the model's own logits and F.cross_entropy
    compiled = "compile" not in off and compile_available(device) and compile_regions(model)
    model.config.use_cache = False
    model.train()
    params = list(model.parameters())

    def forward():
        with lt.autocast(device, torch.bfloat16):
            return lt.batch_loss(model, batch, device)[0]

    forward().backward()  # warm-up (compiling happens here)
    model.zero_grad(set_to_none=True)
    activations = saved_bytes(forward, params)
    wall, cpu = [], []
    for _ in range(a.timed):
        t, c = time.perf_counter(), time.process_time()
        forward().backward()
        model.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"wall": wall, "cpu": cpu, "saved_mib": activations / 2**20, "peak_rss_mib": bs.peak_rss_mib(),
            "tokens": int(batch["input_ids"].shape[1]), "lengths": [len(data[i]) for i in idx],
            "compiled": int(compiled or 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timed", type=int, default=2, help="timed forward + backward passes per process")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--cache-dir", default="/tmp/loratune-bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print("RESULT " + json.dumps(child([t for t in a.child.split(",") if t], a)), flush=True)
        return
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    t0 = time.time()
    for rep in range(a.repeats):
        for v in (names if rep % 2 == 0 else names[::-1]):
            cmd = [sys.executable, __file__, "--child", ",".join(VARIANTS[v]), "--threads", str(a.threads),
                   "--timed", str(a.timed), "--examples", str(a.examples), "--cache-dir", a.cache_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{v} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            runs[v].append(json.loads(lines[-1][len("RESULT "):]))
            r = runs[v][-1]
            print(f"repeat {rep + 1}: {v}: {statistics.median(r['wall']):.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    first = runs[names[0]][0]
    print(f"\nmicro-batch: 4 packed examples {first['lengths']} = {first['tokens']} tokens; {a.threads} thread(s); "
          f"{a.repeats} repeats × {a.timed} timed passes, each variant in its own process, alternating; forward + "
          f"backward, bf16 weights + autocast; wall {(time.time() - t0) / 60:.1f} min\n")
    print("| variant | wall s (median) | vs full | CPU s (median) | saved activations, MiB | peak RSS, MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    full = statistics.median(w for r in runs[names[0]] for w in r["wall"])
    for v in names:
        wall = statistics.median(w for r in runs[v] for w in r["wall"])
        cpu = statistics.median(c for r in runs[v] for c in r["cpu"])
        print(f"| {v} | {wall:.2f} | {wall / full:.2f}× | {cpu:.2f} | {runs[v][0]['saved_mib']:.0f} | "
              f"{statistics.median(r['peak_rss_mib'] for r in runs[v]):.0f} |")


if __name__ == "__main__":
    main()
