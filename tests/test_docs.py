"""The README and the documentation pages: links that resolve, a Python example that is the tested file.

The site itself is built with ``mkdocs build --strict`` by ``make test`` (a broken link inside docs/ or a page
missing from the navigation fails there); these tests cover what mkdocs does not see: the README, which is
read on the repository's front page, and docs/ holding user pages only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(markdown: str) -> list[str]:
    """Link targets of a Markdown text that point into the repository (no URL, no bare anchor)."""
    return [t for t in LINK.findall(markdown) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def missing_targets(page: Path) -> list[str]:
    return [t for t in relative_links(page.read_text(encoding="utf-8"))
            if not (page.parent / t.split("#")[0]).exists()]


def test_relative_links_finds_repository_links_only():
    text = "[a](docs/x.md) [b](https://x.org) [c](#here) [d](lab/README.md#reports) ![e](docs/demo.png)"
    assert relative_links(text) == ["docs/x.md", "lab/README.md#reports", "docs/demo.png"]


def test_missing_targets_names_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [broken](gone.md#x)")
    assert missing_targets(page) == ["gone.md#x"]


@pytest.mark.parametrize("page", ["README.md", "lab/README.md"])
def test_every_link_resolves(page):
    path = ROOT / page
    if not path.exists():
        pytest.skip(f"{page} not written yet")
    assert missing_targets(path) == []


def test_readme_stays_short_and_tells_how_to_reach_the_cli():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    assert "source .venv/bin/activate" in text
    assert "make demo" in text and "make test" in text


def test_readme_python_example_is_the_tested_quickstart():
    example = ROOT / "examples" / "quickstart.py"
    if not example.exists():
        pytest.skip("examples/quickstart.py not written yet")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no Python example"
    assert blocks[0].strip() == example.read_text(encoding="utf-8").strip()


def nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_docs_holds_the_site_pages_only():
    # research pages belong in lab/reports; every page in docs/ is one the site links from its navigation
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = set(nav_pages(config["nav"]))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages - in_nav == set()
    assert in_nav - pages == set()
    assert not [p for p in pages if p.startswith("results-") or "-notes" in p]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


def test_python_api_online_core_example_runs(capsys):
    # the docs' Retriever example, executed as written (the page's first example is examples/quickstart.py)
    block = next(b for b in python_blocks(ROOT / "docs" / "python-api.md") if "Retriever(" in b)
    exec(compile(block, "docs/python-api.md", "exec"), {})
    top_items = capsys.readouterr().out.split("]")[0].strip("[ ")
    assert len(top_items.split(",")) == 5
