"""``loratune sweep [RECIPE] --ranks 1,2,4,8,16,32``: the same short training at several LoRA ranks r.

Every rank trains with the recipe unchanged except r (and lora_alpha/use_rslora per --alpha-rule) into
OUTPUT_DIR/r{r}/; the table (sweep.md, sweep.json) and plot (sweep.png) in OUTPUT_DIR give, per r, the eval loss,
the exact match (when eval_generate > 0), trainable parameters, adapter size and time, and recommend the smallest
r within --margin of the best. A rerun skips finished ranks; a finished rank made with a different configuration
is an error (--overwrite retrains it). No RECIPE: the embedded demo task. OUTPUT_DIR is the recipe's output_dir,
or runs/loratune-sweep when that is left at the default.
"""
from __future__ import annotations

import argparse

from ..recipe import add_override_flags
from ..sweep import ALPHA_RULES, DEFAULT_MARGIN, DEFAULT_RANKS, format_table, run_sweep
from ..train import TrainConfig
from .train import config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train at several LoRA ranks r and compare (table, plot, recommended r)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="YAML recipe (default: the embedded demo); any option below overrides it")
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)), metavar="R1,R2,...",
                   help="ranks to train, comma-separated (default: %(default)s)")
    p.add_argument("--alpha-rule", choices=ALPHA_RULES, default="proportional",
                   help="how lora_alpha follows r: proportional = (recipe alpha/r)·r, so s = alpha/r is constant "
                        "(default); fixed = the recipe's lora_alpha (and use_rslora) at every r; rslora = "
                        "use_rslora on and the recipe's lora_alpha, s = alpha/√r")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="recommend the smallest r whose eval loss is within this relative margin of the best "
                        "(default %(default)s = 2%%)")
    p.add_argument("--accuracy-margin", type=float, default=None, metavar="FRACTION",
                   help="...and, when exact match is measured, whose accuracy is within this many accuracy points "
                        "(as a fraction: 0.02 = 2 points) of the best (default: the same as --margin)")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain ranks whose finished result was made with a different configuration "
                        "(default: stop with an error naming the difference)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved base recipe and exit")
    add_override_flags(p, TrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_recipe:
        from ..recipe import dump_yaml

        print(dump_yaml(cfg), end="")
        return 0
    from ..sweep import SweepConfigMismatch

    try:
        report = run_sweep(cfg, args.ranks, alpha_rule=args.alpha_rule, margin=args.margin,
                           accuracy_margin=args.accuracy_margin, overwrite=args.overwrite,
                           progress=not args.no_progress)
    except SweepConfigMismatch as err:
        from ..cli import UserError

        raise UserError(str(err)) from None
    print()
    print(format_table(report))
    print(f"\ntable: {report.out / 'sweep.md'}, {report.out / 'sweep.json'}; plot: {report.out / 'sweep.png'}")
    return 0
