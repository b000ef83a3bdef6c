"""``loratune generate``: complete prompts with a base model plus adapters, or with a merged model."""
from __future__ import annotations

import argparse
import json

from ..generate import generate
from ..models import load_with_adapters, parse_dtype
from ..train import resolve


def add_common_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --adapter (repeatable), --dtype, --quantize, --trust-remote-code."""
    p.add_argument("--model", default="builtin:tiny-qwen3", help="base or merged model: hub id, local dir or builtin:tiny-qwen3")
    p.add_argument("--adapter", action="append", default=[], help="adapter directory (repeat to add several; their updates add up)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="base weight dtype")
    p.add_argument("--quantize", default="none", choices=["none", "nf4"], help="quantize the base to NF4 (as in QLoRA training)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a base model plus adapters (or a merged model)",
                       description=__doc__)
    add_common_model_args(p)
    p.add_argument("prompt", nargs="*", help="prompt text (sent as a user message when the tokenizer has a chat template)")
    p.add_argument("--prompts-file", help="JSONL file: one prompt per line, {\"prompt\": ...} or {\"messages\": [...]}")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace, chat: bool) -> list:
    prompts: list = [([{"role": "user", "content": t}] if chat else t) for t in args.prompt]
    if args.prompts_file:
        with open(args.prompts_file) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{args.prompts_file}:{lineno}: invalid JSON: {err.msg}") from None
                if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                    prompts.append(rec["messages"] if chat else "\n".join(m.get("content", "") for m in rec["messages"]))
                elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                    prompts.append([{"role": "user", "content": rec["prompt"]}] if chat else rec["prompt"])
                else:
                    raise ValueError(f"{args.prompts_file}:{lineno}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")
    if not prompts:
        raise ValueError("no prompt given: pass prompt text or --prompts-file")
    return prompts


def run(args: argparse.Namespace) -> int:
    model, tok = load_with_adapters(resolve(args.model), args.adapter, dtype=parse_dtype(args.dtype),
                                    quantize=args.quantize, trust_remote_code=args.trust_remote_code)
    chat = bool(getattr(tok, "chat_template", None)) and not args.raw
    prompts = read_prompts(args, chat)
    outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed)
    for out in outs:
        print(out)
    return 0
