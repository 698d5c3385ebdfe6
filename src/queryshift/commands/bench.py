"""``queryshift bench``: run a grid of online adaptation runs and write one results table.

A grid comes from one or more suites (``NAME`` from the package's suites, a ``configs/suites`` folder here or
``QUERYSHIFT_SUITES``, or a YAML path; see :mod:`queryshift.configs`) or from ``--methods/--shifts/--directions``.
Every run writes its own directory under ``OUT/runs/``; a finished run is read back instead of recomputed and an
interrupted one resumes, so rerunning the same command after a kill only does the missing work. Output:
``OUT/results.json``, ``OUT/results.md`` and one PNG per table. The work is done by :mod:`queryshift.bench`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from .run import add_run_options, config_from_args

DEFAULT_MAX_RUNS = 2000  # queryshift.bench.DEFAULT_MAX_RUNS, repeated so that --help imports nothing heavy


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="run a grid of methods x shifts x directions and write one results table",
        description=__doc__.split("\n\n")[0] + " Finished runs are reused and interrupted ones resume.")
    p.add_argument("--suite", action="append", default=[],
                   help="suite name (a shipped suite, configs/suites/NAME.yaml here, or in QUERYSHIFT_SUITES) or "
                        "YAML path; repeatable, one table each")
    p.add_argument("--methods", help="comma-separated methods for an ad-hoc grid (default: every registered)")
    p.add_argument("--shifts", help="comma-separated shifts for an ad-hoc grid ('clean' = no shift; default clean)")
    p.add_argument("--directions", default="i2t,t2i", help="comma-separated directions (default i2t,t2i)")
    p.add_argument("--config", help="YAML run settings shared by an ad-hoc grid")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--title", default="queryshift benchmark", help="heading of results.md")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each (default 1)")
    p.add_argument("--max-runs", dest="max_runs", type=int, default=DEFAULT_MAX_RUNS,
                   help=f"refuse a grid of more runs than this before building it (default {DEFAULT_MAX_RUNS})")
    p.add_argument("--report", help="write the Markdown report here instead of OUT/results.md (PNGs beside it)")
    p.add_argument("--notes", help="a Markdown file included after the report's header (analysis, caveats)")
    add_run_options(p)
    p.set_defaults(func=main)


def _overrides(args) -> dict[str, Any]:
    """Run settings given on the command line, which override every suite run."""
    # hparams are checked in each grid point against its own method, not against the default one here
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "config": None, "hparam": None}))
    given = {k for k, v in vars(args).items() if v is not None}
    values = {k: v for k, v in vars(cfg).items() if k in given and k not in ("out", "config")}
    if args.hparam:
        values["hparams"] = dict(args.hparam)
    return values


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def plan(args) -> list[dict[str, Any]]:
    """-> tables: {name, description, runs: [(labels, RunConfig)], published, table hints}."""
    from .. import bench, methods
    from ..configs import load_run_config

    if args.max_runs is not None and args.max_runs < 1:
        raise ValueError(f"--max-runs must be >= 1, got {args.max_runs}")
    overrides = _overrides(args)
    if args.suite:
        return bench.plan_suites(args.suite, overrides, args.max_runs)
    base = load_run_config(args.config) if args.config else {}
    return bench.plan_grid(_items(args.methods) if args.methods is not None else methods.available(),
                           _items(args.shifts) if args.shifts is not None else ["clean"],
                           _items(args.directions), base, overrides, args.max_runs)


def invoked_command(argv: list[str]) -> str:
    """The command line as a user would retype it: ``queryshift ...`` for the console script and for
    ``python -m queryshift`` / ``python -m queryshift.cli`` (whose argv[0] is the module's file path)."""
    entry = argv[0].replace("\\", "/")
    if entry.endswith(("queryshift", "queryshift/__main__.py", "queryshift/cli.py")):
        return "queryshift " + " ".join(shlex.quote(a) for a in argv[1:])
    return " ".join(shlex.quote(a) for a in argv)


def main(args) -> int:
    from .. import bench
    from ..locks import ExclusiveLock

    if args.notes:
        bench.read_notes(args.notes)  # a missing notes file fails now, not after the last run
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    tables = plan(args)  # the whole grid is checked before anything is written
    os.makedirs(args.out, exist_ok=True)
    command = invoked_command(sys.argv)
    with ExclusiveLock(args.out, what=f"bench output directory {args.out}"):  # one bench per --out
        records = bench.execute(tables, args.out, progress=args.progress is not False, jobs=args.jobs)
        text = bench.report(tables, records, args.out, args.title, command, args.report, args.notes)
    print(text)
    print(f"wrote {args.report or os.path.join(args.out, 'results.md')}, {args.out}/results.json "
          f"and one PNG per table")
    return 0
