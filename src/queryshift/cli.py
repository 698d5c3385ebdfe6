"""``queryshift`` command line: one sub-command per module in ``queryshift.commands``.

An expected failure (bad input, a busy or unusable output directory, a full disk, a corrupt file) prints
one line ``queryshift <command>: error: <cause>`` and exits 2; anything else prints one line that points to
``--debug``, which shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# command -> (module under queryshift.commands, its one-line help). Each module defines add_parser(subparsers)
# and main(args); only the module of the command given is imported, so ``--help`` and ``list`` stay fast (a
# command module may import torch). tests/test_layers.py checks these help lines against the modules' own.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "adapt a model online on one query stream and write DIR/result.json"),
    "bench": ("bench", "run a grid of methods x shifts x directions and write one results table"),
    "corrupt": ("corrupt", "write corrupted copies of a dataset (COCO-C / Flickr-C layout)"),
    "train-source": ("train_source", "train the shapes-world CLIP (shapes-clip-general, shapes-clip)"),
    "train-av": ("train_av", "train the shapes-av video-audio model (general stage, then customization)"),
    "train-combiner": ("train_combiner",
                       "train a composed-query combiner on a frozen backbone (the shipped shapes-cir one)"),
    "list": ("info", "list the registered methods, shifts, datasets and backbones"),
    "serve": ("serve", "serve retrieval over HTTP, adapting the query encoder online as queries arrive"),
}

DEBUG_HELP = "show the full Python traceback of an error"


def _command_in(argv: list[str]) -> str | None:
    """The command named on the command line (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the full options of the command named in ``argv`` (every command's when ``argv`` is None),
    a one-line entry for the others."""
    parser = argparse.ArgumentParser(
        prog="queryshift",
        description="Online test-time adaptation of cross-modal retrieval models under query shift.")
    parser.add_argument("--version", action="version", version=f"queryshift {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(COMMANDS) if argv is None else {_command_in(argv)}
    for name, (module, helptext) in COMMANDS.items():
        if name in wanted:
            importlib.import_module(f".commands.{module}", __package__).add_parser(sub)
        else:
            sub.add_parser(name, help=helptext, add_help=False)
    for p in sub.choices.values():  # also accepted after the command; SUPPRESS keeps the top-level value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def describe(err: BaseException) -> str:
    """One line for an expected failure: the file and the cause."""
    if isinstance(err, OSError) and err.strerror:
        where = err.filename if err.filename is not None else ""
        if err.filename2 is not None:
            where = f"{where} -> {err.filename2}"
        return f"{where}: {err.strerror}" if where else err.strerror
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({err}); re-save it as UTF-8"
    text = str(err) or type(err).__name__
    return " ".join(text.split()) if "\n" in text else text


def expected_errors() -> tuple[type[BaseException], ...]:
    from .locks import LockedError

    # ValueError covers DataError, ConfigError, RunDirError, bad settings and JSON/UTF-8 decoding;
    # OSError covers missing files, permissions, a path under a file and a full disk;
    # FloatingPointError covers non-finite losses (--on-nonfinite raise) and galleries
    return (ValueError, OSError, ImportError, LockedError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted: results written so far are kept; rerun with --resume to continue", file=sys.stderr)
        return 130
    except expected_errors() as err:
        if args.debug:
            raise
        print(f"queryshift {args.command}: error: {describe(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            raise
        print(f"queryshift {args.command}: internal error: {type(err).__name__}: {describe(err)} "
              f"(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
