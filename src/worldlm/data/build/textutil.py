"""Pure text functions for corpus building: de-duplication and a small, explainable language filter.

The language heuristic (`detect_language`) looks only at letters:
1. script: more than half Cyrillic letters -> Cyrillic, more than half Latin letters -> Latin;
2. Cyrillic: Ukrainian has і ї є ґ, Bulgarian has ъ and none of those, Russian has ы э ё;
   a paragraph with none of these marks is "cyrl" (unknown Cyrillic);
3. Latin: the language (en, it, fr) whose short stopword list covers most words, if any covers one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LANGUAGES = ("en", "it", "fr", "uk", "bg")

_STOPWORDS = {
    "en": frozenset(
        [
            "the",
            "of",
            "and",
            "to",
            "in",
            "is",
            "that",
            "it",
            "for",
            "was",
            "on",
            "are",
            "with",
            "as",
            "be",
            "by",
            "this",
            "not",
            "or",
            "you",
            "from",
            "at",
            "have",
            "an",
            "which",
            "but",
            "all",
            "can",
            "if",
            "will",
            "your",
            "when",
            "there",
            "one",
            "has",
            "their",
            "what",
            "would",
            "more",
        ]
    ),
    "it": frozenset(
        [
            "il",
            "lo",
            "la",
            "le",
            "gli",
            "di",
            "che",
            "e",
            "è",
            "un",
            "una",
            "per",
            "non",
            "in",
            "con",
            "su",
            "del",
            "della",
            "dei",
            "delle",
            "dal",
            "nel",
            "nella",
            "sono",
            "si",
            "come",
            "anche",
            "ma",
            "più",
            "questo",
            "questa",
            "al",
            "alla",
            "se",
            "quando",
            "essere",
            "ha",
        ]
    ),
    "fr": frozenset(
        [
            "le",
            "la",
            "les",
            "de",
            "des",
            "du",
            "et",
            "est",
            "un",
            "une",
            "pour",
            "dans",
            "que",
            "qui",
            "ne",
            "pas",
            "sur",
            "au",
            "aux",
            "avec",
            "ce",
            "cette",
            "il",
            "elle",
            "sont",
            "ou",
            "par",
            "plus",
            "vous",
            "nous",
            "être",
            "se",
            "en",
            "son",
            "sa",
        ]
    ),
}
_UK_MARKS = frozenset("іїєґІЇЄҐ")
_BG_MARKS = frozenset("ъЪ")
_RU_MARKS = frozenset("ыэёЫЭЁ")
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")


def normalize_ws(text: str) -> str:
    """`text` with every run of whitespace collapsed to one space, stripped."""
    return " ".join(text.split())


def dedupe(docs: Iterable[str]) -> list[str]:
    """`docs` without empty documents and exact duplicates after whitespace normalization (the
    first occurrence is kept, in order)."""
    seen: set[str] = set()
    kept: list[str] = []
    for doc in docs:
        key = normalize_ws(doc)
        if key and key not in seen:
            seen.add(key)
            kept.append(doc)
    return kept


def _is_cyrillic(ch: str) -> bool:
    return "\u0400" <= ch <= "\u04ff"


def _is_latin(ch: str) -> bool:
    return ch.isascii() or "\u00c0" <= ch <= "\u024f"


def detect_language(text: str) -> str | None:
    """The language of `text`: en, it, fr, uk, bg, "cyrl" (Cyrillic, uk or bg) or None (unknown)."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return None
    cyrillic = sum(map(_is_cyrillic, letters))
    if cyrillic * 2 > len(letters):
        chars = set(letters)
        if chars & _RU_MARKS:
            return None
        uk, bg = bool(chars & _UK_MARKS), bool(chars & _BG_MARKS)
        if uk != bg:
            return "uk" if uk else "bg"
        return "cyrl" if not uk else None
    if sum(map(_is_latin, letters)) * 2 <= len(letters):
        return None
    words = [w.lower().replace("’", "'") for w in _WORD.findall(text)]
    # Elided articles ("l'aide", "dell'anno") count as their stopword ("l", "dell").
    words += [w.split("'", 1)[0] for w in words if "'" in w]
    scores = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    best = max(scores, key=lambda lang: scores[lang])
    ranked = sorted(scores.values(), reverse=True)
    if ranked[0] == 0 or ranked[0] == ranked[1]:
        return None
    return best


def language_filter(paragraphs: Iterable[str], lang: str) -> list[str]:
    """The paragraphs detected as `lang` (one of LANGUAGES); for uk and bg, also Cyrillic paragraphs
    with no letter telling them apart (the sources are chosen per language; the filter removes what
    is clearly another language)."""
    if lang not in LANGUAGES:
        raise ValueError(f"unsupported language {lang!r}; choose one of {', '.join(LANGUAGES)}")
    accepted = {lang, "cyrl"} if lang in ("uk", "bg") else {lang}
    return [p for p in paragraphs if detect_language(p) in accepted]
