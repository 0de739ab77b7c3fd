"""The README is a front door and the pages under docs/ hold the depth: every relative link of them
resolves (the file exists, and the heading when an anchor is given), every path and test they name
exists, the README stays short, and its command markers keep the format ``.ci/run`` reads."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, *PAGES]
MAX_README_LINES = 200

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`]*`")
# A repository path in backticks: `worker/serving/jobs.py`, `docs/eval/*.json`, `tests/test_x.py::test_y`.
REPO_PATH = re.compile(r"`((?:models|worker|service|docker|tests|docs)/[\w./*-]*)(?:::(\w+))?`")


def prose_lines(path: Path) -> list[str]:
    """The lines of a Markdown file outside code blocks (fenced or indented by four spaces)."""
    lines, fenced, previous_blank = [], False, True
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indented = line.startswith("    ") and previous_blank and not line.lstrip().startswith(("-", "*", "|"))
        if not fenced and not indented:
            lines.append(line)
        previous_blank = not line.strip() or (indented and previous_blank)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(path: Path) -> list[str]:
    return [target for line in prose_lines(path) for target in LINK.findall(CODE_SPAN.sub("", line))]


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    assert {
        "api.md",
        "architecture.md",
        "defense.md",
        "demo-model.md",
        "fine-tuning.md",
        "benchmarks.md",
        "robustness.md",
        "deploy.md",
        "monitoring.md",
        "reliability.md",
    } <= names


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in links(README) if not t.startswith("#")}
    assert set(PAGES) <= linked, f"pages the README does not link: {sorted(p.name for p in set(PAGES) - linked)}"


@pytest.mark.parametrize("marker", ["run-command", "test-command"])
def test_command_markers_keep_the_format_ci_reads(marker):
    """``.ci/run`` takes the line after the only line that contains the marker's name."""
    lines = README.read_text().splitlines()
    hits = [i for i, line in enumerate(lines) if marker in line]
    assert len(hits) == 1 and lines[hits[0]] == f"<!-- {marker} -->", hits
    command = lines[hits[0] + 1]
    assert re.fullmatch(r"`python3 -m venv \.venv && [^`]+`", command), command


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ... are not checked
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_and_tests_exist(page):
    """A path in backticks (`worker/serving/jobs.py`, `tests/test_x.py::test_y`) names a real file."""
    missing = []
    for path, test in REPO_PATH.findall(page.read_text()):
        if "*" in path:
            if not list(ROOT.glob(path)):
                missing.append(path)
            continue
        if not (ROOT / path).exists():
            missing.append(path)
        elif test and not re.search(rf"^(async )?def {test}\(", (ROOT / path).read_text(), re.MULTILINE):
            missing.append(f"{path}::{test}")
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"


DOTTED = re.compile(r"`((?:models|worker|service)(?:\.\w+)+)")
FILE_SUFFIXES = {"py", "md", "json", "yml", "yaml", "png", "txt"}  # `service.py` is a file name, not a module


def resolve_dotted(name: str) -> bool:
    """``models.nets.flow.VideoRAFT``: the longest module prefix is a file, and the next part (if
    any) is defined in it (a def, class or assignment at any indentation)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            if cut == len(parts):
                return True
            attr = parts[cut]
            return bool(re.search(rf"^\s*(?:(?:async )?def |class )?{attr}\b\s*[(:=]", module.read_text(), re.M))
    return False


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_modules_and_objects_exist(page):
    """A dotted name in backticks (`worker.serving.jobs.analyse_job`) names a real module and object."""
    names = {name for name in DOTTED.findall(page.read_text()) if name.rpartition(".")[2] not in FILE_SUFFIXES}
    missing = sorted(name for name in names if not resolve_dotted(name))
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"


def test_link_checker_sees_a_broken_link(tmp_path):
    """The checks above can fail: a missing file, a missing heading and a link in code are told apart."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## A section: with `code`\n\n[ok](#a-section-with-code) [bad](#nope) [gone](missing.md)\n\n"
        "    [in a code block](ignored.md)\n"
    )
    assert anchors(page) == {"title", "a-section-with-code"}
    assert links(page) == ["#a-section-with-code", "#nope", "missing.md"]
    assert resolve_dotted("worker.serving.jobs.analyse_job") and resolve_dotted("models.nets.flow")
    assert not resolve_dotted("worker.serving.jobs.no_such_function") and not resolve_dotted("models.no_such")
