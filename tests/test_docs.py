"""The README starts a user in one screen and links the reference pages, which exist; no page
speaks of the project's issue numbers; the README's figure and links resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = ("job-spec", "cli", "results", "durability", "searches", "clusters", "security",
         "benchmarks")


def test_the_readme_is_one_screen_with_its_two_commands_and_your_model_early():
    lines = README.splitlines()
    assert len(lines) <= 250
    assert "make demo" in README and "make test" in README
    first = "\n".join(lines[:60])
    assert "## Your model and data" in first and "jobs/your_model.yaml" in first


def test_every_reference_page_is_linked_and_every_link_resolves():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert {f"docs/{p}.md" for p in PAGES} <= set(links)
    for page in (ROOT / "docs").glob("*.md"):
        links += [str(Path("docs", link)) for link in
                  re.findall(r"\]\(([^)#:]+)\)", page.read_text())]
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
    assert (ROOT / "docs" / "figures" / "heatmap_untrac.png").stat().st_size > 10_000


def test_no_page_mentions_issue_numbers():
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "cluster" / "README.md"]
    said = [f"{p.name}: {m.group(0)}" for p in pages
            for m in re.finditer(r"(?i)\bissues? \d+", p.read_text())]
    assert not said, said
