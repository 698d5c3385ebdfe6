"""``queryshift serve`` keeps its log to its own lines: model libraries' INFO records are dropped unless --verbose."""

from __future__ import annotations

import logging

import pytest

from queryshift.commands import serve


def record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("root", level, path, 1, "loaded model config", None, None)


@pytest.mark.parametrize("path", ["/venv/site-packages/open_clip/factory.py",
                                  "/venv/site-packages/transformers/modeling_utils.py"])
def test_library_info_is_dropped_and_its_warnings_kept(path):
    quiet = serve.QuietLibraries()
    assert not quiet.filter(record(path, logging.INFO))
    assert quiet.filter(record(path, logging.WARNING))


def test_own_info_lines_pass():
    assert serve.QuietLibraries().filter(record("/repo/src/queryshift/serve/service.py", logging.INFO))


@pytest.fixture
def handler():
    """A root handler as basicConfig would leave it (pytest's own capture handler sits beside it)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    mine = logging.StreamHandler()
    root.handlers = [mine]
    yield mine
    for h in logging.getLogger().handlers + saved[0]:  # leave no filter behind on pytest's handlers
        for f in [f for f in h.filters if isinstance(f, serve.QuietLibraries)]:
            h.removeFilter(f)
    root.handlers, root.level = saved


def test_default_logging_filters_the_libraries(handler):
    serve.configure_logging("info")
    assert not handler.filter(record("/x/open_clip/factory.py", logging.INFO))
    assert handler.filter(record("/x/queryshift/serve/app.py", logging.INFO))


def test_verbose_keeps_the_libraries(handler):
    serve.configure_logging("info", verbose=True)
    assert handler.filter(record("/x/open_clip/factory.py", logging.INFO))


def test_cli_accepts_verbose():
    from queryshift.cli import build_parser

    assert build_parser().parse_args(["serve", "--verbose"]).verbose
    assert not build_parser().parse_args(["serve"]).verbose
