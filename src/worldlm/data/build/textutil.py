"""Pure text functions for corpus building: de-duplication and a small, explainable language filter.

The language heuristic (`detect_language`) looks only at letters:
1. script: more than half Cyrillic letters -> Cyrillic, more than half Latin letters -> Latin;
2. Cyrillic: Russian has ы э ё (and no Ukrainian letter), Ukrainian has і ї є ґ, Bulgarian has ъ
   and none of those; a paragraph with none of these marks is "cyrl" (unknown Cyrillic);
3. Latin: the languages (en, it, fr, es, de, nl, sv, pl, cs, fi, hu, et) whose short stopword
   lists cover most words (`candidate_languages`); `detect_language` names one only if it alone
   does best, while `language_filter` keeps a paragraph its language ties for (see there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Very frequent function words. A word may be in several lists (French, Spanish and Dutch "de";
# Finnish and Estonian "ja"): the best score wins, and a tie is reported as one. A word far more
# frequent in another language than in its own is left out (French "et", "du" for Estonian and
# Swedish; Italian "o" for Spanish; English "to", "by", "is" for Polish, Czech and Hungarian) so
# that it does not pull that language's paragraphs into a tie.
_STOPWORDS = {
    "en": _words(
        "the of and to in is that it for was on are with as be by this not or you from at have an "
        "which but all can if will your when there one has their what would more"
    ),
    "it": _words(
        "il lo la le gli di che e è un una per non in con su del della dei delle dal nel nella "
        "sono si come anche ma più questo questa al alla se quando essere ha"
    ),
    "fr": _words(
        "le la les de des du et est un une pour dans que qui ne pas sur au aux avec ce cette il "
        "elle sont ou par plus vous nous être se en son sa"
    ),
    "es": _words(
        "de la que el en y los las del se un una por con no para es al lo como más pero su sus "
        "este esta si cuando también puede usted hay entre sobre desde donde ya"
    ),
    "de": _words(
        "der die und den von zu das mit sich des auf für ist im in dem nicht ein eine einen einem "
        "einer als auch aus werden wird sie wenn oder kann können bei nach über zum zur um durch "
        "diese dieser"
    ),
    "nl": _words(
        "de het een en van dat op te is in zijn voor met niet aan er om ook als dan maar bij wordt "
        "uit nog worden door naar deze kan u wat dit heeft kunnen"
    ),
    "sv": _words(
        "och att det som en på är av för med till den har de inte om ett men var sig från vi så "
        "kan man när eller detta dessa också finns måste vid i"
    ),
    "pl": _words(
        "i w z na się nie do że jest o jak a po od co za ale tak przez dla być jako może lub oraz "
        "są ten ta aby które który która tego jeśli można należy gdy"
    ),
    "cs": _words(
        "a se na v je že s z do o k ve jako pro po ale jsou jak tak za od nebo které který která "
        "jeho být lze můžete pokud tento tato toto při také jen než"
    ),
    "fi": _words(
        "ja on ei se että oli hän kun mutta ovat tai jos niin kuin ole myös voi sen tämä joka "
        "jotka ne vain nyt mitä siitä sitten voit tässä tätä kanssa jossa olla mukaan sekä jonka"
    ),
    "hu": _words(
        "a az és hogy nem egy meg ez van csak el ki már mint volt még ha azt vagy fel kell lesz "
        "ezt sem mert pedig lehet nincs amely amelyet után között szerint illetve"
    ),
    "et": _words(
        "ja on ei see ka kui oli mis ta aga või ning kas siis nii seda selle mida kõik veel pole "
        "saab oma kuid vaid mille kus need ole olla võib koos ainult"
    ),
}

# The Cyrillic languages are told apart by letters, not words (see `_cyrillic_language`).
_CYRILLIC = ("uk", "bg", "ru")
LANGUAGES = (*_STOPWORDS, *_CYRILLIC)
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


def _cyrillic_candidates(chars: set[str]) -> frozenset[str]:
    uk, bg = bool(chars & _UK_MARKS), bool(chars & _BG_MARKS)
    if chars & _RU_MARKS:
        # Russian also writes ъ, but never і ї є ґ: with those, the paragraph is mixed.
        return frozenset() if uk else frozenset({"ru"})
    if uk and bg:
        return frozenset()
    if uk or bg:
        return frozenset({"uk" if uk else "bg"})
    return frozenset(_CYRILLIC)


def _latin_candidates(text: str) -> frozenset[str]:
    words = [w.lower().replace("’", "'") for w in _WORD.findall(text)]
    # Elided articles ("l'aide", "dell'anno") count as their stopword ("l", "dell").
    words += [w.split("'", 1)[0] for w in words if "'" in w]
    scores = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    best = max(scores.values())
    return frozenset(lang for lang, score in scores.items() if score == best > 0)


def candidate_languages(text: str) -> frozenset[str]:
    """The languages `text` may be in: one when clear, several when stopword scores tie or Cyrillic
    has no telling letter (uk, bg, ru), none when unknown or mixed."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return frozenset()
    if sum(map(_is_cyrillic, letters)) * 2 > len(letters):
        return _cyrillic_candidates(set(letters))
    if sum(map(_is_latin, letters)) * 2 <= len(letters):
        return frozenset()
    return _latin_candidates(text)


def detect_language(text: str) -> str | None:
    """The language of `text`: one of LANGUAGES, "cyrl" (Cyrillic: uk, bg or ru) or None (unknown,
    mixed, or a tie between stopword lists)."""
    found = candidate_languages(text)
    if len(found) == 1:
        return next(iter(found))
    return "cyrl" if found == frozenset(_CYRILLIC) else None


def language_filter(paragraphs: Iterable[str], lang: str) -> list[str]:
    """The paragraphs that may be in `lang` (one of LANGUAGES) and are not possibly English, unless
    `lang` is English. The sources are chosen per language, so the filter only removes what is
    clearly another language, and the untranslated English that translated manuals hold; a short
    paragraph of words shared with a neighbour ("de la" in French and Spanish) is kept."""
    if lang not in LANGUAGES:
        raise ValueError(f"unsupported language {lang!r}; choose one of {', '.join(LANGUAGES)}")
    kept = []
    for paragraph in paragraphs:
        found = candidate_languages(paragraph)
        if lang in found and (lang == "en" or "en" not in found):
            kept.append(paragraph)
    return kept
