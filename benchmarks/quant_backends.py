"""Side-by-side benchmark of the two maintained NF4 backends for QLoRA's frozen base on this CPU.

Backends compared (each is skipped with the reason recorded if it fails to import or run):
  * torchao      ``torchao.quantization.quantize_.workflows.nf4.nf4_tensor`` (``to_nf4`` /
                 ``NF4Tensor`` / ``linear_nf4``; the old ``torchao.dtypes.nf4tensor`` path is gone in 0.18)
  * bitsandbytes ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")`` + ``bitsandbytes.matmul_4bit``

Both are asked for NF4, block size 64, double quantization of the block scales (8-bit scales in
blocks of 256). For each Qwen3-0.6B-sized weight W (out x in, bf16, Gaussian with std 0.02):
  * bytes of the quantized weight incl. all scales / double-quant state / lookup tables, vs bf16;
  * forward+backward time of ``y = linear(x, Wq)`` for x bf16 [tokens x in] requiring grad (input
    grad only: the base is frozen), vs plain bf16 ``F.linear`` -- median and min over --repeats interleaved rounds;
  * max / mean abs error and relative Frobenius error of dequantize(quantize(W)) vs W;
  * a sanity check that the backend's y and dx equal F.linear with the dequantized weight.

Run (from the repo root):
    PYTHONPATH=src .venv/bin/python benchmarks/quant_backends.py
Prints one markdown table (plus notes on failures) to stdout.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

SHAPES = [(1024, 1024), (1024, 3072), (3072, 1024), (2048, 1024)]  # (out, in) like nn.Linear.weight


# ----------------------------------------------------------------------------- backends
class Backend:
    name = "?"
    version = "?"

    def quantize(self, w: torch.Tensor):  # -> opaque handle
        raise NotImplementedError

    def dequantize(self, q) -> torch.Tensor:  # -> [out, in] in the weight's dtype (bf16 here)
        raise NotImplementedError

    def linear(self, x: torch.Tensor, q) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, q) -> int:
        raise NotImplementedError


class TorchAO(Backend):
    name = "torchao"

    def __init__(self):
        import torchao
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

        self.version = torchao.__version__
        self._to_nf4, self._linear_nf4 = to_nf4, linear_nf4

    def quantize(self, w):
        return self._to_nf4(w, block_size=64, scaler_block_size=256)

    def dequantize(self, q):
        return q.get_original_weight()

    def linear(self, x, q):
        return self._linear_nf4(x, q)

    def nbytes(self, q):
        names, _ = q.__tensor_flatten__()  # quantized_data, scaler_mean, quantization_factor, quantized_scalers, nf4
        return sum(getattr(q, n).numel() * getattr(q, n).element_size() for n in names)


class BitsAndBytes(Backend):
    name = "bitsandbytes"

    def __init__(self):
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        self.version = bnb.__version__
        self._bnb, self._bf = bnb, bf

    def quantize(self, w):
        return self._bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def dequantize(self, q):
        packed, state = q
        return self._bf.dequantize_4bit(packed, state)

    def linear(self, x, q):
        packed, state = q
        return self._bnb.matmul_4bit(x, packed.t(), quant_state=state)

    def nbytes(self, q):
        packed, st = q
        ts = [packed, st.absmax, st.code]
        if st.offset is not None:
            ts.append(st.offset)
        if st.state2 is not None:
            ts += [st.state2.absmax, st.state2.code]
        return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------------------- measurements
def time_ms(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, min) wall time of fn() in ms over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts), 1000 * min(ts)


def fwd_bwd(linear, x, gy):
    def step():
        x.grad = None
        y = linear(x)
        y.backward(gy)
    return step


def errors(w: torch.Tensor, wd: torch.Tensor):
    w, wd = w.float(), wd.float()
    d = (wd - w).abs()
    return d.max().item(), d.mean().item(), (torch.linalg.norm(wd - w) / torch.linalg.norm(w)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    backends, failures = [], []
    for cls in (TorchAO, BitsAndBytes):
        try:
            b = cls()
            # smoke test on a small weight: quantize, dequantize, fwd+bwd
            w = torch.randn(128, 256, dtype=torch.bfloat16) * 0.02
            q = b.quantize(w)
            x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
            b.linear(x, q).sum().backward()
            assert x.grad is not None and b.dequantize(q).shape == w.shape
            backends.append(b)
        except Exception as e:  # record exactly what fails
            failures.append((cls.name, f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc()))

    print(f"torch {torch.__version__}, {platform.machine()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
          f"tokens {args.tokens}, repeats {args.repeats}; times are median (min); "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("backends: " + ", ".join(f"{b.name} {b.version}" for b in backends))
    print()
    hdr = ("| W (out×in) | backend | bytes | × bf16 | fwd+bwd ms | × bf16 F.linear (median, min) | quantize ms | dequant ms "
           "| max abs err | mean abs err | rel Frob err | y / dx vs F.linear(deq) |")
    print(hdr)
    print("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
    g = torch.Generator().manual_seed(args.seed)
    for out_f, in_f in SHAPES:
        w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16)
        x = torch.randn(args.tokens, in_f, generator=g).to(torch.bfloat16).requires_grad_(True)
        gy = torch.randn(args.tokens, out_f, generator=g).to(torch.bfloat16)
        bf16_bytes = w.numel() * w.element_size()
        qs = {b.name: b.quantize(w) for b in backends}
        # fwd+bwd timings are interleaved round-robin (bf16, backend 1, backend 2, bf16, ...) so that load
        # from other processes on a shared machine hits every contender alike; median and min over the rounds.
        steps = {"bf16": fwd_bwd(lambda t: F.linear(t, w), x, gy)}
        for b in backends:
            steps[b.name] = fwd_bwd(lambda t, b=b: b.linear(t, qs[b.name]), x, gy)
        times = {k: [] for k in steps}
        for k, fn in steps.items():  # warm-up
            fn()
        for _ in range(args.repeats):
            for k, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        mn = {k: 1000 * min(v) for k, v in times.items()}
        base_ms, base_mn = ms["bf16"], mn["bf16"]
        print(f"| {out_f}×{in_f} | bf16 F.linear | {bf16_bytes:,} | 1.000 | {base_ms:.0f} ({base_mn:.0f}) | 1.00, 1.00 "
              "| – | – | – | – | – | – |")
        for b in backends:
            q = qs[b.name]
            q_ms, _ = time_ms(lambda: b.quantize(w), max(1, args.repeats // 2), warmup=0)
            dq_ms, dq_mn = time_ms(lambda: b.dequantize(q), args.repeats)
            nb = b.nbytes(q)
            wd = b.dequantize(q)
            mx, mean, rel = errors(w, wd)
            # correctness of the backend's autograd path vs the plain op on its own dequantized weight
            x.grad = None
            y = b.linear(x, q)
            y.backward(gy)
            dx = x.grad.clone()
            x.grad = None
            y_ref = F.linear(x, wd.to(x.dtype))
            y_ref.backward(gy)
            ok = (torch.allclose(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
                  and torch.allclose(dx.float(), x.grad.float(), rtol=2e-2, atol=2e-2))
            t, tm = ms[b.name], mn[b.name]
            print(f"| {out_f}×{in_f} | {b.name} | {nb:,} | {nb / bf16_bytes:.3f} | {t:.0f} ({tm:.0f}) "
                  f"| {t / base_ms:.2f}, {tm / base_mn:.2f} | {q_ms:.0f} | {dq_ms:.1f} ({dq_mn:.1f}) "
                  f"| {mx:.2e} | {mean:.2e} | {rel:.4f} | {'match' if ok else 'MISMATCH'} |")
            x.grad = None
        sys.stdout.flush()

    print(f"\nload average at end {os.getloadavg()[0]:.1f} (2-core machine shared with other jobs)")
    for name, line, tb in failures:
        print(f"\n**{name} failed**: {line}\n```\n{tb.strip()}\n```")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    raise SystemExit(main())
