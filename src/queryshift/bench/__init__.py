"""Benchmark grids as a library: plan a grid of runs, run it (finished runs reused, interrupted ones resumed),
and write one results table per suite. ``queryshift bench`` is a thin command line over this package.

- :mod:`.suites`  where suites are found (the package's, a ``configs/suites`` here, ``QUERYSHIFT_SUITES``)
- :mod:`.plan`    suites or an ad-hoc grid -> tables of ``(labels, RunConfig)``, counted and checked first
- :mod:`.pool`    run every grid point, serially or in worker processes; reuse finished ones
- :mod:`.tables`  the metrics a table may show and its Markdown rendering
- :mod:`.plots`   one PNG per table
- :mod:`.report`  ``results.md`` and ``results.json``
"""

from .plan import DEFAULT_MAX_RUNS, check_shifts, plan_grid, plan_suites
from .pool import execute, log_means, run_dir
from .report import read_notes, report
from .suites import PACKAGE_SUITES, suite_dirs, suite_path
from .tables import METRICS, check_metric, render_table

__all__ = ["DEFAULT_MAX_RUNS", "METRICS", "PACKAGE_SUITES", "check_metric", "check_shifts", "execute",
           "log_means", "plan_grid", "plan_suites", "read_notes", "render_table", "report", "run_dir",
           "suite_dirs", "suite_path"]
