"""The documentation holds together: every relative link in the repository's Markdown files points at a file
or folder that exists, and the README stays short and opens with what the project found."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Folders that are not the repository's documentation: environments, build outputs, runs' workdirs.
SKIPPED = {"build", "dist", "runs", "workdir", "node_modules", "__pycache__"}
README_MAX_LINES = 250

# [text](target) and ![alt](target); the target ends at the first space (an optional "title" may follow).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files() -> list[pathlib.Path]:
    files = []
    for path in sorted(ROOT.rglob("*.md")):
        parts = path.relative_to(ROOT).parts[:-1]
        if any(part.startswith(".") or part in SKIPPED or part.endswith(".egg-info") for part in parts):
            continue
        files.append(path)
    return files


def relative_links(text: str) -> list[str]:
    """The link targets of ``text`` outside code blocks and inline code that point into the repository: no
    URL scheme (http, https, mailto, ...), no pure #anchor; a #fragment is cut off."""
    targets, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue
            targets.append(target.split("#", 1)[0])
    return targets


def test_the_link_finder_reads_markdown_links():
    text = ("See [a](docs/a.md#part), ![fig](x/y.png \"title\"), [web](https://example.org), [m](mailto:a@b.c),\n"
            "[top](#top), `[code](not/a/link.md)`\n```\n[fenced](not/a/link.md)\n```\n[folder](results/)")
    assert relative_links(text) == ["docs/a.md", "x/y.png", "results/"]


def test_markdown_files_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in markdown_files()}
    assert {"README.md", "CONTRIBUTING.md", "docs/runs.md", "benchmarks/README.md"} <= names
    assert not any(name.startswith((".venv/", ".git/")) for name in names)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    missing = [target for target in relative_links(path.read_text(encoding="utf-8"))
               if not (path.parent / target).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to what does not exist: {missing}"


def test_readme_is_short_and_opens_with_the_results():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES}"
    headings = [(number, line) for number, line in enumerate(lines) if line.startswith("## ")]
    found = next(number for number, line in headings if "found" in line.lower())
    quickstart = next(number for number, line in headings if "quickstart" in line.lower())
    assert found < 40 and found < quickstart
    assert "make test" in "\n".join(lines[quickstart:])  # the test command CI runs stays named there
