"""Starter configs that `worldlm init` writes, shipped in the wheel (worldlm/configs/templates/).

Each template is a commented TOML file whose first comment line says what it is for; `default`
is the embedded default run itself. They are copied as text, comments included: the comments
(and the lines marked FILL IN) are the point of a starter config.

A template that reads inputs of its own names them under DATA_DIR_TOKEN, which becomes the
example directory beside the written config (`<config stem>-data`, relative to the config);
`write_template` fills that directory with example inputs (worldlm.examples) unless told not to,
so that the config checks and runs at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from worldlm.config import default_config_text
from worldlm.errors import ConfigError

DEFAULT = "default"
DATA_DIR_TOKEN = "{data_dir}"  # in a template's text: the example directory, relative to it


def template_names() -> list[str]:
    """Every template: `default` first, then the shipped files in name order."""
    folder = resources.files("worldlm.configs").joinpath("templates")
    shipped = sorted(
        entry.name.removesuffix(".toml")
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(".toml")
    )
    return [DEFAULT, *shipped]


def template_text(name: str) -> str:
    """The TOML text of template `name`; ConfigError naming the templates there are."""
    if name == DEFAULT:
        return default_config_text()
    if name not in template_names():
        raise ConfigError(
            f"unknown template {name!r}; choose one of {', '.join(template_names())} "
            "(`worldlm init --list` describes them)"
        )
    folder = resources.files("worldlm.configs").joinpath("templates")
    return folder.joinpath(f"{name}.toml").read_text("utf-8")


def template_summary(name: str) -> str:
    """The first line of the template's opening comment."""
    for line in template_text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def example_dir(out: Path) -> Path:
    """The example directory of the config file `out`: `<stem>-data` beside it."""
    return out.with_name(f"{out.stem}-data")


def has_examples(name: str) -> bool:
    """Whether template `name` reads inputs that `write_template` can write examples of."""
    return DATA_DIR_TOKEN in template_text(name)


def write_template(name: str, out: Path, *, examples: bool = True) -> list[str]:
    """Write template `name` to `out`, never over an existing file, and (with `examples`, for
    a template that reads inputs) its example inputs into `example_dir(out)`, never into an
    existing one. Returns one line per example input written."""
    data_dir = example_dir(out)
    text = template_text(name).replace(DATA_DIR_TOKEN, data_dir.name)
    if out.exists():
        raise _exists(out)
    examples = examples and DATA_DIR_TOKEN in template_text(name)
    if examples and data_dir.exists():
        raise ConfigError(
            f"{data_dir} (the example data of {out}) already exists; choose another --out, "
            "remove it to start over, or pass --no-example-data"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    staging: Path | None = None
    try:
        if examples:
            from worldlm.examples import write_examples

            # Written aside and moved into place at the end: no half-written directory stays.
            staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.", dir=out.parent))
            written = write_examples(text, out.parent, data_dir, staging=staging)
        placed: Path | None = None
        if staging is not None:
            # mkdtemp's directory is private (0700); the example data is ordinary files.
            staging.chmod(0o777 & ~_umask())
            try:
                staging.rename(data_dir)  # refused onto a non-empty directory (a race)
            except OSError as exc:
                raise ConfigError(f"cannot put the example data at {data_dir}: {exc}") from None
            placed, staging = data_dir, None
        try:
            with out.open("x", encoding="utf-8") as fh:  # "x": fails if the file exists
                fh.write(text)
        except FileExistsError:
            if placed is not None:
                shutil.rmtree(placed, ignore_errors=True)
            raise _exists(out) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exists(out: Path) -> ConfigError:
    return ConfigError(f"{out} already exists; choose another --out, or remove it to start over")
