"""The ``model.yaml`` key reference (docs/config.md), rendered from the config schema.

``python -m quota_compile.config_reference`` prints it; ``--write`` writes docs/config.md.
Every key's type, default and bounds come from :mod:`quota_compile.config`; its meaning is the
field's ``description``. The output depends on the schema only, so it is deterministic.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import CompileConfig

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"
COMMAND = "python -m quota_compile.config_reference --write"

HEADER = f"""\
# `model.yaml` reference

<!-- Generated from quota_compile/config.py by `{COMMAND}`; do not edit by hand. -->

Unknown keys are rejected. Only `version` and `model.source` are required; every other key
has the default shown. Paths in `model.source` (and in `eval.benchmarks.*`) are relative to
the YAML file; `output.dir` is relative to the current working directory.
`examples/tiny-llava.yaml` and `examples/shapes-llava.yaml` are commented examples, and
[config-guide.md](config-guide.md) explains how the sections work together.

In the tables, a key written `a.b.c` is the YAML key `c` inside `b` inside section `a`.
"""


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _members(tp: Any) -> tuple:
    """The alternatives of a union (``X | None``), or the type itself."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _value(v: Any) -> str:
    """A default or allowed value as YAML would show it."""
    if isinstance(v, BaseModel):
        return "(the keys below)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False) if (not v or any(c in v for c in ' \n:"{}[]#')) else v
    if isinstance(v, list):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)


def _bare(tp: Any) -> Any:
    """``Annotated[T, ...]`` (a type with its own validator) as ``T``."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _type_name(tp: Any) -> str:
    tp = _bare(tp)
    if tp is type(None):
        return "null"
    if _is_model(tp):
        return "mapping"
    origin = typing.get_origin(tp)
    if origin is Literal:
        kinds = sorted({_type_name(type(a)) for a in typing.get_args(tp)})
        return " or ".join(kinds)
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list of {_plural(_type_name(item))}"
    return {int: "int", float: "float", str: "string", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(name: str) -> str:
    return " or ".join(n if n.endswith("s") else n + "s" for n in name.split(" or "))


def _describe_type(tp: Any) -> str:
    names: list[str] = []
    for m in _members(tp):
        n = _type_name(m)
        if n not in names:
            names.append(n)
    if "null" in names:  # "or null" last
        names = [n for n in names if n != "null"] + ["null"]
    return " or ".join(names)


def _allowed(tp: Any, metadata: list) -> str:
    """Allowed values (literals) and numeric / length bounds."""
    parts: list[str] = []
    for m in _members(tp):
        if typing.get_origin(m) is Literal:
            parts.append(", ".join(f"`{_value(a)}`" for a in typing.get_args(m)))
        elif typing.get_origin(m) is list and typing.get_origin(_bare(typing.get_args(m)[0])) is Literal:
            parts.append("each one of " + ", ".join(f"`{_value(a)}`" for a in typing.get_args(_bare(typing.get_args(m)[0]))))
        elif _is_model(m) and len(_members(tp)) > 1:
            parts.append("a mapping `{" + ", ".join(m.model_fields) + "}`")
    bounds = {type(c).__name__: c for c in metadata}
    lo = "(" + repr(bounds["Gt"].gt) if "Gt" in bounds else "[" + repr(bounds["Ge"].ge) if "Ge" in bounds else None
    hi = repr(bounds["Lt"].lt) + ")" if "Lt" in bounds else repr(bounds["Le"].le) + "]" if "Le" in bounds else None
    if lo and hi:
        parts.append(f"{lo}, {hi}")
    elif lo:
        parts.append(("> " if lo[0] == "(" else "≥ ") + lo[1:])
    elif hi:
        parts.append(("< " if hi[-1] == ")" else "≤ ") + hi[:-1])
    for c in metadata:
        if isinstance(c, annotated_types.MinLen) and c.min_length:
            parts.append(f"at least {c.min_length} item" + ("s" if c.min_length > 1 else ""))
    if "null" in _describe_type(tp) and parts:
        parts.append("null")
    return "; ".join(parts) if parts else "—"


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    v = field.default_factory() if field.default_factory is not None else field.default
    return _value(v) if isinstance(v, BaseModel) else f"`{_value(v)}`"


def _cell(text: str) -> str:
    return _links(" ".join(text.split()).replace("|", "\\|"))


def _links(text: str) -> str:
    """Paths of other documentation pages become links relative to docs/."""
    text = re.sub(r"(?<![\w/\[])docs/([\w-]+\.md)", r"[\1](\1)", text)
    return re.sub(r"(?<![\w/\[])benchmarks/README\.md", "[benchmarks/README.md](../benchmarks/README.md)", text)


def _rows(model: type[BaseModel], prefix: str) -> list[list[str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        rows.append([f"`{key}`", _describe_type(field.annotation), _default(field),
                     _allowed(field.annotation, field.metadata), field.description or ""])
        for m in _members(field.annotation):
            if _is_model(m):
                rows.extend(_rows(m, key + "."))
    return rows


def fields(model: type[BaseModel] = CompileConfig, prefix: str = ""):
    """Every (dotted key, field) of the schema, nested sections included, in schema order."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        for m in _members(field.annotation):
            if _is_model(m):
                yield from fields(m, prefix + name + ".")


def render() -> str:
    """docs/config.md: one section per top-level YAML key, a table per section."""
    out = [HEADER]
    for name, field in CompileConfig.model_fields.items():
        out.append(f"## `{name}`\n")
        about = _cell(field.description or "")
        out.append(about[:1].upper() + about[1:] + ".\n")
        rows = [["key", "type", "default", "allowed", "meaning"]]
        rows.append([f"`{name}`", _describe_type(field.annotation), _default(field),
                     _allowed(field.annotation, field.metadata), field.description or ""])
        for m in _members(field.annotation):
            if _is_model(m):
                rows = rows[:1] + _rows(m, name + ".")
        lines = ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
        lines.insert(1, "|---|---|---|---|---|")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quota_compile.config_reference", description="Print the model.yaml key reference (markdown), or write it to docs/config.md.")
    p.add_argument("--write", action="store_true", help=f"write {DOC_PATH.parent.name}/{DOC_PATH.name} instead of printing")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
