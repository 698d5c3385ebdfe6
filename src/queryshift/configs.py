"""YAML run configs and benchmark suites (``configs/``).

A **run config** is a mapping whose keys are :class:`queryshift.engine.RunConfig` fields. A **suite**
(``configs/suites/<name>.yaml``) describes one table of the paper::

    description: free text
    base: {config: ../qs/coco-i2t-blip-base.yaml, steps: 3}   # a run config, optionally built on a file
    grid:                       # the Cartesian product of the axes, in this order
      method: [source, tent, tcr]
      shift: [gaussian_noise:5, shot_noise:5]
      dataset:                  # an axis whose values are mappings merges them into the run;
        - {label: coco, data: ..., image_root: ...}   # "label" names the value in tables
    rules:                      # optional: settings for the runs whose labels match every "when" entry
      - when: {method: [tent, eata], dataset: fashion_gen}
        set: {hparams: {tau: 0.001}}
    published: {source: 45.0, tcr: 59.1}   # optional: the paper's number per row (first axis)
    table: {rows: method, columns: shift, metric: r1}   # optional hints for ``queryshift bench``

Relative ``config:`` paths are resolved against the including file. Data and weight paths are NOT checked at
load time (configs describe a GPU machine); :func:`check_paths` lists the ones that are absent.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from typing import Any

import yaml

from .userfiles import clip, describe, open_regular, short_repr

SUITE_KEYS = {"description", "base", "grid", "rules", "published", "table"}
TABLE_KEYS = {"rows", "columns", "metric"}
# values a config may hold once YAML aliases are expanded; the largest shipped suite holds a few hundred,
# while a few hundred bytes of nested aliases expand to millions (and json/repr expand them all)
MAX_VALUES = 100_000


class ConfigError(ValueError):
    """A bad config file; the message names the file and the key."""


def _run_fields() -> dict[str, dataclasses.Field]:
    from .engine import RunConfig

    return {f.name: f for f in dataclasses.fields(RunConfig)}


def read_yaml(path: str) -> dict:
    """A YAML mapping from a user's file; a pipe, bad text, deep nesting or an alias bomb is a ConfigError."""
    try:
        with open_regular(path, encoding="utf-8", error=ConfigError) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (offset {err.start}); re-save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({clip(str(err), 600)})") from err
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    except ValueError as err:  # a constructor's own refusal, e.g. an integer of more than 4300 digits
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: not readable as YAML ({clip(str(err))})") from None
    if data is None:
        return {}
    if _too_many_values(data):
        raise ConfigError(f"{path}: more than {MAX_VALUES} values once its YAML aliases (*name) are expanded; "
                          f"write the settings out instead")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def _too_many_values(data) -> bool:
    """Whether ``data`` holds more than MAX_VALUES values counted as copies (what repr/json would expand);
    a self-referencing alias counts forever, so it is refused too."""
    count, stack = 0, [data]
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return True
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)
    return False


def _coerce(key: str, value: Any, field: dataclasses.Field, where: str) -> Any:
    """Check/convert one value against the RunConfig field's annotation (a string under PEP 563)."""
    kind = str(field.type)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{where}: '{key}' may not be null")
    try:
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if kind.startswith("float"):  # YAML 1.1 reads 3e-4 (no dot) as a string
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind.startswith("dict"):
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if kind.startswith("str") and not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise TypeError
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: '{key}' must be {kind}, got {short_repr(value)}") from err
    return value


def validate_run(values: dict, where: str, partial: bool = False) -> dict:
    """Reject unknown keys, coerce types and apply RunConfig's own checks; -> the cleaned mapping.

    ``partial``: the settings shared by several runs (a suite's base), whose hyper-parameters are checked
    in each run, against that run's method.
    """
    fields = _run_fields()
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {short_repr(key)}; known keys: {', '.join(sorted(fields))}")
        out[key] = _coerce(key, value, fields[key], where)
    if out.get("record", "last") not in ("first", "last"):
        raise ConfigError(f"{where}: 'record' must be 'first' or 'last', got {short_repr(out['record'])}")
    from .engine import RunConfig

    try:
        RunConfig(**({k: v for k, v in out.items() if k != "hparams"} if partial and "method" not in out else out))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {clip(str(err), 600)}") from err
    return out


def _with_includes(values: dict, path: str, seen: tuple = ()) -> dict:
    """Resolve a ``config: <file>`` entry: that file's settings, overridden by the other entries."""
    values = dict(values)
    inc = values.pop("config", None)
    if inc is None:
        return values
    if not isinstance(inc, str) or not inc:
        raise ConfigError(f"{path}: 'config' must be the path of a YAML file, got {describe(inc)}")
    inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
    if os.path.abspath(inc_path) in seen:
        raise ConfigError(f"{path}: 'config' includes form a cycle through {inc_path}")
    parent = _with_includes(read_yaml(inc_path), inc_path, seen + (os.path.abspath(inc_path),))
    return _merge(parent, values)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if k == "hparams" and isinstance(out.get(k), dict) and isinstance(v, dict) \
            else copy.deepcopy(v)
    return out


def load_run_config(path: str) -> dict:
    """Read and validate a run YAML (``config: other.yaml`` may supply defaults) -> RunConfig keyword dict."""
    return validate_run(_with_includes(read_yaml(path), path, (os.path.abspath(path),)), path)


def suite_runs(path: str) -> tuple[dict, list[tuple[dict[str, str], dict]], dict[str, float], dict]:
    """-> (base, [(labels per grid axis, run dict)], published, table hints). Every run is validated."""
    suite = read_yaml(path)
    for key in suite:
        if key not in SUITE_KEYS:
            raise ConfigError(f"{path}: unknown suite key {short_repr(key)}; known keys: "
                              f"{', '.join(sorted(SUITE_KEYS))}")
    base = suite.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: 'base' must be a mapping of run settings")
    base = _with_includes(base, path, (os.path.abspath(path),))
    validate_run(base, f"{path} (base)", partial=True)
    grid = suite.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: 'grid' must map each axis to a non-empty list")
    fields = _run_fields()
    axes = []
    for axis, values in grid.items():
        opts = []
        for v in values:
            if isinstance(v, dict):
                v = dict(v)
                label = str(v.pop("label", "") or ",".join(f"{k}={x}" for k, x in v.items()))
                opts.append((label, v))
            elif axis in fields:
                opts.append((str(v), {axis: v}))
            else:
                raise ConfigError(f"{path}: grid axis {short_repr(axis)} is not a run setting, so its values must "
                                  f"be mappings of run settings (got {short_repr(v)})")
        axes.append((axis, opts))
    rules = suite.get("rules") or []
    for n, rule in enumerate(rules):
        if not isinstance(rule, dict) or set(rule) != {"when", "set"} or not isinstance(rule["when"], dict):
            raise ConfigError(f"{path}: rules[{n}] must be a mapping with 'when' (a mapping) and 'set'")
    runs = []
    for combo in itertools.product(*(opts for _, opts in axes)):
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
        run = copy.deepcopy(base)
        for _, settings in combo:
            run = _merge(run, settings)
        for rule in rules:
            if all(_matches(labels.get(k, run.get(k)), want) for k, want in rule["when"].items()):
                run = _merge(run, rule["set"])
        where = f"{path} (run {', '.join(f'{clip(k, 60)}={clip(v, 100)}' for k, v in labels.items())})"
        runs.append((labels, validate_run(run, where)))
    published = suite.get("published") or {}
    if not isinstance(published, dict) or not all(
            isinstance(v, (int, float)) or v is None for v in published.values()):
        raise ConfigError(f"{path}: 'published' must map row labels to numbers")
    table = suite.get("table") or {}
    if not isinstance(table, dict) or set(table) - TABLE_KEYS:
        raise ConfigError(f"{path}: 'table' may only hold {sorted(TABLE_KEYS)}")
    return base, runs, {str(k): v for k, v in published.items()}, table


def _matches(value, want) -> bool:
    wants = want if isinstance(want, list) else [want]
    return any(str(value) == str(w) for w in wants)


def load_suite(path: str) -> tuple[dict, list[dict], dict[str, float]]:
    """-> (base run dict, one run dict per grid point, published R@1 per row)."""
    base, runs, published, _ = suite_runs(path)
    return base, [run for _, run in runs], published


def check_paths(cfg: dict) -> list[str]:
    """Data and weight locations of a run dict that do not exist here, as 'key: path (what)' strings.

    Relative paths are taken from the current directory, like the engine does. Hub model ids are looked up
    in the local Hugging Face cache.
    """
    missing = []
    data = cfg.get("data")
    if data:
        from .data import DATASETS

        name, _, arg = data.partition(":")
        path = arg if name in DATASETS else data
        if path and not os.path.exists(os.path.expanduser(path)):
            missing.append(f"data: {path} (annotation file or dataset root)")
    root = cfg.get("image_root")
    if root and not os.path.isdir(os.path.expanduser(root)):
        missing.append(f"image_root: {root} (image directory)")
    model = cfg.get("model") or ""
    backend, _, spec = model.partition(":")
    if backend in ("hf-blip", "hf-clip", "hf-clap") and spec:
        if os.path.isdir(os.path.expanduser(spec)):
            pass
        elif os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1:
            missing.append(f"model: {spec} (model directory)")
        elif not _hub_cached(spec):
            missing.append(f"model: {spec} (not in the Hugging Face cache; huggingface-cli download {spec})")
    elif backend == "cav-mae" and spec and not os.path.exists(os.path.expanduser(spec)):
        missing.append(f"model: {spec} (CAV-MAE checkpoint or its directory)")
    elif backend == "openclip" and "@" in spec:
        ckpt = spec.partition("@")[2]
        if not os.path.isfile(os.path.expanduser(ckpt)):
            missing.append(f"model: {ckpt} (open_clip checkpoint)")
    return missing


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id
        return False
