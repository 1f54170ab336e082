"""The documentation stays consistent with the code that cites it.

1. Every citation of the method page (``docs/method.md`` followed by ``§ <Section>``) in the code, configs,
   benchmarks, README and docs names a heading of that page, and so does every ``§`` cross-reference inside it.
2. ``docs/architecture.md`` mentions every module under ``pae_fast/stages/`` and every sub-package of pae_fast.
3. No file cites the retired specification (``SPEC`` followed by ``§``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SELF = Path(__file__).resolve()

# Split so that this file does not contain the strings it searches for.
METHOD_REF = "docs/method" + ".md"
ARCH_REF = "docs/architecture" + ".md"
SPEC_CITE = "SPEC" + " §"

CITING = ("pae_fast", "kernels", "tests", "configs", "benchmarks", "docs")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".toml", ".cfg", ".ini", ".sh", ".json", ".rst"}
SKIP_DIRS = {"__pycache__", "node_modules", "build", "dist"}

# A section name: everything up to punctuation that ends a citation (line breaks included, for wrapped comments).
_NAME = r"§ ?([^,.;:()`'\"§]+)"
# After a section name, an optional quoted subsection: `§ Sampling, "RAE checkpoints"`.
_SUB = r'(?:\s*,\s*"([^"\n]+)")?'
# Further sections of the same citation: `§ Conventions, § Flow matching`.
_MORE = r"((?:\s*(?:,|and)\s*§ ?[^,.;:()`'\"§]+" + _SUB + r")*)"


def _citation_pattern(doc: str) -> re.Pattern[str]:
    return re.compile(re.escape(doc) + r"[\s#*/`'\"]*" + _NAME + _SUB + _MORE)


def _clean(name: str) -> str:
    """A cited name with comment leaders of wrapped lines and repeated whitespace removed."""
    name = re.sub(r"\s*\n\s*(?:#+|//|\*)?\s*", " ", name)
    return " ".join(name.split())


def _cited_names(match: re.Match[str]) -> list[str]:
    names = [match.group(1)] + ([match.group(2)] if match.group(2) else [])
    for more in re.finditer(r"§ ?([^,.;:()`'\"§]+)" + _SUB, match.group(3) or ""):
        names.append(more.group(1))
        if more.group(2):
            names.append(more.group(2))
    return [n for n in (_clean(n) for n in names) if n and not n.startswith("<")]


def _headings(path: Path, marker: str) -> list[str]:
    pattern = re.compile(r"^#{2,4} " + re.escape(marker) + r"(.+?)\s*$", re.M)
    return [h.strip() for h in pattern.findall(path.read_text(encoding="utf-8"))]


def _resolves(name: str, headings: list[str]) -> bool:
    return any(name.startswith(h) for h in headings)


def _text_files(*tops: Path) -> list[Path]:
    out: list[Path] = []
    for top in tops:
        if top.is_file():
            out.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                           and not d.endswith(".egg-info")]
            out += [Path(dirpath) / f for f in filenames if Path(f).suffix in TEXT_SUFFIXES]
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def _where(path: Path, text: str, pos: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, pos) + 1}"


def test_method_headings_are_unique() -> None:
    headings = _headings(METHOD, "§ ")
    assert headings, f"{METHOD} has no '## § <Section>' headings"
    dupes = sorted({h for h in headings if headings.count(h) > 1})
    assert not dupes, f"{METHOD}: headings appear twice: {dupes}"


def test_every_method_citation_names_a_heading() -> None:
    headings = _headings(METHOD, "§ ")
    pattern = _citation_pattern(METHOD_REF)
    files = _text_files(*(ROOT / d for d in CITING if (ROOT / d).exists()), ROOT / "README.md")
    seen, broken = 0, []
    for path in files:
        if path.resolve() == SELF:
            continue
        text = _read(path)
        for m in pattern.finditer(text):
            for name in _cited_names(m):
                seen += 1
                if not _resolves(name, headings):
                    broken.append(f"{_where(path, text, m.start())}: § {name!r}")
    assert seen > 20, f"found only {seen} citations of {METHOD_REF}: the pattern no longer matches the code's style"
    assert not broken, (f"citations of {METHOD_REF} that name no heading there (headings: {headings}):\n  "
                        + "\n  ".join(broken))


def test_method_cross_references_resolve() -> None:
    text = METHOD.read_text(encoding="utf-8")
    headings = _headings(METHOD, "§ ")
    body = re.sub(r"<!-- toc -->.*?<!-- /toc -->", "", text, flags=re.S)
    body = re.sub(r"^#{1,4} .*$", "", body, flags=re.M)
    broken = []
    for m in re.finditer(_NAME + _SUB, body):
        for name in (m.group(1), m.group(2)):
            name = _clean(name or "")
            if name and not name.startswith("<") and not _resolves(name, headings):
                broken.append(f"§ {name!r}")
    assert not broken, f"{METHOD}: cross-references that name no heading: {broken}"


def test_method_table_of_contents_lists_every_heading() -> None:
    text = METHOD.read_text(encoding="utf-8")
    toc = re.search(r"<!-- toc -->(.*?)<!-- /toc -->", text, flags=re.S)
    assert toc, f"{METHOD}: no table of contents between <!-- toc --> and <!-- /toc -->"
    listed = re.findall(r"\[§ (.+?)\]\(#", toc.group(1))
    assert listed == _headings(METHOD, "§ "), f"{METHOD}: the table of contents differs from the headings"


def test_architecture_citations_name_a_heading() -> None:
    headings = _headings(ARCHITECTURE, "")
    pattern = _citation_pattern(ARCH_REF)
    broken = []
    for path in _text_files(*(ROOT / d for d in CITING if (ROOT / d).exists()), ROOT / "README.md"):
        if path.resolve() == SELF:
            continue
        text = _read(path)
        for m in pattern.finditer(text):
            broken += [f"{_where(path, text, m.start())}: § {n!r}" for n in _cited_names(m)
                       if not _resolves(n, headings)]
    assert not broken, f"citations of {ARCH_REF} that name no heading there:\n  " + "\n  ".join(broken)


def _subpackages() -> list[str]:
    pkg = ROOT / "pae_fast"
    return sorted(p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def _stage_modules() -> list[str]:
    return sorted(p.stem for p in (ROOT / "pae_fast" / "stages").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("kind", ["stage modules", "subpackages"])
def test_architecture_mentions_every_stage_and_subpackage(kind: str) -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    if kind == "stage modules":
        names = _stage_modules()
        missing = [m for m in names if f"stages/{m}.py" not in text and f"stages.{m}" not in text]
    else:
        names = _subpackages()
        missing = [p for p in names if not re.search(rf"(?<![\w.]){re.escape(p)}/", text)]
    assert names, f"no {kind} found under {ROOT / 'pae_fast'}"
    assert not missing, f"{ARCHITECTURE} does not mention these {kind}: {missing}"


def test_nothing_cites_the_retired_spec() -> None:
    files = _text_files(*(p for p in ROOT.iterdir() if not p.name.startswith(".") and p.name not in SKIP_DIRS))
    hits = []
    for path in files:
        if path.resolve() == SELF:
            continue
        text = _read(path)
        pos = text.find(SPEC_CITE)
        if pos >= 0:
            hits.append(_where(path, text, pos))
    assert not hits, f"files cite '{SPEC_CITE}' (cite docs/method.md § <Section> instead): {hits}"
