"""The documentation's own checks: fast, no model, no server.

- README.md stays short (the depth lives in docs/);
- every relative link in README.md, docs/**/*.md and benchmarks/README.md points at a file or
  folder that exists (anchors are not checked);
- every docs page is reachable from the index, docs/README.md;
- the README's development section gives the command CI runs (.ci/run);
- CITATION.cff is YAML with the keys a citation needs.

Each checker is also run on a small broken variant, so that each check is shown to be able to fail.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 15_000  # characters, as `wc -c` counts them (bytes)
TEST_COMMAND = ".venv/bin/python -m pytest tests"

# Inline links and images, [text](target "title"), and reference definitions, [label]: target.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...


def without_code(text: str) -> str:
    """Markdown text with fenced code blocks and inline code removed: a link-like string in code
    is not a link."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def markdown_links(text: str) -> list[str]:
    """Every link target in a markdown text, code excluded."""
    text = without_code(text)
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def local_target(link: str) -> str | None:
    """The file part of a relative link; None for external links and anchors within the page."""
    if EXTERNAL.match(link) or link.startswith("#"):
        return None
    return link.split("#", 1)[0].split("?", 1)[0] or None


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` that name no existing file or folder."""
    broken = []
    for link in markdown_links(page.read_text(encoding="utf-8")):
        target = local_target(link)
        if target is not None and not (page.parent / target).exists():
            broken.append(link)
    return broken


def linked_files(page: Path) -> set[Path]:
    """The files `page` links to, resolved."""
    out = set()
    for link in markdown_links(page.read_text(encoding="utf-8")):
        target = local_target(link)
        if target is not None:
            out.add((page.parent / target).resolve())
    return out


def unlinked_pages(docs: Path) -> list[str]:
    """docs/**/*.md pages that the index, docs/README.md, does not link to."""
    index = docs / "README.md"
    linked = linked_files(index)
    return sorted(
        str(page.relative_to(docs)) for page in docs.rglob("*.md") if page != index and page.resolve() not in linked
    )


def section(text: str, title: str) -> str:
    """The body of the level-2 section `## title` (up to the next level-2 heading); '' if none."""
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    return match.group(1) if match else ""


def readme_size_problem(path: Path) -> str | None:
    """Why a README is too long for the limit; None when it fits."""
    size = len(path.read_bytes())
    if size <= README_LIMIT:
        return None
    return f"{path.name} has {size} characters; at most {README_LIMIT}: move depth to docs/"


def development_command_problems(readme: Path, ci_run: Path) -> list[str]:
    """Where the README's development section and CI's script disagree on the test command."""
    problems = []
    if TEST_COMMAND not in section(readme.read_text(encoding="utf-8"), "Development"):
        problems.append(f"the README's '## Development' section lacks `{TEST_COMMAND}`")
    if not re.search(r"pytest tests(?![\w/.])", ci_run.read_text(encoding="utf-8")):  # the whole suite
        problems.append(f"{ci_run.name} does not run `pytest tests`")
    return problems


def citation_problems(path: Path) -> list[str]:
    """What keeps a CITATION.cff from being a usable citation (empty: nothing)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        return [f"not YAML: {e}"]
    if not isinstance(data, dict):
        return ["not a mapping"]
    problems = [f"no {key!r}" for key in ("cff-version", "title", "authors", "message") if not data.get(key)]
    for i, reference in enumerate(data.get("references") or []):
        problems += [f"reference {i}: no {key!r}" for key in ("type", "title", "authors") if not reference.get(key)]
    return problems


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


# The checks on the repository -------------------------------------------------------------------


def test_readme_is_short():
    assert readme_size_problem(ROOT / "README.md") is None


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.exists(), f"{page.relative_to(ROOT)} is missing"
    assert broken_links(page) == [], f"{page.relative_to(ROOT)} links to files that do not exist"


def test_every_docs_page_is_in_the_index():
    assert unlinked_pages(ROOT / "docs") == [], "docs/README.md must link to every docs page"


def test_readme_gives_the_command_ci_runs():
    assert development_command_problems(ROOT / "README.md", ROOT / ".ci" / "run") == []


def test_citation_is_valid():
    assert citation_problems(ROOT / "CITATION.cff") == []
    data = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert data["cff-version"] == "1.2.0" and data["title"] == "vllm-sjdpp"


# The same checkers on broken variants: each must be able to fail --------------------------------


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "there.md").write_text("# there\n")
    (tmp_path / "sub").mkdir()
    page = tmp_path / "page.md"
    page.write_text(
        "[fine](there.md#a-section) [folder](sub/) [web](https://example.org/x.md) [anchor](#top)\n"
        "![image](missing.png) [gone](sub/gone.md#x)\n"
        "`[in code](code.md)`\n```\n[in a block](block.md)\n```\n"
        "[ref]: also-missing.md\n"
    )
    assert broken_links(page) == ["missing.png", "sub/gone.md#x", "also-missing.md"]
    page.write_text("[fine](there.md) [folder](sub)\n")
    assert broken_links(page) == []


def test_an_unindexed_page_is_caught(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "a.md").write_text("# a\n")
    (tmp_path / "models" / "b.md").write_text("# b\n")
    (tmp_path / "README.md").write_text("- [a](a.md)\n")
    assert unlinked_pages(tmp_path) == ["models/b.md"]
    (tmp_path / "README.md").write_text("- [a](a.md)\n- [b](models/b.md#top)\n")
    assert unlinked_pages(tmp_path) == []


def test_a_long_readme_is_caught(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("x" * README_LIMIT)
    assert readme_size_problem(readme) is None
    readme.write_text("x" * (README_LIMIT - 1) + "\u00e9")  # one character more, as `wc -c` counts
    assert readme_size_problem(readme) is not None


def test_a_missing_test_command_is_caught(tmp_path):
    readme, ci_run = tmp_path / "README.md", tmp_path / "run"
    ci_run.write_text("bash scripts/setup.sh\n.venv/bin/python -m pytest tests\n")
    # the command in another section only, and the section named otherwise: both caught
    readme.write_text(f"# t\n\n## Development\n\n```bash\npytest\n```\n\n## Citation\n\n{TEST_COMMAND}\n")
    assert development_command_problems(readme, ci_run) == [
        f"the README's '## Development' section lacks `{TEST_COMMAND}`"]
    readme.write_text(f"# t\n\n## Developing\n\n{TEST_COMMAND}\n")
    assert len(development_command_problems(readme, ci_run)) == 1
    readme.write_text(f"# t\n\n## Development\n\n{TEST_COMMAND}\n\n## Citation\n")
    assert development_command_problems(readme, ci_run) == []
    ci_run.write_text("bash scripts/setup.sh\n.venv/bin/python -m pytest tests/test_docs.py\n")
    assert development_command_problems(readme, ci_run) == ["run does not run `pytest tests`"]


def test_a_bad_citation_is_caught(tmp_path):
    path = tmp_path / "CITATION.cff"
    path.write_text("cff-version: 1.2.0\ntitle: [unclosed\n")
    assert citation_problems(path) and citation_problems(path)[0].startswith("not YAML")
    path.write_text(
        "cff-version: 1.2.0\nmessage: m\nauthors:\n  - name: x\n"
        "references:\n  - type: article\n    title: t\n"
    )
    assert citation_problems(path) == ["no 'title'", "reference 0: no 'authors'"]
