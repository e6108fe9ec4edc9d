"""Citations of this repository's docs in code point at sections that exist.

A citation is ``docs/NAME.md §N`` (also ``§N-§M`` and ``§N, §M``); section ``N`` exists when the
document has a heading ``## N. ...``.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"docs/([A-Za-z_]+\.md)((?:[ ,\-–]*§\d+)+)")
HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)


def sections(doc: Path) -> set[int]:
    return {int(n) for n in HEADING.findall(doc.read_text(encoding="utf-8"))}


def broken_citations(root: Path, docs: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in CITATION.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            doc = docs / match.group(1)
            where = f"{path.relative_to(root.parent)}:{line}"
            if not doc.is_file():
                bad.append(f"{where}: {match.group(1)} does not exist")
                continue
            present = sections(doc)
            for number in re.findall(r"§(\d+)", match.group(2)):
                if int(number) not in present:
                    bad.append(f"{where}: {match.group(1)} has no section {number}")
    return bad


def test_citations_in_src_point_at_existing_sections():
    assert broken_citations(REPO / "src", REPO / "docs") == []


def test_the_code_cites_the_method_and_evaluation_docs():
    text = "".join(p.read_text() for p in (REPO / "src").rglob("*.py"))
    assert "docs/METHOD.md §" in text and "docs/EVALUATION.md §" in text
    assert sections(REPO / "docs/METHOD.md") == set(range(1, 9))
    assert sections(REPO / "docs/EVALUATION.md") >= {1, 2, 3, 4}


def test_a_citation_of_a_missing_section_fails(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "M.md").write_text("# M\n\n## 1. One\n\n## 2. Two\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text('"""See docs/M.md §2 and docs/M.md §1-§3."""\n# docs/N.md §1\n')
    assert broken_citations(src, docs) == [
        "src/a.py:1: M.md has no section 3",
        "src/a.py:2: N.md does not exist",
    ]
