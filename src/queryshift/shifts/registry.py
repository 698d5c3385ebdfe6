"""The catalogue behind ``--shift``: corruptions, domain styles and streams.

Spec grammar::

    clean | none                                   identity
    NAME:SEVERITY[+filter]                         gaussian_noise:5, RandomCharAug_swap:7, char_swap:7, sr:6
    NAME[:1]                                       sentence-level text shifts: formal, back_trans, ...
    stream:temporal | stream:diverse               default streams for the query modality
    stream:KIND[@BLOCK]=SPEC,SPEC,...              stream:temporal=clean,gaussian_noise:5,fog:5
                                                   stream:diverse@1=gaussian_noise:5,style:outline
    stream:continual[=SPEC,...]                    each shift streams the whole query set once, in order,
                                                   no reset (default: the 16 image corruptions at 5 in the
                                                   continual-TTA order; text: char/word corruptions at 7)
    stream:continual-s3                            the same at image severity 3
    stream:continual-diverse[@BLOCK][=SPEC,...]    the continual stream's length, shifts interleaved in blocks
    a name from shifts.domain.DOMAIN_SHIFTS        e.g. style:outline (when that module is installed)

Severities: image, audio and video shifts 1-5; character- and word-level text corruptions 1-7; sentence-level 1.
A name is looked up in the catalogue of the query modality first: ``gaussian_noise`` is an image corruption for
image queries, READ's frame corruption for video queries and READ's additive noise for audio queries.
``+filter`` turns on MM_Robustness's semantic-similarity redraw (EDA, ip and style shifts).

Validation shifts (``VALIDATION_SHIFTS``): the image corruptions gaussian_blur, spatter and saturate (1-5),
the image style ``style:sketch``, the caption style ``style:chatty``, the audio shifts lowpass and bitcrush
and the video frame corruptions gaussian_blur, spatter and saturate. They exist to choose
hyper-parameters on; no test table or test suite uses them (``is_validation`` tells them apart).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import modalities
from . import QueryShift
from .audio import AUDIO_SHIFTS, AUDIO_VALIDATION_SHIFTS, AudioShift
from .image import IMAGE_CORRUPTIONS, VALIDATION_CORRUPTIONS, ImageCorruption
from .streams import (
    DEFAULT_BLOCK,
    DEFAULT_CONTINUAL,
    DEFAULT_CONTINUAL_S3,
    DEFAULT_DIVERSE,
    DEFAULT_TEMPORAL,
    ContinualDiverseStream,
    ContinualStream,
    DiverseStream,
    TemporalStream,
)
from .text import SENTENCE_CORRUPTIONS, TEXT_CORRUPTIONS, TextCorruption
from .video import VIDEO_SHIFTS, VIDEO_VALIDATION_SHIFTS, VideoShift

__all__ = ["IMAGE_CORRUPTIONS", "TEXT_CORRUPTIONS", "AUDIO_SHIFTS", "VIDEO_SHIFTS", "VALIDATION_SHIFTS", "CATALOGUES",
           "ALIASES", "build_shift", "list_shifts",
           "is_validation", "WrongModality", "register_shift", "unregister_shift"]


class WrongModality(ValueError):
    """A known shift of the other query modality (a composed query tries each part on both sides)."""

# the query modalities with a shift catalogue of their own (a composed query uses the image and text ones)
MODALITIES = tuple(m for m, kind in modalities.MODALITIES.items() if kind.shift_families == (m,))
# query modality -> the corruption names of its catalogue (test and validation shifts)
CATALOGUES = {
    "image": IMAGE_CORRUPTIONS + VALIDATION_CORRUPTIONS,
    "text": TEXT_CORRUPTIONS,
    "audio": AUDIO_SHIFTS + AUDIO_VALIDATION_SHIFTS,
    "video": VIDEO_SHIFTS + VIDEO_VALIDATION_SHIFTS,
}
TOP_SEVERITY = {"image": 5, "text": 7, "audio": 5, "video": 5}
STREAMS = ("stream:temporal", "stream:diverse", "stream:continual", "stream:continual-s3",
           "stream:continual-diverse")
# stream kind -> (default member shifts per modality, class, whether @BLOCK applies)
STREAM_KINDS = {
    "temporal": (DEFAULT_TEMPORAL, TemporalStream, False),
    "diverse": (DEFAULT_DIVERSE, DiverseStream, True),
    "continual": (DEFAULT_CONTINUAL, ContinualStream, False),
    "continual-s3": (DEFAULT_CONTINUAL_S3, ContinualStream, False),
    "continual-diverse": (DEFAULT_CONTINUAL, ContinualDiverseStream, True),
}
ALIASES = {
    "keyboard": "KeyboardAug", "ocr": "OcrAug",
    "char_insert": "RandomCharAug_insert", "char_substitute": "RandomCharAug_substitute",
    "char_swap": "RandomCharAug_swap", "char_delete": "RandomCharAug_delete",
    "synonym_replacement": "sr", "random_insertion": "ri", "random_swap": "rs", "random_deletion": "rd",
    "insert_punctuation": "ip", "back_translation": "back_trans", "backtrans": "back_trans",
}

VALIDATION_STYLE_NAMES = ("style:sketch", "style:chatty")
# the bare names; corruptions take a severity (gaussian_blur:5)
VALIDATION_SHIFTS = {"image": VALIDATION_CORRUPTIONS + ("style:sketch",), "text": ("style:chatty",),
                     "audio": AUDIO_VALIDATION_SHIFTS, "video": VIDEO_VALIDATION_SHIFTS}
VALIDATION_NAMES = frozenset(VALIDATION_CORRUPTIONS + AUDIO_VALIDATION_SHIFTS + VIDEO_VALIDATION_SHIFTS)


def is_validation(spec: str | None) -> bool:
    """Whether a shift spec is (or, for a stream, contains) a validation shift."""
    if not spec:
        return False
    spec = spec.strip()
    if spec.startswith("stream:"):
        _, has_list, members = spec.partition("=")
        return bool(has_list) and any(is_validation(m) for m in members.split(","))
    spec = spec.removesuffix("+filter")
    if spec in VALIDATION_STYLE_NAMES or f"style:{spec}" in VALIDATION_STYLE_NAMES:
        return True
    return spec.partition(":")[0] in VALIDATION_NAMES


def _domain_shifts() -> tuple[dict, str | None]:
    """Domain styles live in an optional module; without it those names are simply not offered. Shifts added
    with :func:`register_shift` come with them (looked up by their exact name)."""
    user = {name: _user_factory(name, modality, fn) for name, (modality, fn) in USER_SHIFTS.items()}
    try:
        from .domain import DOMAIN_SHIFTS
    except ImportError as err:
        return user, str(err)
    return {**DOMAIN_SHIFTS, **user}, None


# name -> (query modality, fn(item, rng) -> item): shifts defined outside the package
USER_SHIFTS: dict[str, tuple[str, Callable[[Any, np.random.Generator], Any]]] = {}
_SHIFT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


class FunctionShift(QueryShift):
    """A registered function applied to every query of its modality with the engine's per-query generator."""

    def __init__(self, name: str, modality: str, fn: Callable):
        self.name, self.modality, self.fn = name, modality, fn

    def __call__(self, item, index, position, total, rng):
        return self.fn(item, rng)


def _user_factory(name: str, modality: str, fn: Callable) -> Callable[[str, int], QueryShift]:
    return lambda query_modality, seed=0: FunctionShift(name, modality, fn)  # build_shift checks the modality


def register_shift(name: str, fn: Callable[[Any, np.random.Generator], Any], modality: str,
                   replace: bool = False) -> None:
    """Make ``--shift NAME`` apply ``fn(item, rng) -> item`` to every query of ``modality``.

    ``item`` is what ``dataset.load`` gives for ``modality`` (:mod:`queryshift.modalities`: a PIL image, a
    caption string, a mono float32 waveform at 16 kHz, a uint8 clip [T, H, W, 3]); ``rng`` is the query's own
    ``numpy.random.Generator`` (a function of the run's seed and the query's index), so the shift is
    reproducible and resumable. Registering a name again with the same function does nothing; another one is
    refused unless ``replace`` is true, and a name of the catalogue (a corruption, alias, style or stream) is
    always refused.
    """
    _check_modality(modality)
    if not isinstance(name, str) or not _SHIFT_NAME.fullmatch(name) or name.startswith("stream:") \
            or name in ("clean", "none"):
        raise ValueError(f"shift name must be letters, digits, '-', '_', '.' or ':' (not 'stream:...'), got {name!r}")
    if not callable(fn):
        raise TypeError(f"shift {name!r}: fn must be callable as fn(item, rng), got {fn!r}")
    builtin, _ = _domain_shifts() if name not in USER_SHIFTS else ({}, None)
    catalogue = {n for names in CATALOGUES.values() for n in names} | set(ALIASES) | set(builtin)
    if name in catalogue or name.partition(":")[0] in catalogue:
        raise ValueError(f"shift {name!r} is already a built-in shift name; choose another")
    current = USER_SHIFTS.get(name)
    if current is not None and current != (modality, fn) and not replace:
        raise ValueError(f"shift {name!r} is already registered; pass replace=True")
    USER_SHIFTS[name] = (modality, fn)


def unregister_shift(name: str) -> None:
    """Remove a shift added with :func:`register_shift`; an unknown name is ignored."""
    USER_SHIFTS.pop(name, None)


def list_shifts(modality: str) -> list[str]:
    """Every shift name valid for queries of ``modality`` (severities: see the module docstring)."""
    _check_modality(modality)
    names = list(CATALOGUES[modality])
    domains, _ = _domain_shifts()
    return names + [d for d in domains if _fits(domains[d], modality)] + list(STREAMS)


def _fits(factory, modality: str) -> bool:
    """Domain factories refuse (ValueError) the modality they do not shift; styles are cheap to build."""
    try:
        shift = factory(modality, 0)
    except ValueError:
        return False
    return shift.modality in (None, modality)


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"query modality must be one of {', '.join(MODALITIES)}, got {modality!r}")


def _wrong_modality(name: str, shift_modality: str, modality: str) -> WrongModality:
    letters = {m: modalities.letter(m) for m in MODALITIES}
    return WrongModality(f"shift {name!r} corrupts {shift_modality} queries, but the queries here are {modality} "
                         f"(the query is the first letter of --direction: "
                         + ", ".join(f"{m} {x}2..." for m, x in letters.items())
                         + f"). Valid {modality} shifts: " + ", ".join(list_shifts(modality)))


def build_shift(spec: str, modality: str, seed: int = 0, semantic_filter: bool = False) -> QueryShift:
    """Parse one ``--shift`` spec (grammar in the module docstring) for queries of ``modality``."""
    _check_modality(modality)
    spec = spec.strip()
    if spec in ("", "none", "clean"):
        return QueryShift()
    if spec.startswith("stream:"):
        return _build_stream(spec, modality, seed, semantic_filter)
    asked_filter = spec.endswith("+filter")  # asked for by name: refused where it does nothing
    if asked_filter:
        spec, semantic_filter = spec.removesuffix("+filter").strip(), True
    domains, domain_error = _domain_shifts()
    for key in (spec, spec.removeprefix("style:"), spec.removeprefix("domain:")):
        if key in domains:
            shift = domains[key](modality, seed)
            if shift.modality not in (None, modality):
                raise _wrong_modality(spec, shift.modality, modality)
            if asked_filter:
                raise _filter_does_not_apply(spec, "a domain style")
            return shift
    name, _, level_text = spec.partition(":")
    name = ALIASES.get(name, name)
    # the query modality's own catalogue first: gaussian_noise is a corruption of images, video and audio alike
    owners = [m for m in MODALITIES if name in CATALOGUES[m]]
    if not owners:
        hint = f" (domain styles unavailable: {domain_error})" if domain_error and ":" in spec else ""
        raise ValueError(f"unknown shift {spec!r}{hint}. Valid {modality} shifts: "
                         + ", ".join(list_shifts(modality)) + "; aliases: " + ", ".join(ALIASES))
    shift_modality = modality if modality in owners else owners[0]
    if shift_modality != modality:
        raise _wrong_modality(name, " and ".join(owners), modality)
    if not level_text:
        if name not in SENTENCE_CORRUPTIONS:
            top = TOP_SEVERITY[shift_modality]
            raise ValueError(f"shift {name!r} needs a severity, e.g. {name}:{top} (1-{top})")
        level_text = "1"
    try:
        level = int(level_text)
    except ValueError:
        raise ValueError(f"shift {spec!r}: severity must be an integer, got {level_text!r}") from None
    if shift_modality != "text":
        if asked_filter:
            raise _filter_does_not_apply(f"{name}:{level}", f"an {shift_modality} corruption")
        return {"image": ImageCorruption, "audio": AudioShift, "video": VideoShift}[shift_modality](name, level)
    shift = TextCorruption(name, level, semantic_filter=semantic_filter)
    if asked_filter and shift.filter is None:  # TextCorruption knows which corruptions the redraw applies to
        raise _filter_does_not_apply(shift.name, "a character-level corruption or back-translation")
    return shift


def _filter_does_not_apply(spec: str, kind: str) -> ValueError:
    return ValueError(f"shift {spec + '+filter'!r}: +filter (the semantic-similarity redraw) does not apply to "
                      f"{kind}; it applies to the EDA (sr, ri, rs, rd), ip and sentence-style text shifts. Drop "
                      f"'+filter'")


def _build_stream(spec: str, modality: str, seed: int, semantic_filter: bool) -> QueryShift:
    head, has_list, members = spec.partition("=")
    kind, _, block_text = head.removeprefix("stream:").partition("@")
    if kind not in STREAM_KINDS:
        raise ValueError(f"unknown stream {head!r}; use " + ", ".join(STREAMS)
                         + " (optionally =SHIFT,SHIFT,... and, for the diverse kinds, @BLOCK)")
    defaults, stream_class, takes_block = STREAM_KINDS[kind]
    if has_list:
        specs = [m.strip() for m in members.split(",")]
        if len(specs) > 1 and not all(specs):  # an empty member is a typo, not "skip this one"
            raise ValueError(f"{spec!r}: member {specs.index('') + 1} of the shift list is empty")
        specs = [m for m in specs if m]
    else:
        specs = list(defaults[modality])
    if any(s.startswith("stream:") for s in specs):
        raise ValueError(f"{spec!r}: streams cannot be nested")
    shifts = [build_shift(s, modality, seed, semantic_filter) for s in specs]
    if not takes_block:
        if block_text:
            raise ValueError(f"{spec!r}: @BLOCK applies to diverse streams only")
        return stream_class(spec, shifts)
    if "@" in head and not block_text:
        raise ValueError(f"{spec!r}: @ needs a block size, e.g. @{DEFAULT_BLOCK}; leave '@' out for the default")
    try:
        block = int(block_text) if block_text else DEFAULT_BLOCK
    except ValueError:
        raise ValueError(f"{spec!r}: block size must be an integer, got {block_text!r}") from None
    return stream_class(spec, shifts, block=block, seed=seed)
