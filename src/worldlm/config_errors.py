"""Turn pydantic validation errors into one message that names each bad key.

Unknown keys get a "did you mean" suggestion drawn from the fields of the section they sit in.
"""

from __future__ import annotations

import difflib
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError


def format_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    """One line per problem: `key.path: what is wrong`."""
    lines = []
    for err in exc.errors():
        loc, section = _node_tag(root, [str(part) for part in err["loc"]])
        key = ".".join(loc) or "(top level)"
        if err["type"] == "aggregator_only":
            lines.append(f"{key}.{err['ctx']['key']}: {err['msg']}")
        elif err["type"] == "extra_forbidden":
            fields = _fields_at(section or root, loc[2:-1] if section else loc[:-1])
            hint = difflib.get_close_matches(loc[-1], fields, n=1)
            known = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(fields)}"
            lines.append(f"{key}: unknown key ({known})")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {_clean(err['msg'])} (got {err.get('input')!r})")
    count = len(lines)
    head = "invalid config" + (f" ({count} problems)" if count > 1 else "")
    return head + ":\n  " + "\n  ".join(lines)


def _node_tag(root: type[BaseModel], loc: list[str]) -> tuple[list[str], type[BaseModel] | None]:
    """A node table is validated as an aggregator's or a leaf's (config.NodeConfig); pydantic
    puts that tag in the location (`nodes.<path>.leaf.<key>`). Returns the location without it,
    and the section the tag names (None elsewhere)."""
    field = root.model_fields.get(loc[0]) if loc else None
    if field is None or get_origin(field.annotation) is not dict or len(loc) < 3:
        return loc, None
    value_type = get_args(field.annotation)[1]  # Annotated[A | B, Discriminator] for nodes
    for member in get_args(get_args(value_type)[0]) if get_origin(value_type) else ():
        cls, *meta = get_args(member) or (member,)
        if any(getattr(m, "tag", None) == loc[2] for m in meta):
            return [*loc[:2], *loc[3:]], cls
    return loc, None


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the section found by walking `loc` from the root model."""
    current: Any = model
    for part in loc:
        section = _as_model(current)
        if section is not None and part in section.model_fields:
            current = section.model_fields[part].annotation
            continue
        # a dict value (nodes."world/x") or an optional: step into the value type
        args = [a for a in get_args(current) if a is not type(None)]
        if get_origin(current) is dict and len(args) == 2:
            current = args[1]
        elif args:
            current = args[0]
            section = _as_model(current)
            if section is not None and part in section.model_fields:
                current = section.model_fields[part].annotation
    found = _as_model(current)
    return sorted(found.model_fields) if found is not None else []


def _as_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
