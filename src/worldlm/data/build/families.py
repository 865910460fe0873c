"""The `families` tree: twelve languages in four families (Romance, Germanic, Slavic, Uralic).

Every leaf is the LibreOffice help in its language (`libreoffice-help-<lang>`, Debian), so that
leaves differ in language and family and not in genre or topic: the same pages, translated. Some
translations are partial; their untranslated English is filtered out (`textutil.language_filter`),
so leaves differ in size. "Uralic" is the least homogeneous family: Finnish and Estonian are
Finnic, Hungarian is Ugric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from worldlm.data.build.fetch import Leaf, Source, build_leaves
from worldlm.data.build.languages import libreoffice_help

FAMILIES: dict[str, tuple[str, ...]] = {
    "romance": ("es", "fr", "it"),
    "germanic": ("de", "nl", "sv"),
    "slavic": ("ru", "pl", "cs"),
    "uralic": ("fi", "hu", "et"),
}


def _help_extractor(lang: str) -> Callable[[list[Path]], Iterator[str]]:
    def extract(paths: list[Path]) -> Iterator[str]:
        return libreoffice_help(paths[0], lang)

    return extract


def _help_leaf(lang: str) -> Leaf:
    # Debian versions follow the apt lists of the machine, as in the languages tree.
    source = Source(registry="debian", name=f"libreoffice-help-{lang}", version=None)
    return Leaf((source,), _help_extractor(lang))


LEAVES: dict[str, Leaf] = {
    f"{family}/{lang}": _help_leaf(lang) for family, langs in FAMILIES.items() for lang in langs
}


def build(
    out_dir: Path,
    cache_dir: Path,
    *,
    leaves: list[str] | None = None,
    max_docs: int | None = None,
) -> dict[str, int]:
    """Build the families tree into `out_dir/<leaf>.jsonl`; docs per leaf (see `build_leaves`)."""
    return build_leaves(
        "families", LEAVES, Path(out_dir), Path(cache_dir), leaves=leaves, max_docs=max_docs
    )
