"""``queryshift list``: what methods, shifts, datasets and backends are available."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list the registered methods, shifts, datasets and backbones",
                              description="List the registered methods, query shifts, datasets and backbones.")
    p.set_defaults(func=main)


def main(args) -> int:
    from .. import data, methods, models

    print("methods:  " + ", ".join(methods.available()))
    print("datasets: " + ", ".join(data.DATASETS) + ", <karpathy.json>, <pairs.jsonl|csv>")
    print("models:   " + ", ".join([f"{b}:<spec>" for b in models.BACKENDS] + list(models.ALIASES)))
    try:
        from ..shifts.registry import MODALITIES, list_shifts

        for modality in MODALITIES:  # every query modality with a shift catalogue: image, text, audio, video
            print(f"{modality} shifts: " + ", ".join(list_shifts(modality)))
    except ImportError:
        pass
    return 0
