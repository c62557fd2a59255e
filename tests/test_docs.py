"""Code, comments and help texts cite the repository's own docs/, never a document outside it.

The references were once a private spec ("spec 3.3", "deployment spec", "cpu-training.md",
"the issue"), which no reader of the repository has. Python files are read with tokenize, so
only comments and string literals (docstrings, help and error texts) count, and a variable
named `spec` (a format spec, a module spec) is no citation; other text files are read by line.
"""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("eqr", "export", "runtime", "calibration", "scripts", "tests", "docs")
FILES = ("pyproject.toml", "README.md")
SUFFIXES = (".py", ".sh", ".toml", ".md")
CITATION = re.compile(r"spec ?[0-9]|spec section|[Ss]pec [a-z-]+\.md|deployment spec|deployment\.md|eqr\.md"
                      r"|cpu-training|the issue|shared/spec|\(spec\b|spec\)|the spec\b|spec's")
TEXT_TOKENS = {tokenize.COMMENT, tokenize.STRING} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def text_spans(path: Path) -> list[tuple[int, str]]:
    """(first line, text) of what a reader sees as prose: comments and strings of Python, lines elsewhere."""
    source = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return list(enumerate(source.splitlines(), 1))
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [(tok.start[0], tok.string) for tok in tokens if tok.type in TEXT_TOKENS]


def citations(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for line, text in text_spans(path):
        for match in CITATION.finditer(text):
            where = line + text.count("\n", 0, match.start())
            found.append(f"{path.relative_to(root)}:{where}: {match.group(0)!r}")
    return found


def scanned() -> list[Path]:
    paths = [ROOT / name for name in FILES]
    for folder in SOURCES:
        paths += [p for p in sorted((ROOT / folder).rglob("*")) if p.suffix in SUFFIXES and p.is_file()]
    return [p for p in paths if p.resolve() != Path(__file__).resolve()]


def test_no_citation_outside_the_repository() -> None:
    found = [hit for path in scanned() for hit in citations(path)]
    assert not found, "cite docs/<file>.md#<section> instead of:\n" + "\n".join(found)


def test_the_checker_finds_citations_in_prose_only(tmp_path: Path) -> None:
    code = tmp_path / "m.py"
    code.write_text('"""Line one.\n\nThe loop (spec 3.3) stops."""\n'
                    'x = format(1.0, spec)  # the deployment spec says so\n'
                    'help_text = "see cpu-training.md"\n'
                    'origin = importlib.util.find_spec("eqr").origin  # docs/algorithm.md#the-loop\n')
    assert citations(code, tmp_path) == ["m.py:3: '(spec'", "m.py:4: 'deployment spec'", "m.py:5: 'cpu-training'"]
    doc = tmp_path / "notes.md"
    doc.write_text("fine\nas the issue says\n")
    assert citations(doc, tmp_path) == ["notes.md:2: 'the issue'"]
