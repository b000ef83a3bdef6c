"""``loratune train [RECIPE] [--option value ...]``: fine-tune with LoRA; no arguments runs the embedded demo."""
from __future__ import annotations

import argparse

from ..recipe import add_override_flags, build, dump_yaml, load_yaml, merge, overrides_from_args
from ..train import TrainConfig, TrainingDiverged, train


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a causal LM with LoRA (no arguments: the embedded demo)",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("recipe", nargs="?", help="YAML recipe; any option below overrides it")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-recipe", action="store_true", help="print the complete resolved recipe and exit")
    add_override_flags(p, TrainConfig)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe file (if any) with the command-line overrides on top, validated."""
    data, lines, source = {}, {}, "<command line>"
    if args.recipe:
        data, lines = load_yaml(args.recipe)
        source = args.recipe
    overrides = overrides_from_args(args)
    cfg = build(TrainConfig, data, source, lines)  # report recipe errors with file:line first
    if overrides:
        cfg = build(TrainConfig, merge(data, overrides), "<command line>")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_recipe:
        print(dump_yaml(cfg), end="")
        return 0
    try:
        train(cfg, resume=args.resume, progress=not args.no_progress)
    except TrainingDiverged as err:
        from ..cli import UserError

        from ..distributed import env_rank

        error = UserError(str(err), exit_code=3)
        error.quiet = env_rank() != 0  # type: ignore[attr-defined]  # under torchrun every rank stops alike
        raise error from None
    return 0
