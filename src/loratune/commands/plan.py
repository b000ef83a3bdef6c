"""``loratune plan MODEL``: LoRA shapes, parameter counts and training memory, from config.json alone."""
from __future__ import annotations

import argparse

from ..config import LoraConfig
from ..plan import BUNDLED_CONFIGS, format_plan, make_plan, plan_to_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show LoRA shapes, parameter counts and a memory estimate for a model",
                       description=__doc__)
    p.add_argument("model", nargs="?", default="qwen3-0.6b",
                   help=f"model id, local directory or config.json; bundled: {', '.join(BUNDLED_CONFIGS)} (default)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated module names, a regex, or all-linear (default q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r)")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch size for the memory estimate (default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length for the memory estimate (default 512)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="base weight / compute dtype")
    p.add_argument("--quantize", default="none", choices=["none", "nf4"], help="base weights in NF4 (QLoRA)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="estimate with gradient checkpointing")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run)


def parse_targets(text: str) -> list[str] | str:
    """'q_proj,v_proj' → a list; 'all-linear' or anything with regex characters → the string itself."""
    if text == "all-linear" or any(c in text for c in "*()[]|\\^$+?"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    config = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=parse_targets(args.target_modules),
                        use_rslora=args.use_rslora)
    plan = make_plan(args.model, config, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                     quantize=args.quantize, gradient_checkpointing=args.gradient_checkpointing,
                     trust_remote_code=args.trust_remote_code)
    print(plan_to_json(plan) if args.json else format_plan(plan))
    return 0
