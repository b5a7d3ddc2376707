"""The README and the docs pages: every relative link lands on a file (and on a heading, where
it names one), every page is reached from the README, and the README stays one sitting long."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Pure logic: no MLflow store is made for these tests.
pytestmark = pytest.mark.no_store

PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target), outside code; a target up to whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The page without its fenced code blocks and inline code, where brackets are code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as
    hyphens."""
    out = set()
    for line in _prose(page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, mailto: and the like


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_its_heading(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_finds_a_broken_link_and_a_missing_heading(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Top\n\nSee [a](missing.md), [b](#top), [c](#nowhere), `[d](code.md)`.\n"
                    "```\n[e](in-a-block.md)\n```\n")
    assert links(page) == ["missing.md", "#top", "#nowhere"]
    assert anchors(page) == {"top"}


def test_every_docs_page_is_reached_from_the_readme_which_stays_under_200_lines():
    readme = ROOT / "README.md"
    reached = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme)}
    unreached = [p.name for p in PAGES[1:] if p.resolve() not in reached and
                 not any(p.resolve() in {(q.parent / t.partition("#")[0]).resolve()
                                         for t in links(q)} for q in PAGES[1:] if q != p)]
    assert not unreached, f"docs pages no page links to: {unreached}"
    assert len(readme.read_text().splitlines()) <= 200
