"""Starter configs that `worldlm init` writes, shipped in the wheel (worldlm/configs/templates/).

Each template is a commented TOML file whose first comment line says what it is for; `default`
is the embedded default run itself. They are copied as text, comments included: the comments
(and the lines marked FILL IN) are the point of a starter config.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from worldlm.config import default_config_text
from worldlm.errors import ConfigError

DEFAULT = "default"


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


def write_template(name: str, out: Path) -> Path:
    """Write template `name` to `out`, never over an existing file."""
    text = template_text(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.open("x", encoding="utf-8") as fh:  # "x": fails if the file exists
            fh.write(text)
    except FileExistsError:
        raise ConfigError(
            f"{out} already exists; choose another --out, or remove it to start over"
        ) from None
    return out
