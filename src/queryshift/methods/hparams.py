"""Declared types and ranges of method hyper-parameters, checked before a run touches its output directory.

A method lists its hyper-parameters next to its ``defaults``::

    hparam_spec = {"tau": HP(float, gt=0), "con_ratio": HP(float, gt=0, le=1, min_selected=1)}

:func:`validate_hparams` turns user values into the declared types and rejects the rest with a message
naming the method, the hyper-parameter, the allowed range and the value. Values may come as text
(``--hparam tau=0.01``, or YAML 1.1 reading ``3e-4`` as a string) or already typed (YAML configs); a string
hyper-parameter keeps its text (``decouple=off`` stays ``"off"``; a YAML ``off``, read as False, maps back to
the choice ``"off"``). Floats must be finite: a NaN temperature only produces NaN losses and invalid JSON.

``min_selected`` marks a fraction of the batch from which the method selects ``int(fraction * B)`` samples
(a queue fill, an entropy filter); :func:`min_batch_size` derives the smallest batch at which that selects
at least ``min_selected`` samples, so a run can warn before it streams a batch size that never adapts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from ..userfiles import short_repr


class RawText(str):
    """A value typed as text (``--hparam KEY=VALUE``): the hyper-parameter's spec decides its type.

    For a key without a spec it is read as a YAML scalar, as before specs existed.
    """


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NONE = ("none", "null", "~", "")


@dataclass(frozen=True)
class HP:
    """One hyper-parameter: its type (float, int, bool or str) and the values it may take."""

    type: type
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    none: bool = False  # None (``none``/``null`` on the command line) is a valid value
    min_selected: int | None = None  # a batch fraction that must select at least this many samples

    def check(self, name: str, value: Any) -> Any:
        """``value`` converted to the declared type; ValueError naming ``name`` when it does not fit."""
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if self.none:
                return None
            raise ValueError(f"{name} must be {self.describe()}, got {short_repr(value)}")
        value = self._convert(name, value)
        if self.type in (int, float):
            self._check_range(name, value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, self.choices))}, got {short_repr(value)}")
        return value

    def _convert(self, name: str, value: Any) -> Any:
        text = value.strip() if isinstance(value, str) else None
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError(f"{name} must be true or false, got {short_repr(value)}")
        if self.type is str:
            if isinstance(value, str):
                return str(value)
            if isinstance(value, bool) and self.choices:  # YAML 1.1 reads on/off/yes/no as booleans
                for word in (_TRUE if value else _FALSE):
                    if word in self.choices:
                        return word
            raise ValueError(f"{name} must be {self.describe()}, got {short_repr(value)}")
        if isinstance(value, bool):
            raise ValueError(f"{name} must be {self.describe()}, got {short_repr(value)}")
        if text is not None and text.lower().lstrip("+-") in (".nan", ".inf"):  # YAML spellings
            text = text.replace(".", "", 1)
        try:
            number = float(text) if text is not None else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {self.describe()}, got {short_repr(value)}") from None
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {short_repr(value)}")
        if self.type is int:
            if number != int(number):
                raise ValueError(f"{name} must be an integer, got {short_repr(value)}")
            return int(number)
        return number

    def _check_range(self, name: str, value: float) -> None:
        for bound, ok, sign in ((self.gt, lambda v, b: v > b, ">"), (self.ge, lambda v, b: v >= b, ">="),
                                (self.lt, lambda v, b: v < b, "<"), (self.le, lambda v, b: v <= b, "<=")):
            if bound is not None and not ok(value, bound):
                raise ValueError(f"{name} must be {sign} {bound:g}, got {short_repr(value)}")

    def describe(self) -> str:
        kind = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[self.type]
        if self.choices:
            kind = "one of " + ", ".join(map(repr, self.choices))
        bounds = [f"{s} {b:g}" for b, s in ((self.gt, ">"), (self.ge, ">="), (self.lt, "<"), (self.le, "<="))
                  if b is not None]
        return kind + (" " + " and ".join(bounds) if bounds else "") + (" or none" if self.none else "")


def validate_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
    """The user's hyper-parameters for method class ``cls``, converted and checked against its spec.

    Unknown keys (not in ``cls.defaults``) are refused; keys the method declares no spec for pass unchanged.
    """
    if not isinstance(hparams, dict):
        raise ValueError(f"method {cls.name!r}: hparams must be a mapping of name: value, got {short_repr(hparams)}")
    unknown = sorted(set(hparams) - set(cls.defaults))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for method {cls.name!r}; "
                         f"known: {sorted(cls.defaults)}")
    spec = getattr(cls, "hparam_spec", {})
    out = {}
    for key, value in hparams.items():
        try:
            if key in spec:
                out[key] = spec[key].check(key, value)
            else:
                out[key] = yaml.safe_load(value) if isinstance(value, RawText) else value
        except ValueError as err:
            raise ValueError(f"method {cls.name!r}: hyper-parameter {err}") from None
        except RecursionError:
            raise ValueError(f"method {cls.name!r}: hyper-parameter {key}: value nested too deeply to read") from None
    return out


def min_batch_size(cls, hparams: dict[str, Any]) -> tuple[int, str] | None:
    """(smallest batch size at which every batch-fraction hyper-parameter selects enough samples, its name);
    None when the method has none. A fraction of 0 never selects: the size is then unbounded (``sys.maxsize``).
    """
    hp = {**cls.defaults, **hparams}
    need = None
    for key, spec in getattr(cls, "hparam_spec", {}).items():
        frac = hp.get(key)
        if spec.min_selected is None or frac is None:
            continue
        b = next((b for b in range(1, 1 << 16) if int(frac * b) >= spec.min_selected), 1 << 62)
        if need is None or b > need[0]:
            need = (b, key)
    return need
