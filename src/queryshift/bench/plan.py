"""Suites or an ad-hoc grid -> tables of ``(labels, RunConfig)``, counted and checked before anything runs.

A table is a dict: ``name``, ``description``, ``runs`` (``[(labels, RunConfig)]``), ``published`` (the paper's
number per row) and ``hints`` (``rows``, ``columns``, ``metric``).
"""

from __future__ import annotations

import os
from typing import Any

from ..engine import RunConfig
from .suites import description, grid_size, suite_path
from .tables import check_metric, table_metrics

# a grid above this many runs is refused unless the caller raises the cap (--max-runs): a typo in an axis can
# turn a small suite into hours of runs, and building every point of such a grid alone takes minutes
DEFAULT_MAX_RUNS = 2000


def check_size(n_runs: int, max_runs: int | None, what: str) -> None:
    if max_runs is not None and n_runs > max_runs:
        raise ValueError(f"{what} has {n_runs} runs, more than the cap of {max_runs}; check its axes, or allow it "
                         f"with --max-runs {n_runs}")


def with_overrides(run_dict: dict, overrides: dict) -> RunConfig:
    merged = {**run_dict, **overrides}
    if "hparams" in overrides:
        merged["hparams"] = {**run_dict.get("hparams", {}), **overrides["hparams"]}
    return RunConfig.from_dict(merged)


def plan_suites(names: list[str], overrides: dict[str, Any] | None = None,
                max_runs: int | None = DEFAULT_MAX_RUNS) -> list[dict[str, Any]]:
    """One table per suite (a name or a YAML path); ``overrides`` are run settings that replace every run's."""
    from ..configs import suite_runs

    overrides = overrides or {}
    paths = [suite_path(name) for name in names]
    check_size(sum(grid_size(p) for p in paths), max_runs, "the grid of " + ", ".join(names))
    tables = []
    for path in paths:
        _, runs, published, hints = suite_runs(path)
        for metric in table_metrics(hints):
            try:
                check_metric(metric)
            except ValueError as err:
                raise ValueError(f"{path}: table: {err}") from None
        runs = [(labels, with_overrides(run_dict, overrides)) for labels, run_dict in runs]
        tables.append({"name": os.path.splitext(os.path.basename(path))[0], "description": description(path),
                       "runs": runs, "published": published, "hints": hints})
    check_shifts(tables)
    return tables


def plan_grid(methods: list[str], shifts: list[str], directions: list[str], base: dict | None = None,
              overrides: dict[str, Any] | None = None, max_runs: int | None = DEFAULT_MAX_RUNS) -> list[dict]:
    """One table ``grid`` of methods x directions x shifts ('clean' = no shift); a shift that does not fit a
    direction's queries (an image corruption on the captions of t2i) is left out."""
    for what, values in (("methods", methods), ("shifts", shifts), ("directions", directions)):
        if not values or any(not str(v).strip() for v in values):
            raise ValueError(f"--{what} is empty or has an empty entry ({','.join(values)!r}); name at least one, "
                             f"comma-separated")
    check_size(len(methods) * len(shifts) * len(directions), max_runs, "the grid")
    base, overrides = base or {}, overrides or {}
    runs = []
    for m in methods:
        for d in directions:
            for s in shifts:
                if not fits(s, d):
                    continue  # e.g. an image corruption on the text queries of t2i
                labels = {"method": m, "direction": d, "shift": s}
                runs.append((labels, with_overrides({**base, "method": m, "direction": d,
                                                     "shift": None if s == "clean" else s}, overrides)))
    tables = [{"name": "grid", "description": "", "runs": runs, "published": {},
               "hints": {"rows": "method", "columns": ["direction", "shift"], "metric": "r1"}}]
    check_shifts(tables)
    return tables


def check_shifts(tables) -> None:
    """Every point's shift must exist for its queries: a typo in the 40th point fails before the first runs."""
    from .. import shifts

    checked = set()
    for t in tables:
        for labels, cfg in t["runs"]:
            key = (cfg.shift, cfg.query_modality)
            if key[1] == "composed" or key in checked:  # composed shifts are checked when their run starts
                continue
            checked.add(key)
            if loads_models(cfg.shift):
                continue  # a name the catalogue knows; its models load (or fail) when that point starts
            try:
                shifts.build(cfg.shift, key[1], cfg.seed)
            except ValueError as err:
                point = ", ".join(f"{k}={v}" for k, v in labels.items())
                raise ValueError(f"{t['name']} ({point}): {err}") from None
            except (ImportError, OSError):
                pass  # a missing optional package or data file: reported by the point that needs it


def loads_models(spec: str | None) -> bool:
    """Sentence-level text corruptions and the semantic filter load language models when built."""
    from ..shifts.registry import ALIASES
    from ..shifts.text import SENTENCE_CORRUPTIONS

    if not spec:
        return False
    name = spec.partition(":")[0]
    return spec.endswith("+filter") or ALIASES.get(name, name) in SENTENCE_CORRUPTIONS


def fits(shift: str, direction: str) -> bool:
    """Whether ``shift`` applies to the queries of ``direction`` (its first letter: :mod:`queryshift.modalities`);
    a shift that exists for no query modality, or with a bad severity, raises its own error."""
    from .. import shifts
    from ..modalities import COMPOSED, parse_direction
    from ..shifts.registry import ALIASES, CATALOGUES, MODALITIES

    spec = None if shift == "clean" else shift
    modality = parse_direction(direction)[0]
    if modality == COMPOSED:  # composed queries take image, text and combined shifts alike
        from ..engine.composed import build_composed_shift

        build_composed_shift(spec)
        return True
    name = (spec or "").partition(":")[0]
    name = ALIASES.get(name, name)
    owners = [m for m in MODALITIES if name in CATALOGUES[m]]
    if owners:  # a corruption's own modalities decide (gaussian_noise: image, audio and video)
        if not loads_models(spec):  # e.g. a severity out of range: that error, not a modality mismatch
            shifts.build(spec, modality if modality in owners else owners[0])
        return modality in owners
    try:
        shifts.build(spec, modality)
        return True
    except ValueError as err:
        for other in MODALITIES:  # a style of another modality does not fit; a shift of none is an error
            if other != modality:
                try:
                    shifts.build(spec, other)
                    return False
                except ValueError:
                    continue
        raise err from None
