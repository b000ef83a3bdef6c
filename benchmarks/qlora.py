"""QLoRA (NF4 base) against LoRA (bf16 base) on the Qwen3-0.6B architecture: memory, step time, and loss.

Two parts, every measurement in a fresh subprocess so that no run inherits another's memory or warm caches:

1. Qwen3-0.6B architecture (the real config, ``src/loratune/assets/configs/qwen3-0.6b/config.json``, random
   N(0, 0.02²) weights: the same shapes and compute as the pretrained model). It is built once in a temporary
   directory as a bf16 safetensors checkpoint. Then the two modes run alternately, bf16 then NF4 in odd rounds
   and NF4 then bf16 in even rounds, so that the load from other jobs on a shared machine hits both alike. Each
   run prepares the model exactly as ``loratune train`` does: ``load_model`` in bf16 (the ``dtype: auto`` choice on
   a CPU with AVX-512 BF16), ``quantize_base`` for NF4, LoRA r=8, alpha=16 on q/k/v/o, AdamW, bf16 autocast.
   It then runs ``--warmup`` + ``--steps`` optimizer steps of ``loratune.train``'s own step
   (``accumulate_gradients``, clipping, ``optimizer.step``) on one packed row of ``--batch-size`` × ``--seq-len``
   random tokens, the same row in both modes. Measured:

   * weight bytes: the linear layers alone, and the whole model (the tied embedding / LM head stays bf16 in
     both modes), counted from the tensors (NF4: packed codes plus every scale and table);
   * process RSS after loading (and quantizing), the peak RSS of the loading phase, and the peak RSS of the
     training steps (VmHWM, reset through ``/proc/self/clear_refs`` just before the first step);
   * time per step: wall-clock, and CPU time (user + system, all threads; less sensitive to other jobs
     taking the cores, though it counts OpenMP spin-waiting);
   * the loss after the steps (a sanity check that both modes train the same function).

2. The embedded task (``builtin:tiny-qwen3`` + ``builtin:train`` / ``builtin:eval``: the secret-cipher task of the
   ``loratune train`` demo): ``loratune.train.train`` once with ``quantize: none`` (bf16 LoRA) and once with
   ``quantize: nf4``, otherwise identical: the recipe ``scripts/verify_default_task.py`` recommends (LoRA r=8,
   alpha=16 on q/k/v/o, lr 2e-3, 300 steps of 16 examples, 20 warm-up steps, max_seq_len 128), the same seed and
   data order. Reported: the train loss over the last 10% of steps, the held-out eval loss, and greedy exact match
   on the 150 held-out examples before and after training. Skipped, with a note, while those assets are missing.

Run (from the repo root; 12-15 minutes on 2 cores shared with other jobs, load average 3-7):
    PYTHONPATH=src .venv/bin/python benchmarks/qlora.py
Prints a markdown table and notes to stdout (progress to stderr); ``--json FILE`` also writes the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "src" / "loratune" / "assets" / "configs" / "qwen3-0.6b"
MiB = 2**20


# ============================================================================================================ children
def _status(key: str) -> float | None:
    """A /proc/self/status field in MiB (VmRSS, VmHWM, RssAnon, RssFile), or None where unavailable."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_build(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.perf_counter()
    config = AutoConfig.from_pretrained(CONFIG_DIR)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # N(0, initializer_range²) weights
    model.save_pretrained(args.model_dir, safe_serialization=True)
    return {"params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - t}


def child_step_bench(args: argparse.Namespace) -> dict:
    """One mode (bf16 or nf4) on the 0.6B model: bytes, RSS, step times. Mirrors loratune.train.train's set-up."""
    import torch
    from torch import nn

    from loratune import quant
    from loratune.config import LoraConfig
    from loratune.inject import inject_adapter
    from loratune.models import load_model, quantize_base, require_quant_backend
    from loratune.train import accumulate_gradients, autocast_dtype, weight_dtype

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device("cpu")
    quantize = "nf4" if args.child == "nf4" else "none"
    res: dict = {"mode": args.child, "threads": torch.get_num_threads(), "rss_start_mib": _status("VmRSS")}
    require_quant_backend(quantize)  # NF4: imports bitsandbytes and runs its smoke test, as loratune train does
    res["rss_backend_mib"] = _status("VmRSS")

    t = time.perf_counter()
    model = load_model(args.model_dir, dtype=weight_dtype("auto", device), device=device)
    res["load_s"] = time.perf_counter() - t
    res["weight_dtype"] = str(weight_dtype("auto", device)).replace("torch.", "")
    t = time.perf_counter()
    quantize_base(model, quantize)
    res["quantize_s"] = time.perf_counter() - t

    # bytes: the linear layers (every nn.Linear except the tied LM head) and the whole model
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    res["linear_layers"] = len(linears)
    res["linear_bytes"] = sum(quant.weight_nbytes(m.weight) for m in linears)
    res["linear_bytes_bf16"] = sum(quant.logical_shape(m.weight).numel() * 2 for m in linears)
    res["linear_quantized"] = sum(quant.is_quantized(m.weight) for m in linears)
    res["model_bytes"] = quant.parameter_nbytes(model)
    res["rss_loaded_mib"] = _status("VmRSS")
    res["rss_loaded_anon_mib"] = _status("RssAnon")
    res["rss_loaded_file_mib"] = _status("RssFile")
    res["peak_rss_load_mib"] = _status("VmHWM")

    inject_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    res["lora_params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    amp = autocast_dtype("auto", device)
    res["autocast"] = str(amp).replace("torch.", "")

    g = torch.Generator().manual_seed(0)
    n = args.batch_size * args.seq_len
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g)  # one packed row of whole examples
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.arange(args.seq_len).repeat(args.batch_size)[None]}

    res["peak_reset"] = _reset_peak_rss()
    res["rss_before_train_mib"] = _status("VmRSS")
    wall, cpu, losses = [], [], []
    for _ in range(args.warmup + args.steps):
        t, c = time.perf_counter(), time.process_time()
        loss, _ = accumulate_gradients(model, [batch], device, amp)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        losses.append(loss)
    res["peak_rss_train_mib"] = _status("VmHWM") if res["peak_reset"] else None
    res["step_wall_s"] = wall[args.warmup:]
    res["step_cpu_s"] = cpu[args.warmup:]
    res["warmup_wall_s"] = wall[:args.warmup]
    res["losses"] = losses
    return res


def child_task(args: argparse.Namespace) -> dict:
    """The embedded demo (loratune train's defaults) with quantize none or nf4, for --task-steps steps."""
    from loratune.config import LoraConfig
    from loratune.train import TrainConfig, train

    quantize = "nf4" if args.child == "task-nf4" else "none"
    with tempfile.TemporaryDirectory(prefix="loratune-qlora-task-") as tmp:
        cfg = TrainConfig(model="builtin:tiny-qwen3", train_data="builtin:train", eval_data="builtin:eval",
                          quantize=quantize, lora=LoraConfig(r=8, lora_alpha=16,
                                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                          max_steps=args.task_steps, lr=args.task_lr, batch_size=args.task_batch,
                          warmup_ratio=args.task_warmup / max(1, args.task_steps), max_seq_len=128, seed=0,
                          output_dir=tmp, threads=args.threads, eval_generate=args.task_eval_generate,
                          max_new_tokens=64)
        t = time.perf_counter()
        result = train(cfg, progress=False, log=lambda *a: None)
        seconds = time.perf_counter() - t
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    last = max(1, len(losses) // 10)
    out = {"mode": args.child, "steps": result.steps, "first_loss": losses[0], "final_loss": losses[-1],
           f"mean_loss_last_{last}": statistics.fmean(losses[-last:]), "last_n": last,
           "eval_loss": result.eval_loss, "train_s": result.seconds, "total_s": seconds, "tokens": result.tokens}
    for key in ("before", "after"):
        if key in result.report:
            out[f"exact_match_{key}"] = result.report[key]["text"]
    return out


# ============================================================================================================ parent
def run_child(args: argparse.Namespace, mode: str, extra: list[str] | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--child", mode, "--child-out", str(out), "--threads", str(args.threads),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--task-steps", str(args.task_steps), "--task-lr", str(args.task_lr),
           "--task-batch", str(args.task_batch), "--task-warmup", str(args.task_warmup),
           "--task-eval-generate", str(args.task_eval_generate), *(extra or [])]
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    out.unlink()
    res["child_wall_s"] = time.perf_counter() - t
    res["loadavg_before"], res["loadavg_after"] = load_before, os.getloadavg()[0]
    print(f"  {mode}: {res['child_wall_s']:.0f}s (load average {load_before:.1f} → {res['loadavg_after']:.1f})",
          file=sys.stderr, flush=True)
    return res


def _pythonpath() -> str:
    src = str(ROOT / "src")
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([src, *[p for p in parts if p != src]])


def _versions() -> str:
    import torch

    from importlib.metadata import PackageNotFoundError, version

    try:
        b = version("bitsandbytes")  # no import here: the parent stays light, the children import it
    except PackageNotFoundError:
        b = "not installed"
    cap = torch.backends.cpu.get_cpu_capability()
    return (f"torch {torch.__version__}, bitsandbytes {b}, {platform.machine()}, cpu capability {cap}, "
            f"{os.cpu_count()} cores")


def plan_estimates(args: argparse.Namespace) -> dict:
    from loratune.config import LoraConfig
    from loratune.plan import make_plan

    out = {}
    for q in ("none", "nf4"):
        m = make_plan(str(CONFIG_DIR), LoraConfig(r=8, lora_alpha=16), batch_size=args.batch_size,
                      seq_len=args.seq_len, dtype="bf16", quantize=q).memory
        out[q] = m
    return out


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_mib(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f} MiB"


def report(args, env: str, build: dict, runs: list[dict], plan: dict, task: dict | None, wall: float,
           task_note: str = "pending") -> str:
    by = {m: [r for r in runs if r["mode"] == m] for m in ("bf16", "nf4")}
    b, q = by["bf16"][0], by["nf4"][0]
    rounds = list(zip(by["bf16"], by["nf4"]))
    ratio_rounds = [med(rq["step_wall_s"]) / med(rb["step_wall_s"]) for rb, rq in rounds]
    cpu_ratio_rounds = [med(rq["step_cpu_s"]) / med(rb["step_cpu_s"]) for rb, rq in rounds]
    wall_b = med([x for r in by["bf16"] for x in r["step_wall_s"]])
    wall_q = med([x for r in by["nf4"] for x in r["step_wall_s"]])
    cpu_b = med([x for r in by["bf16"] for x in r["step_cpu_s"]])
    cpu_q = med([x for r in by["nf4"] for x in r["step_cpu_s"]])
    peak = lambda rs: med([r["peak_rss_train_mib"] for r in rs if r["peak_rss_train_mib"] is not None])
    loadpk = lambda rs: med([r["peak_rss_load_mib"] for r in rs])
    loaded = lambda rs: med([r["rss_loaded_mib"] for r in rs])
    start = lambda rs: med([r["rss_start_mib"] for r in rs])
    prep = lambda rs: med([r["load_s"] + r["quantize_s"] for r in rs])
    r2 = lambda x, y: f"{x / y:.3f}" if y else "–"
    lines = []
    lines.append("```")
    lines.append(env)
    lines.append(f"Qwen3-0.6B architecture, random N(0, 0.02²) weights ({build['params']:,} parameters), "
                 f"LoRA r=8 alpha=16 on q/k/v/o ({b['lora_params']:,} trainable), base {b['weight_dtype']}, "
                 f"autocast {b['autocast']}, {b['threads']} threads, one packed row of {args.batch_size} × "
                 f"{args.seq_len} tokens, {args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} "
                 f"rounds alternating the order")
    loads = [x for r in runs for x in (r["loadavg_before"], r["loadavg_after"])]
    lines.append(f"load average (1 min) around the runs: {min(loads):.1f}-{max(loads):.1f}; benchmark wall time "
                 f"{wall / 60:.1f} min")
    lines.append("```")
    lines.append("")
    lines.append("| | bf16 LoRA | NF4 QLoRA | NF4 / bf16 |")
    lines.append("|---|---|---|---|")
    lines.append(f"| linear-layer weights ({q['linear_layers']} q/k/v/o/gate/up/down; NF4: codes + all scales) | "
                 f"{b['linear_bytes'] / MiB:,.1f} MiB | {q['linear_bytes'] / MiB:,.1f} MiB | "
                 f"**{r2(q['linear_bytes'], b['linear_bytes'])}** |")
    lines.append(f"| whole-model weights (tied embedding = LM head stays bf16: "
                 f"{(b['model_bytes'] - b['linear_bytes']) / MiB:,.1f} MiB) | {b['model_bytes'] / MiB:,.1f} MiB | "
                 f"{q['model_bytes'] / MiB:,.1f} MiB | **{r2(q['model_bytes'], b['model_bytes'])}** |")
    lines.append(f"| `loratune plan` estimate of the weights | {plan['none']['weights'] / MiB:,.1f} MiB | "
                 f"{plan['nf4']['weights'] / MiB:,.1f} MiB | {r2(plan['nf4']['weights'], plan['none']['weights'])} |")
    lines.append(f"| load (+ quantize) time, median | {prep(by['bf16']):.1f} s | {prep(by['nf4']):.1f} s | "
                 f"{r2(prep(by['nf4']), prep(by['bf16']))} |")
    backend = lambda rs: med([r["rss_backend_mib"] - r["rss_start_mib"] for r in rs])
    lines.append(f"| process RSS before loading (Python, torch, transformers, loratune) | "
                 f"{fmt_mib(start(by['bf16']))} | {fmt_mib(start(by['nf4']))} | |")
    lines.append(f"| + importing and checking bitsandbytes (NF4 only) | – | +{backend(by['nf4']):,.0f} MiB | |")
    lines.append(f"| RSS after load (+ quantize) | {fmt_mib(loaded(by['bf16']))} | {fmt_mib(loaded(by['nf4']))} | "
                 f"{r2(loaded(by['nf4']), loaded(by['bf16']))} |")
    lines.append(f"| peak RSS while loading (+ quantizing) | {fmt_mib(loadpk(by['bf16']))} | "
                 f"{fmt_mib(loadpk(by['nf4']))} | {r2(loadpk(by['nf4']), loadpk(by['bf16']))} |")
    lines.append(f"| **peak RSS during training** | {fmt_mib(peak(by['bf16']))} | {fmt_mib(peak(by['nf4']))} | "
                 f"**{r2(peak(by['nf4']), peak(by['bf16']))}** |")
    lines.append(f"| `loratune plan` training estimate (weights + LoRA state + activations; no process overhead) | "
                 f"{plan['none']['total'] / MiB:,.0f} MiB | {plan['nf4']['total'] / MiB:,.0f} MiB | "
                 f"{r2(plan['nf4']['total'], plan['none']['total'])} |")
    n_steps = len(by["bf16"]) * args.steps
    lines.append(f"| **step time, wall** (median of {n_steps} steps; ratio: median of the per-round ratios "
                 f"{', '.join(f'{x:.2f}' for x in ratio_rounds)}) | {wall_b:.2f} s | {wall_q:.2f} s | "
                 f"**{med(ratio_rounds):.2f}** |")
    lines.append(f"| step time, CPU (user + sys, all threads; per-round ratios "
                 f"{', '.join(f'{x:.2f}' for x in cpu_ratio_rounds)}) | {cpu_b:.2f} s | {cpu_q:.2f} s | "
                 f"{med(cpu_ratio_rounds):.2f} |")
    lb, lq = b["losses"][-1], q["losses"][-1]
    lines.append(f"| loss after {args.warmup + args.steps} steps on the random row (sanity: both train; "
                 f"ln V = {__import__('math').log(151936):.2f}) | {lb:.3f} | {lq:.3f} | {lq - lb:+.3f} |")
    if task is None:
        lines.append(f"| embedded task (bundled tiny Qwen3): loss after the same steps | {task_note} | {task_note} | |")
    else:
        tb, tq = task["bf16"], task["nf4"]
        k = tb["last_n"]
        key = f"mean_loss_last_{k}"
        lines.append(f"| **embedded task** (`builtin:tiny-qwen3`, secret cipher; lr {args.task_lr:g}, "
                     f"{args.task_batch} examples/step): train loss, mean of the last {k} of "
                     f"{tb['steps']} steps (step 1: {tb['first_loss']:.3f} / {tq['first_loss']:.3f}) | {tb[key]:.4f} | "
                     f"{tq[key]:.4f} | {tq[key] - tb[key]:+.4f} |")
        if tb["eval_loss"] is not None:
            lines.append(f"| **embedded task**: held-out eval loss after {tb['steps']} steps | {tb['eval_loss']:.4f} | "
                         f"{tq['eval_loss']:.4f} | {tq['eval_loss'] - tb['eval_loss']:+.4f} |")
        if "exact_match_after" in tb:
            lines.append(f"| embedded task: held-out exact match (before → after) | {tb.get('exact_match_before', '?')} → "
                         f"{tb['exact_match_after']} | {tq.get('exact_match_before', '?')} → {tq['exact_match_after']} | |")
        lines.append(f"| embedded task: training time ({tb['steps']} steps) | {tb['train_s']:.1f} s | "
                     f"{tq['train_s']:.1f} s | {r2(tq['train_s'], tb['train_s'])} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per example in the timed row")
    ap.add_argument("--batch-size", type=int, default=1, help="examples packed into the timed row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="bf16/NF4 pairs, the order alternating")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: all cores, as loratune train does by default; 1, the default here, "
                         "is far steadier when other jobs share the cores)")
    ap.add_argument("--task-steps", type=int, default=300, help="embedded-task optimizer steps")
    ap.add_argument("--task-lr", type=float, default=2e-3, help="embedded-task peak learning rate")
    ap.add_argument("--task-batch", type=int, default=16, help="embedded-task examples per step")
    ap.add_argument("--task-warmup", type=int, default=20, help="embedded-task warm-up steps")
    ap.add_argument("--task-eval-generate", type=int, default=150,
                    help="embedded task: held-out examples scored by greedy exact match (0: skip)")
    ap.add_argument("--skip-task", action="store_true", help="skip the embedded-task comparison")
    ap.add_argument("--model-dir", help="reuse a Qwen3-0.6B-architecture checkpoint instead of building one")
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import loratune  # noqa: F401  first, as the CLI does: its environment defaults apply before torch loads
        fn = {"build": child_build, "bf16": child_step_bench, "nf4": child_step_bench,
              "task-bf16": child_task, "task-nf4": child_task}[args.child]
        Path(args.child_out).write_text(json.dumps(fn(args)))
        return 0

    t0 = time.perf_counter()
    env = _versions() + f"; load average at start {os.getloadavg()[0]:.1f}"
    print(env, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="loratune-qlora-bench-") as tmp:
        model_dir = args.model_dir or str(Path(tmp) / "qwen3-0.6b-random")
        if args.model_dir:
            build = {"params": None, "seconds": 0.0}
        else:
            print("building the Qwen3-0.6B-architecture checkpoint (random weights)...", file=sys.stderr)
            build = run_child(args, "build", ["--model-dir", model_dir])
        runs = []
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            for mode in (("bf16", "nf4") if r % 2 == 0 else ("nf4", "bf16")):
                runs.append(run_child(args, mode, ["--model-dir", model_dir]))
        if build["params"] is None:
            build["params"] = runs[0]["model_bytes"] // 2  # all bf16
    plan = plan_estimates(args)

    task = None
    assets = ROOT / "src" / "loratune" / "assets"
    task_note = ""
    have_task = (assets / "tiny-qwen3" / "config.json").is_file() and (assets / "data" / "train.jsonl").is_file()
    if args.skip_task or not have_task:
        note = "skipped (--skip-task)" if args.skip_task else "pending: the bundled tiny model/data are not there yet"
        print(f"embedded task: {note}", file=sys.stderr)
        task_note = "skipped" if args.skip_task else "pending"
    else:
        print("embedded task", file=sys.stderr)
        task = {"bf16": run_child(args, "task-bf16"), "nf4": run_child(args, "task-nf4")}
    wall = time.perf_counter() - t0
    print(report(args, env, build, runs, plan, task, wall, task_note if task is None else ""))
    if task is None and not args.skip_task:
        print("\nEmbedded-task row pending: once `src/loratune/assets/tiny-qwen3/` exists, run\n"
              "    PYTHONPATH=src .venv/bin/python benchmarks/qlora.py")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args), "build": build, "runs": runs,
                                               "plan": plan, "task": task, "wall_s": wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
