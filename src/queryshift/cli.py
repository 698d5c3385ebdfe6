"""``queryshift`` command line: one sub-command per module in ``queryshift.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# module names under queryshift.commands; each defines add_parser(subparsers) and main(args)
COMMANDS = ("run", "bench", "corrupt", "train_source", "train_combiner", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queryshift",
        description="Online test-time adaptation of cross-modal retrieval models under query shift.")
    parser.add_argument("--version", action="version", version=f"queryshift {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: results written so far are kept; rerun with --resume to continue", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"queryshift {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
