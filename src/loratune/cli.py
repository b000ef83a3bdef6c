"""The ``loratune`` command line: one sub-command per job, each defined next to the code it runs.

Every sub-command module exposes ``add_parser(subparsers)`` (which sets ``func`` on its parser). Errors the user
can fix (bad config, bad data, missing files) print one line ``loratune CMD: error: ...`` and exit with code 2;
anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# Sub-command modules, in the order `loratune --help` lists them.
COMMANDS = ("train", "sweep", "plan", "inspect", "generate", "merge", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loratune", description="LoRA / QLoRA fine-tuning for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"loratune {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"loratune.commands.{name}").add_parser(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the embedded default: `loratune` alone fine-tunes the bundled tiny model
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        _error(args.command, err)
        return err.exit_code
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        _error(args.command, err)
        return 2
    except KeyboardInterrupt:
        print(f"loratune {args.command}: interrupted", file=sys.stderr)
        return 130


def _error(command: str, err: BaseException) -> None:
    """The one-line error. Under torchrun an error every rank raises alike is marked ``quiet`` on ranks other
    than 0, so it is printed once."""
    if not getattr(err, "quiet", False):
        print(f"loratune {command}: error: {err}", file=sys.stderr)


class UserError(Exception):
    """An error the user can fix; printed as one line with exit code ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


if __name__ == "__main__":
    sys.exit(main())
