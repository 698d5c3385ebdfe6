"""Run every grid point, serially or in worker processes of one torch thread each; reuse finished runs."""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

from ..engine import RunConfig, run, settings_changed
from ..userfiles import open_regular, parse_json
from .tables import RECORD_KEYS


def run_dir(out: str, table: str, labels: dict[str, str]) -> str:
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


def run_one(cfg: RunConfig, directory: str, threads: int | None) -> dict[str, Any]:
    """One grid point: read a finished result back, resume an interrupted one, or run it."""
    result_path = os.path.join(directory, "result.json")
    if os.path.exists(result_path):
        try:
            with open_regular(result_path, encoding="utf-8") as f:
                result = parse_json(lambda: json.load(f), result_path)
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
            raise ValueError(f"{directory} holds a finished run with other settings ({', '.join(changed)}); "
                             f"remove it or choose another --out")
        if hparams_changed:
            raise ValueError(f"{directory} holds a finished run made with other {cfg.method} hyper-parameters (its "
                             f"defaults changed since: {', '.join(hparams_changed)}); remove it or choose another "
                             f"--out")
        if "model_weights" in result and result["model_weights"] != _source_weights(cfg.model, cfg.seed, cfg.device):
            raise ValueError(f"{directory} holds a finished run of other {cfg.model} weights (retrained or replaced "
                             f"since); remove it or choose another --out")
        return result
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg.out = directory
    cfg.resume = os.path.exists(os.path.join(directory, "log.jsonl"))
    cfg.progress = False
    return run(cfg)


def execute(tables, out: str, progress: bool = True, jobs: int = 1) -> list[dict[str, Any]]:
    """Run every grid point; with ``jobs`` > 1 in that many worker processes of one torch thread each
    (on a small CPU, one thread per run beats several runs fighting over every core)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    points = [(t["name"], labels, cfg, run_dir(out, t["name"], labels)) for t in tables for labels, cfg in t["runs"]]
    bar = tqdm(total=len(points), desc="bench", disable=not progress)
    results: dict[int, dict] = {}
    if jobs <= 1:
        for i, (_, labels, cfg, directory) in enumerate(points):
            bar.set_postfix_str(" ".join(labels.values()))
            results[i] = run_one(cfg, directory, None)
            bar.update(1)
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, cfg, directory, 1): i for i, (_, _, cfg, directory) in enumerate(points)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    bar.close()
    return [{"table": name, "labels": labels, **{k: results[i][k] for k in RECORD_KEYS if k in results[i]},
             "log_means": log_means(directory)} for i, (name, labels, _, directory) in enumerate(points)]


def log_means(directory: str) -> dict[str, float]:
    """Mean over batches of every numeric per-batch log value (losses, n_selected, REST's diagnostics)."""
    values: dict[str, list[float]] = {}
    path = os.path.join(directory, "log.jsonl")
    if os.path.exists(path):
        with open_regular(path, encoding="utf-8") as f:
            for line in f:
                for k, v in parse_json(lambda line=line: json.loads(line), path).items():
                    if k not in ("batch", "n", "seconds") and isinstance(v, (int, float)) and not isinstance(v, bool):
                        values.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in values.items()}
