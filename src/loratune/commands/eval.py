"""``loratune eval``: held-out loss and exact-match accuracy of a base model plus adapters (or a merged model)."""
from __future__ import annotations

import argparse
import json

import torch

from ..data import iter_records, load_examples
from ..generate import exact_match
from ..models import load_with_adapters, parse_dtype
from ..train import TrainConfig, autocast_dtype, evaluate_loss, resolve
from .generate import add_common_model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out loss and exact match of a model plus adapters", description=__doc__)
    add_common_model_args(p)
    p.add_argument("--data", default="builtin:eval", help="JSONL file of held-out examples")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--train-on", default="completion", choices=["completion", "all"], help="tokens the loss is taken on")
    p.add_argument("--generate", type=int, default=0, help="also score the first N examples by greedy generation + exact match")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, tok = load_with_adapters(resolve(args.model), args.adapter, dtype=parse_dtype(args.dtype),
                                    quantize=args.quantize, trust_remote_code=args.trust_remote_code)
    data = resolve(args.data)
    dataset = load_examples(data, tok, max_seq_len=args.max_seq_len, train_on_all=args.train_on == "all")
    cfg = TrainConfig(max_seq_len=args.max_seq_len, batch_size=8)
    device = torch.device("cpu")
    result: dict = {"examples": len(dataset),
                    "eval_loss": evaluate_loss(model, dataset, cfg, tok, device, autocast_dtype("auto", device))}
    if args.generate:
        records = [rec for _, rec in iter_records(data) if isinstance(rec, dict)][: args.generate]
        em = exact_match(model, tok, records, max_new_tokens=args.max_new_tokens)
        result.update(exact_match=em.accuracy, correct=em.correct, scored=em.total)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"eval loss {result['eval_loss']:.4f} over {result['examples']} examples")
        if args.generate:
            print(f"exact match {100 * result['exact_match']:.1f}% ({result['correct']}/{result['scored']})")
    return 0
