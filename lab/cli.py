"""``python -m lab.cli ARGS``: the ``queryshift`` CLI with the lab registered.

Sets ``QUERYSHIFT_PLUGINS`` (so that ``rest-design`` is registered in this process and in every process the CLI
starts: ``bench --jobs``, torchrun ranks) and adds ``lab/suites`` to ``QUERYSHIFT_SUITES`` (so that
``--suite validation-rest-design`` finds the lab's suites by name), then runs :func:`queryshift.cli.main`.
"""

from __future__ import annotations

import os
import sys

LAB_SUITES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "suites")


def _prepend(variable: str, value: str, sep: str) -> None:
    parts = [p for p in os.environ.get(variable, "").split(sep) if p]
    os.environ[variable] = sep.join([value, *[p for p in parts if p != value]])


def main(argv: list[str] | None = None) -> int:
    _prepend("QUERYSHIFT_PLUGINS", "lab", ",")
    _prepend("QUERYSHIFT_SUITES", LAB_SUITES, os.pathsep)
    # spawned workers import lab by name: the repository root must be on their path as it is on ours
    _prepend("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pathsep)
    from queryshift import methods
    from queryshift.cli import main as queryshift_main

    methods.load_plugins()
    return queryshift_main(argv)


if __name__ == "__main__":
    sys.exit(main())
