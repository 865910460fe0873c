"""The `languages` tree: Italian and French (high) vs Ukrainian and Bulgarian (low), from packages.

Leaves and recipes follow `shared/corpora/README.md`. Translated manuals hold much untranslated
English, so every source is split into paragraphs and filtered with `textutil.language_filter`.
"""

from __future__ import annotations

import gettext
import gzip
import html
import io
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path

from worldlm.data.build.fetch import Leaf, Source, build_leaves, deb_members
from worldlm.data.build.textutil import language_filter
from worldlm.errors import DataError

_BLOCK_TAGS = frozenset(
    [
        "p",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "li",
        "dt",
        "dd",
        "td",
        "th",
        "pre",
        "div",
        "br",
        "title",
        "desc",
        "item",
        "tr",
        "table",
        "section",
    ]
)
_SKIP_TAGS = frozenset({"script", "style", "head", "info", "credit", "license"})


class _ParagraphParser(HTMLParser):
    """Collects the text of an HTML or Mallard page as paragraphs, broken at block tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._current: list[str] = []
        self._skip = 0

    def _flush(self) -> None:
        text = " ".join("".join(self._current).split())
        if text:
            self.paragraphs.append(text)
        self._current = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._current.append(data)


def markup_paragraphs(text: str) -> list[str]:
    """Paragraphs of an HTML or Mallard XML page (script, style and page metadata skipped)."""
    parser = _ParagraphParser()
    parser.feed(text)
    parser.close()
    parser._flush()
    return parser.paragraphs


_ROFF_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)")
_ROFF_SPECIAL = re.compile(r"\\\(..|\\\[[^\]]*\]")
_ROFF_ESCAPES = {"\\-": "-", "\\e": "\\", "\\&": "", "\\,": "", "\\/": "", "\\ ": " ", "\\~": " "}
_ROFF_BREAK = frozenset(
    [
        ".PP",
        ".P",
        ".LP",
        ".TP",
        ".IP",
        ".SH",
        ".SS",
        ".HP",
        ".sp",
        ".br",
        ".RS",
        ".RE",
        ".TH",
        ".EX",
        ".EE",
        ".nf",
        ".fi",
    ]
)
_ROFF_TEXT_MACROS = frozenset(
    [
        ".B",
        ".I",
        ".BR",
        ".BI",
        ".IB",
        ".IR",
        ".RI",
        ".RB",
        ".SM",
        ".SB",
        ".SH",
        ".SS",
        ".IP",
        ".UR",
        ".MT",
    ]
)


def _roff_inline(line: str) -> str:
    line = _ROFF_FONT.sub("", line)
    for esc, plain in _ROFF_ESCAPES.items():
        line = line.replace(esc, plain)
    return _ROFF_SPECIAL.sub("", line)


def roff_paragraphs(text: str) -> list[str]:
    """Paragraphs of a man page's roff source: comments and requests dropped, font escapes removed,
    the text of highlighting macros (.B, .IR, .SH …) kept."""
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        joined = " ".join(" ".join(current).split())
        if joined:
            paragraphs.append(joined)
        current.clear()

    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line.strip() in (".", ""):
            if not line.strip():
                flush()
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line.partition(" ")
            if macro in _ROFF_BREAK:
                flush()
            if macro in _ROFF_TEXT_MACROS and rest:
                text_part = " ".join(w.strip('"') for w in _roff_inline(rest).split())
                current.append(text_part)
                if macro in (".SH", ".SS"):  # a heading is a paragraph of its own
                    flush()
            continue
        current.append(_roff_inline(line))
    flush()
    return paragraphs


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _filtered_docs(pages: Iterable[list[str]], lang: str, min_chars: int = 40) -> Iterator[str]:
    """One document per page: its paragraphs in `lang`, joined by blank lines, if long enough."""
    for paragraphs in pages:
        doc = "\n\n".join(language_filter(paragraphs, lang))
        if len(doc) >= min_chars:
            yield doc


def _deb_pages(
    deb: Path, want: Callable[[str], bool], parse: Callable[[str], list[str]]
) -> Iterator[list[str]]:
    for path, data in sorted(deb_members(deb, want)):
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        yield parse(_decode(data))


def libreoffice_help(deb: Path, lang: str) -> Iterator[str]:
    """Filtered paragraphs of each LibreOffice help page (HTML) of `libreoffice-help-<lang>`."""
    prefix = f"usr/share/libreoffice/help/{lang}/text/"
    pages = _deb_pages(
        deb, lambda p: p.startswith(prefix) and p.endswith(".html"), markup_paragraphs
    )
    return _filtered_docs(pages, lang)


def man_pages(deb: Path, lang: str) -> Iterator[str]:
    """Filtered paragraphs of each man page in `manpages-<lang>`."""
    prefix = f"usr/share/man/{lang}/"
    return _filtered_docs(_deb_pages(deb, lambda p: p.startswith(prefix), roff_paragraphs), lang)


def debian_reference(deb: Path, lang: str) -> Iterator[str]:
    """Filtered paragraphs of each chapter of the Debian Reference (`debian-reference-<lang>`)."""
    suffix = f".{lang}.html"
    want = lambda p: p.startswith("usr/share/debian-reference/") and p.endswith(suffix)  # noqa: E731
    return _filtered_docs(_deb_pages(deb, want, markup_paragraphs), lang)


def gnome_help(deb: Path, lang: str) -> Iterator[str]:
    """Filtered paragraphs of each GNOME help page (Mallard XML) in `lang` from gnome-user-docs."""
    want = lambda p: p.startswith(f"usr/share/help/{lang}/") and p.endswith(".page")  # noqa: E731
    return _filtered_docs(_deb_pages(deb, want, markup_paragraphs), lang)


def fortunes(deb: Path, lang: str) -> Iterator[str]:
    """Each fortune (files split at lines holding "%") in `lang` from `fortunes-<lang>`."""
    prefix = f"usr/share/games/fortunes/{lang}/"

    def want(p: str) -> bool:
        # *.dat are strfile indexes; fortunes-bg's *.u8 are symlinks, which deb_members skips.
        return p.startswith(prefix) and not p.endswith(".dat")

    for _path, data in sorted(deb_members(deb, want)):
        for fortune in re.split(r"(?m)^%\s*$", _decode(data)):
            text = fortune.strip("\n").rstrip()
            if text.strip() and language_filter([text], lang):
                yield text


def mo_strings(data: bytes) -> list[str]:
    """The translated strings (msgstr, plural forms included) of one compiled gettext .mo file."""
    catalog: dict[object, str] = gettext.GNUTranslations(io.BytesIO(data))._catalog  # type: ignore[attr-defined]
    return [value for key, value in catalog.items() if key != "" and value.strip()]


_FTL_VALUE = re.compile(r"^\s*(?:[\w-]+|\.[\w-]+)\s*=\s*(.*)$")
_PROPERTIES_VALUE = re.compile(r"^\s*[^#!\s][^=]*=\s*(.*)$")
_PLACEABLE = re.compile(r"\{[^{}]*\}|%\d*\$?[sdS]|&[a-z]+;")


def l10n_strings(name: str, text: str) -> list[str]:
    """UI strings of a Firefox/Thunderbird localization file (.ftl Fluent or .properties)."""
    pattern = _FTL_VALUE if name.endswith(".ftl") else _PROPERTIES_VALUE
    values = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not (match := pattern.match(line)):
            continue
        value = " ".join(_PLACEABLE.sub("", match[1]).split())
        if value:
            values.append(value)
    return values


def xpi_strings(deb: Path) -> Iterator[str]:
    """UI strings of the language pack (.xpi) inside a Mozilla `*-l10n-<lang>` package."""
    for _path, data in deb_members(deb, lambda p: p.endswith(".xpi")):
        with zipfile.ZipFile(io.BytesIO(data)) as xpi:
            for name in sorted(xpi.namelist()):
                if name.endswith((".ftl", ".properties")):
                    yield from l10n_strings(name, xpi.read(name).decode("utf-8", "replace"))


def _it(paths: list[Path]) -> Iterator[str]:
    yield from libreoffice_help(paths[0], "it")
    yield from man_pages(paths[1], "it")
    yield from debian_reference(paths[2], "it")
    yield from fortunes(paths[3], "it")


def _fr(paths: list[Path]) -> Iterator[str]:
    yield from libreoffice_help(paths[0], "fr")
    yield from man_pages(paths[1], "fr")
    yield from debian_reference(paths[2], "fr")


def ua_gec_sources(wheel_path: Path) -> Iterator[str]:
    """The source (uncorrected) side of UA-GEC: one essay or blog post per document."""
    with zipfile.ZipFile(wheel_path) as wheel:
        names = sorted(
            n
            for n in wheel.namelist()
            if re.fullmatch(r"ua_gec/data/gec-only/(train|test)/source/[^/]+\.txt", n)
        )
        if not names:
            raise DataError(f"{wheel_path.name} has no ua_gec/data/gec-only/*/source/*.txt")
        for name in names:
            yield wheel.read(name).decode("utf-8", "replace").strip()


def _uk(paths: list[Path]) -> Iterator[str]:
    yield from ua_gec_sources(paths[0])
    yield from man_pages(paths[1], "uk")
    yield from gnome_help(paths[2], "uk")


def _bg(paths: list[Path]) -> Iterator[str]:
    yield from fortunes(paths[0], "bg")
    for _path, data in sorted(deb_members(paths[1], lambda p: p.endswith(".mo"))):
        yield from language_filter((html.unescape(s) for s in mo_strings(data)), "bg")
    for deb in paths[2:]:
        yield from language_filter(xpi_strings(deb), "bg")


def _debs(*names: str) -> tuple[Source, ...]:
    # Debian versions follow the apt lists of the machine (the README built from bookworm).
    return tuple(Source(registry="debian", name=name, version=None) for name in names)


LEAVES: dict[str, Leaf] = {
    "high/it": Leaf(
        _debs("libreoffice-help-it", "manpages-it", "debian-reference-it", "fortunes-it"), _it
    ),
    "high/fr": Leaf(_debs("libreoffice-help-fr", "manpages-fr", "debian-reference-fr"), _fr),
    "low/uk": Leaf(
        (
            Source(registry="pypi", name="ua-gec", version="2.1.3"),
            *_debs("manpages-uk", "gnome-user-docs"),
        ),
        _uk,
    ),
    "low/bg": Leaf(
        _debs("fortunes-bg", "libreoffice-l10n-bg", "firefox-esr-l10n-bg", "thunderbird-l10n-bg"),
        _bg,
    ),
}


def build(
    out_dir: Path,
    cache_dir: Path,
    *,
    leaves: list[str] | None = None,
    max_docs: int | None = None,
) -> dict[str, int]:
    """Build the languages tree into `out_dir/<leaf>.jsonl`; docs per leaf (see `build_leaves`)."""
    return build_leaves(
        "languages", LEAVES, Path(out_dir), Path(cache_dir), leaves=leaves, max_docs=max_docs
    )
