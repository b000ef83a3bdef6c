"""``loratune inspect ADAPTER_DIR``: the singular values of every ΔW = s·B·A in a trained adapter, effective ranks
at 90%/99% of the energy, and a suggested r (the 90th percentile over modules of the 99%-energy effective rank,
rounded up to a power of two). Reads the adapter only; a PNG of the spectra is written only with ``--plot PATH``.
"""
from __future__ import annotations

import argparse

from ..inspect import SUGGEST_PERCENTILE, format_report, inspect_adapter, plot_spectra, report_to_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="spectrum of each LoRA update ΔW and a suggested rank r for an adapter",
                       description=__doc__)
    p.add_argument("adapter", metavar="ADAPTER_DIR",
                   help="adapter directory (adapter_config.json + adapter_model.safetensors, as PEFT or loratune write it)")
    p.add_argument("--json", action="store_true", help="print JSON (every module's singular values included) instead of tables")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="write a PNG of the normalised spectra σ_i/σ_1 to PATH (one panel per module type); "
                        "default: no plot (nothing is ever written into the adapter directory unless PATH is there)")
    p.add_argument("--summary", action="store_true", help="only the per-module-type table and the suggestion")
    p.add_argument("--percentile", type=float, default=SUGGEST_PERCENTILE,
                   help="percentile over modules of the 99%%-energy effective rank behind the suggested r "
                        "(default 90; 100 = the maximum)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = inspect_adapter(args.adapter, percentile=args.percentile)
    if args.plot:
        plot_spectra(report, args.plot)
    print(report_to_json(report) if args.json else format_report(report, modules=not args.summary))
    return 0
