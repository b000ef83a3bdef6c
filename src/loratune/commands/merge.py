"""``loratune merge``: W ← W + s·B·A for one or more adapters, written as a complete transformers model directory.

The result loads with ``AutoModelForCausalLM.from_pretrained`` and needs no loratune or PEFT. Merging happens in
fp32 (an NF4 base is dequantized first); the output is cast to ``--dtype``. The largest deviation between the
merged model's logits and the unmerged model's, on a probe batch, is printed so the cost of the cast is visible.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from ..adapters import replace_dir
from ..merge import merge_and_unload
from ..models import load_with_adapters, parse_dtype
from ..train import resolve
from .generate import add_common_model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge adapters into the base and save a plain transformers model",
                       description=__doc__)
    add_common_model_args(p)
    p.add_argument("--output", required=True, help="directory to write (replaced atomically if it exists)")
    p.add_argument("--save-dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="dtype of the written weights")
    p.set_defaults(func=run)


def probe_ids(tokenizer, n: int = 32) -> torch.Tensor:
    """A fixed probe batch [2, n] of token ids from the tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tokenizer), (2, n), generator=g)


def run(args: argparse.Namespace) -> int:
    if not args.adapter:
        raise ValueError("give at least one --adapter to merge")
    model, tok = load_with_adapters(resolve(args.model), args.adapter, dtype=parse_dtype(args.dtype),
                                    quantize=args.quantize, trust_remote_code=args.trust_remote_code)
    ids = probe_ids(tok)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        plain = merge_and_unload(model)  # also dequantizes an NF4 base's layers that carry no adapter
        plain = plain.to(parse_dtype(args.save_dtype))
        merged = plain(input_ids=ids).logits.float()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dev = (merged - unmerged).abs().max().item()
    scale = unmerged.abs().max().item()
    print(f"merged {len(args.adapter)} adapter(s) into {args.model} -> {out} ({args.save_dtype})")
    print(f"max |logit difference| merged vs unmerged on a probe batch: {dev:.3g} (max |logit| {scale:.3g})")
    return 0
