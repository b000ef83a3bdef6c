"""Training throughput and memory: loratune vs PEFT + transformers Trainer vs PEFT in a plain loop, side by side.

Setup (the source document's): the Qwen3-0.6B architecture (bundled real config.json, random bf16 weights), LoRA
r=8, alpha=16, dropout 0 on q/k/v/o; synthetic one-turn chats with lognormal lengths (median ≈ 200 tokens, tail to
1,024, prompt 30-70 % of each); every system trains on the same examples with the same examples per optimizer step
(``--per-step``, micro-batches of ``--micro`` examples). Each system runs in its own process (so its peak RSS is
its own); systems alternate within each repeat (a b c a b c ...) and the bf16 GEMM peak is measured at the start of
every repeat, in its own process too. Step 0 of every run is a warm-up and is not timed.

Reported per system (medians over repeats): tokens/s counting real tokens (no padding), peak RSS of the training
phase, and for loratune its model FLOP utilisation: (4N per token for the frozen decoder + 6 per LoRA parameter +
4·V·H per scored position + causal attention) / time / the bf16 GEMM peak of the same repeat.

    PYTHONPATH=src python benchmarks/train_throughput.py            # full run (~7 min on 2 idle cores)
    PYTHONPATH=src python benchmarks/train_throughput.py --quick    # 1 repeat, 2 timed steps
    PYTHONPATH=src python benchmarks/train_throughput.py --screen-peft   # PEFT dtype/autocast/attention options
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_setup as bs  # noqa: E402
from train_systems import PEFT_CONFIGS  # noqa: E402

SYSTEMS = ["loratune", "peft_trainer", "peft_loop"]
LABELS = {"loratune": "(a) loratune", "peft_trainer": "(b) PEFT + transformers Trainer",
          "peft_loop": "(c) PEFT, plain PyTorch loop"}


def run(cmd: list[str], timeout: float = 3600) -> dict | float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def make_plan(a: argparse.Namespace) -> Path:
    from loratune.data import load_examples
    from loratune.models import load_tokenizer

    cache = bs.prepare(Path(a.cache_dir), a.examples, seed=a.seed)
    data = cache / f"train-{a.examples}-{a.seed}.jsonl"
    tok = load_tokenizer(str(cache / "model"))
    lengths = load_examples(data, tok, max_seq_len=1024).lengths
    steps = bs.schedule(lengths, a.per_step, a.steps, seed=a.seed)
    plan = {"model": str(cache / "model"), "data": str(data), "max_seq_len": 1024, "micro": a.micro, "steps": steps}
    path = cache / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def summarize(runs: list[dict], flops_per_step: list[float], peaks: list[float]) -> dict:
    """Timed steps (all but the warm-up) of each run → per-run rates; medians over runs.

    Two references for the machine's speed: the GEMM peak measured at the start of the repeat (``peaks``) and the
    GEMM probes taken inside the run just before each timed step (the load when the steps ran). MFU and the
    normalized throughput (tokens per GFLOP of measured GEMM capacity) use the run's own probes."""
    tps = [sum(r["step_tokens"][1:]) / sum(r["step_seconds"][1:]) for r in runs]
    rates = [sum(flops_per_step[1:]) / sum(r["step_seconds"][1:]) / 1e9 for r in runs]
    probes = [statistics.median(r["gemm_probes"]) for r in runs]
    return {"tokens_per_s": statistics.median(tps), "tokens_per_s_runs": tps,
            "tokens_per_gflop": statistics.median(t / p for t, p in zip(tps, probes)),
            "gemm_probe_runs": probes,
            "gflops": statistics.median(rates),
            "mfu": statistics.median(r / p for r, p in zip(rates, probes)),
            "mfu_vs_repeat_peak": statistics.median(r / p for r, p in zip(rates, peaks)),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "peak_rss_runs": [r["peak_rss_mib"] for r in runs],
            "cpu_share": statistics.median(r["cpu_share"] for r in runs),
            "load_s": statistics.median(r["load_s"] for r in runs),
            "warmup_s": statistics.median(r["step_seconds"][0] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 1 timed step")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--examples", type=int, default=2000, help="synthetic data set the steps are drawn from")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (after 1 warm-up step)")
    ap.add_argument("--per-step", type=int, default=8, help="examples per optimizer step")
    ap.add_argument("--micro", type=int, default=4, help="examples per micro-batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--peft-config", default="bf16-autocast-sdpa", choices=list(PEFT_CONFIGS))
    ap.add_argument("--screen-peft", action="store_true", help="compare the PEFT options in the plain loop instead")
    ap.add_argument("--cache-dir", default=os.environ.get("LORATUNE_BENCH_CACHE", "/tmp/loratune-bench"))
    ap.add_argument("--no-compile", action="store_true", help="loratune without regional torch.compile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write all measurements here")
    a = ap.parse_args()
    if a.quick:
        a.repeats, a.steps = 1, 1
    plan_path = make_plan(a)
    plan = json.loads(plan_path.read_text())
    py = sys.executable
    if a.screen_peft:
        jobs = [(name, [py, str(HERE / "train_systems.py"), "peft_loop", str(plan_path), "--peft-config", name,
                        "--threads", str(a.threads)]) for name in PEFT_CONFIGS]
    else:
        jobs = [(s, [py, str(HERE / "train_systems.py"), s, str(plan_path), "--peft-config", a.peft_config,
                     "--threads", str(a.threads)] + (["--no-compile"] if a.no_compile else []))
                for s in a.systems.split(",")]
    results: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    peaks: list[float] = []
    t_start = time.time()
    for rep in range(a.repeats):
        peaks.append(run([py, str(HERE / "bench_setup.py"), "gemm-peak", str(a.threads)]))
        print(f"repeat {rep + 1}/{a.repeats}: bf16 GEMM peak {peaks[-1]:.0f} GFLOP/s", file=sys.stderr, flush=True)
        order = jobs if rep % 2 == 0 else jobs[::-1]  # a b c, then c b a: no system always runs first
        for name, cmd in order:
            res = run(cmd)
            results[name].append(res)
            tps = sum(res["step_tokens"][1:]) / sum(res["step_seconds"][1:])
            print(f"  {name}: {tps:.1f} tokens/s, peak RSS {res['peak_rss_mib']:.0f} MiB "
                  f"(steps {[round(s, 1) for s in res['step_seconds']]})", file=sys.stderr, flush=True)
    config = json.loads(bs.CONFIG.read_text())
    first = next(iter(results.values()))[0]
    flops = [bs.model_flops(config, lens, sc) for lens, sc in zip(first["step_lengths"], first["step_scored"])]
    summary = {name: summarize(runs, flops, peaks) for name, runs in results.items()}
    report(a, plan, summary, results, peaks, first, time.time() - t_start)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "plan": plan, "gemm_peaks": peaks, "summary": summary,
                                            "runs": results}, indent=1))


def report(a, plan, summary, results, peaks, first, wall) -> None:
    timed_tokens = sum(first["step_tokens"][1:])
    timed_scored = sum(first["step_scored"][1:])
    print(f"\n{len(plan['steps']) - 1} timed optimizer steps (+1 warm-up) of {a.per_step} examples "
          f"({timed_tokens:,} real tokens, {timed_scored:,} scored), micro-batches of {a.micro} examples, "
          f"{a.threads} threads, {a.repeats} repeat(s); bf16 GEMM peak at the start of each repeat: "
          f"{', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s; {platform.machine()}, wall {wall / 60:.1f} min\n")
    if a.screen_peft:
        print("| PEFT option (plain loop) | tokens/s | tokens/s per run | GEMM probe per run, GFLOP/s | peak RSS, MiB |")
        print("|---|---:|---|---|---:|")
        for name, s in sorted(summary.items(), key=lambda kv: -kv[1]["tokens_per_gflop"]):
            print(f"| {name} | {s['tokens_per_s']:.1f} | {_runs(s['tokens_per_s_runs'])} | "
                  f"{_runs(s['gemm_probe_runs'], 0)} | {s['peak_rss_mib']:.0f} |")
        return
    lt = summary.get("loratune")
    print("| system | tokens/s (median) | loratune ÷ it | tokens/s per run | GEMM probe per run, GFLOP/s | "
          "peak RSS, MiB | it ÷ loratune | useful MFU |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for name, s in summary.items():
        ratio = f"{lt['tokens_per_s'] / s['tokens_per_s']:.2f}×" if lt else ""
        mem = f"{s['peak_rss_mib'] / lt['peak_rss_mib']:.2f}×" if lt else ""
        cfg = "" if name == "loratune" else f" [{a.peft_config}]"
        print(f"| {LABELS[name]}{cfg} | {s['tokens_per_s']:.1f} | {ratio} | {_runs(s['tokens_per_s_runs'])} | "
              f"{_runs(s['gemm_probe_runs'], 0)} | {s['peak_rss_mib']:.0f} | {mem} | {100 * s['mfu']:.0f}% |")
    print("\nwarm-up step (untimed; loratune's includes compiling): " + ", ".join(
        f"{name} {s['warmup_s']:.0f} s" for name, s in summary.items()))
    print("OpenMP wait policy per run: " + ", ".join(
        f"{name} {'/'.join(r.get('omp_wait_policy', '?') for r in results[name])}" for name in summary))
    print("CPU share (CPU s / wall s, 2.0 = both cores all the time): " + ", ".join(
        f"{name} {s['cpu_share']:.2f}" for name, s in summary.items()))
    peft = {k: v for k, v in summary.items() if k != "loratune"}
    if lt and peft:
        best = max(peft, key=lambda k: peft[k]["tokens_per_s"])
        b = summary[best]
        print(f"\nloratune vs the best PEFT system ({best}): {lt['tokens_per_s'] / b['tokens_per_s']:.2f}× tokens/s "
              f"(target ≥ 1.5×; normalized by each run's GEMM probe: "
              f"{lt['tokens_per_gflop'] / b['tokens_per_gflop']:.2f}×), {lt['peak_rss_mib'] / b['peak_rss_mib']:.2f}× "
              f"peak RSS (target ≤ 0.5×)")
        print(f"loratune MFU {100 * lt['mfu']:.0f}% of the bf16 GEMM rate measured during its runs (target ≥ 60%; "
              f"{100 * lt['mfu_vs_repeat_peak']:.0f}% of the peaks measured at the start of the repeats), "
              f"{lt['gflops']:.0f} GFLOP/s of useful work")


def _runs(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


if __name__ == "__main__":
    main()
