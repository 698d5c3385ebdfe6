"""How long ``queryshift --help`` and ``queryshift list`` take, against ``python -c "import torch"``.

Each command runs ``--repeat`` times, interleaved so that a busy machine slows all of them alike; the median
wall time of each and its ratio to importing torch are printed. The goal (issue 28): under a quarter.

    python benchmarks/cli_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "queryshift --help": [sys.executable, "-m", "queryshift", "--help"],
    "queryshift list": [sys.executable, "-m", "queryshift", "list"],
}


def wall_time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeat):
        for name, argv in COMMANDS.items():
            times[name].append(wall_time(argv))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="runs of each command (default 5)")
    args = p.parse_args(argv)
    medians = measure(args.repeat)
    torch_time = medians["import torch"]
    print(f"{'command':<20} {'median s':>9} {'vs import torch':>16}")
    for name, seconds in medians.items():
        print(f"{name:<20} {seconds:>9.3f} {seconds / torch_time:>16.2f}")
    worst = max(medians["queryshift --help"], medians["queryshift list"]) / torch_time
    print(f"slowest of --help and list: {worst:.2f} x import torch (goal < 0.25)")
    return 0 if worst < 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
