"""``queryshift bench``: run a grid of online adaptation runs and write one results table.

A grid comes from one or more suites (``configs/suites/<name>.yaml``, see :mod:`queryshift.configs`) or from
``--methods/--shifts/--directions``. Every run writes its own directory under ``OUT/runs/``; a finished run
is read back instead of recomputed and an interrupted one resumes, so rerunning the same command after a kill
only does the missing work. Output: ``OUT/results.json``, ``OUT/results.md`` and one PNG per table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import sys
from typing import Any

from ..engine import RunConfig, run, settings_changed, write_json
from ..locks import ExclusiveLock
from ..runinfo import git_commit, versions
from .run import add_run_options, config_from_args

# the shipped suites are package data (queryshift/suites); a configs/suites under the current directory wins,
# and QUERYSHIFT_SUITES (folders joined by os.pathsep, e.g. the lab's lab/suites) is searched before the package
PACKAGE_SUITES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "suites")
QUERY_MODALITY = {"i2t": "image", "t2i": "text"}
_SLIM = ("r1", "r5", "r10", "r_mean", "map", "r50", "rsubset1", "rsubset2", "rsubset3", "n_queries",
         "segments", "forgetting", "forgetting_general", "skipped_updates", "warnings", "seconds")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="run a grid of methods x shifts x directions and write one results table",
        description=__doc__.split("\n\n")[0] + " Finished runs are reused and interrupted ones resume.")
    p.add_argument("--suite", action="append", default=[],
                   help="suite name (configs/suites/NAME.yaml) or YAML path; repeatable, one table each")
    p.add_argument("--methods", help="comma-separated methods for an ad-hoc grid (default: every registered)")
    p.add_argument("--shifts", help="comma-separated shifts for an ad-hoc grid ('clean' = no shift)")
    p.add_argument("--directions", default="i2t,t2i", help="comma-separated directions (default i2t,t2i)")
    p.add_argument("--config", help="YAML run settings shared by an ad-hoc grid")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--title", default="queryshift benchmark", help="heading of results.md")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each (default 1)")
    p.add_argument("--report", help="write the Markdown report here instead of OUT/results.md (PNGs beside it)")
    p.add_argument("--notes", help="a Markdown file included after the report's header (analysis, caveats)")
    add_run_options(p)
    p.set_defaults(func=main)


def suite_dirs() -> list[str]:
    extra = [os.path.abspath(d) for d in os.environ.get("QUERYSHIFT_SUITES", "").split(os.pathsep) if d]
    dirs = [os.path.join(os.getcwd(), "configs", "suites"), *extra, PACKAGE_SUITES]
    return [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]]


def _suite_path(name: str) -> str:
    if os.path.isfile(name):
        return name
    for folder in suite_dirs():
        path = os.path.join(folder, f"{name}.yaml")
        if os.path.isfile(path):
            return path
    known = sorted({f[:-5] for d in suite_dirs() for f in os.listdir(d) if f.endswith(".yaml")})
    where = " or ".join(suite_dirs()) or "configs/suites"
    raise FileNotFoundError(f"no suite {name!r} (neither a file nor NAME.yaml in {where}); "
                            f"known: {', '.join(known) or 'none'}")


def _overrides(args) -> dict[str, Any]:
    """Run settings given on the command line, which override every suite run."""
    # hparams are checked in each grid point against its own method, not against the default one here
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "config": None, "hparam": None}))
    given = {k for k, v in vars(args).items() if v is not None}
    values = {k: v for k, v in vars(cfg).items() if k in given and k not in ("out", "config")}
    if args.hparam:
        values["hparams"] = dict(args.hparam)
    return values


def plan(args) -> list[dict[str, Any]]:
    """-> tables: {name, description, runs: [(labels, RunConfig)], published, table hints}."""
    from ..configs import load_run_config, suite_runs

    overrides = _overrides(args)
    tables = []
    for name in args.suite:
        path = _suite_path(name)
        _, runs, published, hints = suite_runs(path)
        desc = _description(path)
        runs = [(labels, _with(run_dict, overrides)) for labels, run_dict in runs]
        tables.append({"name": os.path.splitext(os.path.basename(path))[0], "description": desc, "runs": runs,
                       "published": published, "hints": hints})
    if not args.suite:
        from .. import methods

        base = load_run_config(args.config) if args.config else {}
        names = args.methods.split(",") if args.methods else methods.available()
        shift_list = args.shifts.split(",") if args.shifts else ["clean"]
        runs = []
        for m in names:
            for d in args.directions.split(","):
                for s in shift_list:
                    if not _fits(s, d):
                        continue  # e.g. an image corruption on the text queries of t2i
                    labels = {"method": m, "direction": d, "shift": s}
                    runs.append((labels, _with({**base, "method": m, "direction": d,
                                                "shift": None if s == "clean" else s}, overrides)))
        tables.append({"name": "grid", "description": "", "runs": runs, "published": {},
                       "hints": {"rows": "method", "columns": ["direction", "shift"], "metric": "r1"}})
    _check_shifts(tables)
    return tables


def _check_shifts(tables) -> None:
    """Every point's shift must exist for its queries: a typo in the 40th point fails before the first runs."""
    from .. import shifts

    checked = set()
    for t in tables:
        for labels, cfg in t["runs"]:
            key = (cfg.shift, QUERY_MODALITY.get(cfg.direction))
            if key[1] is None or key in checked:
                continue
            checked.add(key)
            if _loads_models(cfg.shift):
                continue  # a name the catalogue knows; its models load (or fail) when that point starts
            try:
                shifts.build(cfg.shift, key[1], cfg.seed)
            except ValueError as err:
                point = ", ".join(f"{k}={v}" for k, v in labels.items())
                raise ValueError(f"{t['name']} ({point}): {err}") from None
            except (ImportError, OSError):
                pass  # a missing optional package or data file: reported by the point that needs it


def _loads_models(spec: str | None) -> bool:
    """Sentence-level text corruptions and the semantic filter load language models when built."""
    from ..shifts.registry import ALIASES
    from ..shifts.text import SENTENCE_CORRUPTIONS

    if not spec:
        return False
    name = spec.partition(":")[0]
    return spec.endswith("+filter") or ALIASES.get(name, name) in SENTENCE_CORRUPTIONS


def _fits(shift: str, direction: str) -> bool:
    from .. import shifts
    from ..shifts.registry import ALIASES, IMAGE_CORRUPTIONS, TEXT_CORRUPTIONS

    spec = None if shift == "clean" else shift
    if direction == "c2i":  # composed queries take image, text and combined shifts alike
        from ..engine.composed import build_composed_shift

        build_composed_shift(spec)
        return True
    modality, other = ("image", "text") if direction == "i2t" else ("text", "image")
    name = (spec or "").partition(":")[0]
    name = ALIASES.get(name, name)
    if name in IMAGE_CORRUPTIONS or name in TEXT_CORRUPTIONS:  # a corruption's own modality decides
        own = "image" if name in IMAGE_CORRUPTIONS else "text"
        if not _loads_models(spec):
            shifts.build(spec, own)  # e.g. a severity out of range: that error, not a modality mismatch
        return own == modality
    try:
        shifts.build(spec, modality)
        return True
    except ValueError:
        shifts.build(spec, other)  # a shift valid for neither modality re-raises its own error here
        return False


def _description(path: str) -> str:
    import yaml

    with open(path, encoding="utf-8") as f:
        return str((yaml.safe_load(f) or {}).get("description") or "").strip()


def _with(run_dict: dict, overrides: dict) -> RunConfig:
    merged = {**run_dict, **overrides}
    if "hparams" in overrides:
        merged["hparams"] = {**run_dict.get("hparams", {}), **overrides["hparams"]}
    return RunConfig.from_dict(merged)


def _run_dir(out: str, table: str, labels: dict[str, str]) -> str:
    name = "__".join(re.sub(r"[^A-Za-z0-9_.=+-]+", "-", str(v)) for v in labels.values())
    return os.path.join(out, "runs", table, name)


@functools.cache
def _source_weights(model: str, seed: int, device: str) -> str:
    from ..engine import source_weights

    return source_weights(model, seed, device)


def _hparams_changed(saved: dict | None, cfg: RunConfig) -> list[str]:
    """Hyper-parameters in which a finished run's method (defaults included) differs from what ``cfg`` would
    use now. Runs written before results recorded them cannot be checked and pass, as without weights."""
    if saved is None:
        return []
    from .. import methods

    now = json.loads(json.dumps({**methods.get(cfg.method).defaults, **cfg.hparams}))
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(saved))
            if saved.get(k) != now.get(k)]


def _run_one(cfg: RunConfig, run_dir: str, threads: int | None) -> dict[str, Any]:
    """One grid point: read a finished result back, resume an interrupted one, or run it."""
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        try:
            with open(result_path, encoding="utf-8") as f:
                result = json.load(f)
            result["config"].get  # noqa: B018 - a finished run's result holds its config
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{result_path}: not a readable result ({type(err).__name__}: {err}); remove that "
                             f"run directory to recompute it") from None
        changed = settings_changed(result["config"], cfg)
        hparams_changed = _hparams_changed(result.get("hparams"), cfg)
        if result.get("hparams") is not None and not hparams_changed:
            # the method's hyper-parameters resolve to the ones the run used: a suite that now spells out a
            # value the run took as a default (because the default changed since) asks for the same run
            changed = [c for c in changed if not c.startswith("hparams ")]
        if changed:  # a suite edited since: never report a stale run under the new settings
            raise ValueError(f"{run_dir} holds a finished run with other settings ({', '.join(changed)}); "
                             f"remove it or choose another --out")
        if hparams_changed:
            raise ValueError(f"{run_dir} holds a finished run made with other {cfg.method} hyper-parameters (its "
                             f"defaults changed since: {', '.join(hparams_changed)}); remove it or choose another "
                             f"--out")
        if "model_weights" in result and result["model_weights"] != _source_weights(cfg.model, cfg.seed, cfg.device):
            raise ValueError(f"{run_dir} holds a finished run of other {cfg.model} weights (retrained or replaced "
                             f"since); remove it or choose another --out")
        return result
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg.out = run_dir
    cfg.resume = os.path.exists(os.path.join(run_dir, "log.jsonl"))
    cfg.progress = False
    return run(cfg)


def execute(tables, out: str, progress: bool = True, jobs: int = 1) -> list[dict[str, Any]]:
    """Run every grid point; with ``jobs`` > 1 in that many worker processes of one torch thread each
    (on a small CPU, one thread per run beats several runs fighting over every core)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    points = [(t["name"], labels, cfg, _run_dir(out, t["name"], labels)) for t in tables for labels, cfg in t["runs"]]
    bar = tqdm(total=len(points), desc="bench", disable=not progress)
    results: dict[int, dict] = {}
    if jobs <= 1:
        for i, (_, labels, cfg, run_dir) in enumerate(points):
            bar.set_postfix_str(" ".join(labels.values()))
            results[i] = _run_one(cfg, run_dir, None)
            bar.update(1)
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, cfg, run_dir, 1): i for i, (_, _, cfg, run_dir) in enumerate(points)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    bar.close()
    return [{"table": name, "labels": labels, **{k: results[i][k] for k in _SLIM if k in results[i]},
             "log_means": log_means(run_dir)} for i, (name, labels, _, run_dir) in enumerate(points)]


def log_means(run_dir: str) -> dict[str, float]:
    """Mean over batches of every numeric per-batch log value (losses, n_selected, REST's diagnostics)."""
    values: dict[str, list[float]] = {}
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                for k, v in json.loads(line).items():
                    if k not in ("batch", "n", "seconds") and isinstance(v, (int, float)) and not isinstance(v, bool):
                        values.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in values.items()}


def _metric(record: dict, metric: str):
    value: Any = record
    for part in metric.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def render_table(t: dict, records: list[dict], metric: str = "r1") -> tuple[str, dict]:
    """Markdown table for one suite: rows by ``hints.rows``, one column per other label combination, average."""
    hints = t["hints"]
    rows_axis = hints.get("rows", "method")
    mine = [r for r in records if r["table"] == t["name"]]
    cols_axes = hints.get("columns") or [a for a in mine[0]["labels"] if a != rows_axis]
    cols_axes = [cols_axes] if isinstance(cols_axes, str) else list(cols_axes)
    rows, cols, cell = [], [], {}
    if metric != "r1" and "." in metric:  # a diagnostic only some methods log: keep the rows that have it
        mine = [r for r in mine if _metric(r, metric) is not None] or mine
    for r in mine:
        row = r["labels"].get(rows_axis, "")
        col = " ".join(r["labels"][a] for a in cols_axes if a in r["labels"])
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cell[row, col] = _metric(r, metric)
    has_pub = bool(t["published"])
    averages = {}
    for row in rows:
        vals = [cell.get((row, c)) for c in cols]
        known = [v for v in vals if isinstance(v, (int, float))]
        averages[row] = sum(known) / len(known) if known and len(known) == len(vals) else None
    # every row against the unadapted model, when the table has one
    has_delta = metric in ("r1", "r5", "r10", "r_mean", "map") and "source" in rows and len(rows) > 1 \
        and averages["source"] is not None
    head = [rows_axis, *cols, "avg"] + (["Δ avg vs source"] if has_delta else []) + (
        ["published avg"] if has_pub else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row, *(_fmt(cell.get((row, c))) for c in cols), _fmt(averages[row])]
        if has_delta:
            delta = None if averages[row] is None else averages[row] - averages["source"]
            cells.append("—" if delta is None else f"{delta:+.2f}")
        cells += [_fmt(t["published"].get(row))] if has_pub else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), {"rows": rows, "cols": cols, "cell": cell, "metric": metric, "averages": averages}


def plot_table(grid: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols = grid["rows"], grid["cols"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.6 * len(cols) + 3)), 5))
    x = np.arange(len(cols))
    for i, row in enumerate(rows):
        vals = [grid["cell"].get((row, c)) for c in cols]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [v if isinstance(v, (int, float)) else 0 for v in vals],
               width, label=row)
    ax.set_xticks(x, cols, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(grid["metric"])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(5, len(rows)), loc="upper center", bbox_to_anchor=(0.5, -0.32))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_notes(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None


def _metric_slug(metric: str, metrics: list[str]) -> str:
    """A metric's part of its table and PNG names: the last part of a dotted path, or the whole path when two
    of the table's metrics end alike (forgetting.forgetting and forgetting_general.mean.forgetting)."""
    last = metric.split(".")[-1]
    if sum(m.split(".")[-1] == last for m in metrics) > 1:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", metric)
    return last


def report(tables, records, out: str, title: str, command: str, report_path: str | None = None,
           notes: str | None = None) -> str:
    """Write the Markdown report (default OUT/results.md; PNGs beside it) and OUT/results.json."""
    commit = git_commit()
    report_path = report_path or os.path.join(out, "results.md")
    report_dir = os.path.dirname(os.path.abspath(report_path))
    prefix = "" if report_path.endswith("results.md") else os.path.splitext(os.path.basename(report_path))[0] + "-"
    parts = [f"# {title}", "", f"Generated by `{command}` at commit `{commit}`.", ""]
    if notes:
        parts += [read_notes(notes), ""]
    grids = {}
    for t in tables:
        parts += [f"## {t['name']}", ""] + ([t["description"], ""] if t["description"] else [])
        metrics = t["hints"].get("metric", "r1")
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        for n, metric in enumerate(metrics):
            md, grid = render_table(t, records, metric)
            name = t["name"] if n == 0 else f"{t['name']}-{_metric_slug(metric, metrics)}"
            grids[name] = grid
            png = f"{prefix}{name}.png"
            plot_table(grid, f"{t['name']} ({metric})", os.path.join(report_dir, png))
            parts += ([f"**{metric}**", ""] if n else []) + [md, "", f"![{name}]({png})", ""]
    text = "\n".join(parts)
    os.makedirs(report_dir, exist_ok=True)
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(text)
    write_json(os.path.join(out, "results.json"), {
        "command": command, "git_commit": commit, "versions": versions(), "runs": records,
        "tables": {n: {"metric": g["metric"], "averages": g["averages"]} for n, g in grids.items()},
    })
    return text


def invoked_command(argv: list[str]) -> str:
    """The command line as a user would retype it: ``queryshift ...`` for the console script and for
    ``python -m queryshift`` / ``python -m queryshift.cli`` (whose argv[0] is the module's file path)."""
    entry = argv[0].replace("\\", "/")
    if entry.endswith(("queryshift", "queryshift/__main__.py", "queryshift/cli.py")):
        return "queryshift " + " ".join(shlex.quote(a) for a in argv[1:])
    return " ".join(shlex.quote(a) for a in argv)


def main(args) -> int:
    if args.notes:
        read_notes(args.notes)  # a missing notes file fails now, not after the last run
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    tables = plan(args)  # the whole grid is checked before anything is written
    os.makedirs(args.out, exist_ok=True)
    command = invoked_command(sys.argv)
    with ExclusiveLock(args.out, what=f"bench output directory {args.out}"):  # one bench per --out
        records = execute(tables, args.out, progress=args.progress is not False, jobs=args.jobs)
        text = report(tables, records, args.out, args.title, command, args.report, args.notes)
    print(text)
    print(f"wrote {args.report or os.path.join(args.out, 'results.md')}, {args.out}/results.json "
          f"and one PNG per table")
    return 0
