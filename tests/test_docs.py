"""The user documentation: every relative link resolves, and no drafting note is left in it."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Phrases of notes written for the people who write the docs, not for their readers.
TEAM_NOTES = [
    re.compile(r"\b(TODO|FIXME|XXX|TBD)\b"),
    re.compile(r"\bthe lead\b", re.IGNORECASE),
    re.compile(r"\b(text|sections?|rows?) for the readme\b", re.IGNORECASE),
    re.compile(r"\brows for the\b", re.IGNORECASE),
    re.compile(r"\bmerges it\b", re.IGNORECASE),
    re.compile(r"\(text for\b", re.IGNORECASE),
    re.compile(r"\bnote to (self|the team|reviewers?)\b", re.IGNORECASE),
    re.compile(r"\bdraft(ed|ing|s)?\b", re.IGNORECASE),
    re.compile(r"^#{1,6} .*\brows\b", re.IGNORECASE),  # a heading such as "Configuration rows"
]

# [text](target) and ![alt](target), the text possibly over several lines.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"  # the text, which may hold one level of brackets
    r"\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"  # (target "optional title")
)
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
HTML_LINK = re.compile(r"\b(?:href|src)=\"([^\"]+)\"")
HTML_ANCHOR = re.compile(r"\b(?:id|name)=\"([^\"]+)\"")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def documents() -> list[Path]:
    """README.md, docs/*.md, and the READMEs of benchmarks/, grafana/ and prometheus/."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("benchmarks", "grafana", "prometheus"):
        found += sorted((ROOT / folder).rglob("README.md"))
    return [path for path in found if path.is_file()]


def without_code(text: str) -> str:
    """``text`` with fenced code blocks and code spans blanked out, line numbers kept."""
    lines = []
    fence = ""
    for line in text.split("\n"):
        marker = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if fence:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                fence = ""
            lines.append("")
        elif marker:
            fence = marker.group(1)
            lines.append("")
        else:
            lines.append(re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), line))
    return "\n".join(lines)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link into the Markdown file ``path`` can name."""
    text = path.read_text(encoding="utf-8")
    found: set[str] = set(HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    fence = ""
    for line in text.split("\n"):
        marker = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if marker and (not fence or marker.group(1)[0] == fence[0]):
            fence = "" if fence else marker.group(1)
            continue
        heading = HEADING.match(line)
        if fence or heading is None:
            continue
        base = slug(heading.group(1).replace("`", ""))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link in the Markdown file ``path``, outside code."""
    text = without_code(path.read_text(encoding="utf-8"))
    found = []
    for pattern in (INLINE_LINK, REFERENCE, HTML_LINK):
        for match in pattern.finditer(text):
            found.append((text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return sorted(found)


def broken_links(path: Path) -> list[str]:
    """One message per relative link of ``path`` whose file or heading does not exist."""
    problems = []
    for line, target in links(path):
        if not target or SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(ROOT)}:{line}: link {target!r}"
        linked = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{where}: no file {linked}")
        elif anchor and linked.suffix == ".md" and unquote(anchor) not in anchors(linked):
            problems.append(f"{where}: no heading with anchor #{anchor} in {linked.name}")
    return problems


def team_notes(path: Path) -> list[str]:
    """One message per line of ``path`` that holds a note addressed to the writers."""
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for pattern in TEAM_NOTES:
            match = pattern.search(line)
            if match:
                where = f"{path.relative_to(ROOT)}:{number}"
                problems.append(f"{where}: drafting note {match.group()!r}: {line.strip()}")
    return problems


def split_tables(path: Path) -> list[str]:
    """One message per table of ``path`` that has no header separator after its first row,
    such as the second half of a table split by a blank line (it renders as plain text)."""
    problems = []
    lines = without_code(path.read_text(encoding="utf-8")).split("\n")
    for number, line in enumerate(lines, 1):
        starts = line.startswith("|") and (number == 1 or not lines[number - 2].startswith("|"))
        following = lines[number] if number < len(lines) else ""
        if starts and not re.match(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$", following):
            problems.append(f"{path.relative_to(ROOT)}:{number}: table row with no header above")
    return problems


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", documents(), ids=doc_id)
def test_relative_links_resolve(path: Path) -> None:
    """Every relative link points to an existing file, and every #anchor to a heading."""
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", documents(), ids=doc_id)
def test_no_notes_to_the_writers(path: Path) -> None:
    """No line reads as a note to the people writing the docs."""
    problems = team_notes(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", documents(), ids=doc_id)
def test_tables_are_whole(path: Path) -> None:
    """Every table starts with a header row and its separator (no table split in two)."""
    problems = split_tables(path)
    assert not problems, "\n".join(problems)


def test_the_documents_are_found() -> None:
    """The checks above cover the README and every file of docs/."""
    names = {doc_id(path) for path in documents()}
    assert {"README.md", "docs/integrations.md", "docs/security.md"} <= names
    assert all(f"docs/{p.name}" in names for p in (ROOT / "docs").glob("*.md"))


class TestCheckers:
    """The checkers themselves, on a small tree of made-up documents."""

    @pytest.fixture(name="tree")
    def fixture_tree(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """A README and docs/guide.md in a temporary root."""
        monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "guide.md").write_text(
            "# Guide\n\n## Set-up: `loopscope run`\n\n## Set-up: `loopscope run`\n",
            encoding="utf-8",
        )
        return tmp_path

    def test_good_links_pass(self, tree: Path) -> None:
        """Existing files, headings (duplicates numbered), external links and code pass."""
        readme = tree / "README.md"
        readme.write_text(
            "See [the guide](docs/guide.md#set-up-loopscope-run), [again]"
            "(docs/guide.md#set-up-loopscope-run-1),\n[a multi-line\nlink](docs/), "
            "[top](#intro) and <https://example.org>.\n\n## Intro\n\n"
            "```md\n[not a link](missing.md)\n```\n`[code](missing.md)`\n"
            "[ref]: https://example.org/x\n",
            encoding="utf-8",
        )
        assert broken_links(readme) == []

    def test_split_table_is_named_with_file_and_line(self, tree: Path) -> None:
        """A table cut in two by a blank line is reported at its second half's first row."""
        readme = tree / "README.md"
        whole = "| a | b |\n| --- | --- |\n| 1 | 2 |\n"
        readme.write_text(f"# T\n\n{whole}\n```\n| in code |\n```\n", encoding="utf-8")
        assert split_tables(readme) == []
        readme.write_text(f"# T\n\n{whole}\n| 3 | 4 |\n", encoding="utf-8")
        assert split_tables(readme) == ["README.md:7: table row with no header above"]

    def test_bad_links_are_named_with_file_and_line(self, tree: Path) -> None:
        """A missing file and a missing heading are each reported with file and line."""
        readme = tree / "README.md"
        readme.write_text(
            "Intro.\n[gone](docs/gone.md)\nand [no heading](docs/guide.md#nowhere)\n",
            encoding="utf-8",
        )
        problems = broken_links(readme)
        assert len(problems) == 2
        assert problems[0].startswith("README.md:2: link 'docs/gone.md'")
        assert problems[1].startswith("README.md:3: link 'docs/guide.md#nowhere'")

    def test_notes_are_named_with_file_and_line(self, tree: Path) -> None:
        """Each drafting note is reported with its file and line; plain prose is not."""
        guide = tree / "docs" / "guide.md"
        guide.write_text(
            "# Guide\n\nSections for the README: one, two.\n\n## Configuration rows\n\n"
            "*(Text for the README's Configuration section; the lead merges it.)*\n"
            "TODO: measure.\nThe lag comes first (rows for the Metrics table).\n",
            encoding="utf-8",
        )
        lines = sorted({problem.split(": ")[0] for problem in team_notes(guide)})
        assert lines == [f"docs/guide.md:{n}" for n in (3, 5, 7, 8, 9)]
        guide.write_text("# Guide\n\nThe leading figure is the lag of each loop.\n")
        assert team_notes(guide) == []
