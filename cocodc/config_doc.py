"""The configuration reference (docs/config.md), written from config.py itself: every key, its type
or choices, its default and its meaning, which is the comment on the field's line or the comment
block just above it. So the reference cannot drift from the code; a key without a comment is an
error here, and tests/test_docs.py fails when the committed page differs from what this writes.

    python -m cocodc.config_doc > docs/config.md
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any

from cocodc.config import Config

HEADER = """# Configuration reference

Generated from `cocodc/config.py` by `python -m cocodc.config_doc > docs/config.md`; do not edit by
hand (a test fails when this page is stale). A YAML file sets sections of these keys, and
`--set section.key=value` overrides any of them (repeatable). A wrong key, type or value is a
one-line error naming it.
"""


def field_comments(cls: type) -> dict[str, str]:
    """Each field's meaning: the comment on its line, or the block of comment lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line number -> its comment's text
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(token.start[0])
    meanings = {}
    lines = source.splitlines()
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":")[0]
        if not line.startswith("    ") or line.startswith("     ") or not name.isidentifier() or ":" not in line:
            continue
        if number in comments and number in code_lines:
            meanings[name] = comments[number]
            continue
        above, at = [], number - 1
        while at in comments and at not in code_lines:
            above.insert(0, comments[at])
            at -= 1
        if above:
            meanings[name] = " ".join(above)
    return meanings


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " \\| ".join(f"`{choice}`" for choice in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(hint) if arg is not type(None)) + " or unset"
    if typing.get_origin(hint) is list:
        return "M x M list"
    return getattr(hint, "__name__", str(hint))


def default_of(field: dataclasses.Field) -> str:
    value = field.default
    if value is None:
        return "unset"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def render() -> str:
    """The whole reference page."""
    top_hints = typing.get_type_hints(Config)
    plain = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(top_hints[f.name])]
    out = [HEADER, "## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    meanings = field_comments(Config)
    out += [_row(f.name, top_hints[f.name], f, _meaning(Config, f.name, meanings)) for f in plain]
    for f in dataclasses.fields(Config):
        if f not in plain:
            out += _section(f.name, top_hints[f.name])
    return "\n".join(out) + "\n"


def _section(name: str, cls: type) -> list[str]:
    """A section's table, then its own sections' (model.rope_scaling after model)."""
    hints, meanings = typing.get_type_hints(cls), field_comments(cls)
    out = ["", f"## {name}", ""]
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # a docstring of its own
        out += [" ".join(cls.__doc__.split()), ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append(f)
            out.append(f"| `{name}.{f.name}` | section | | {_meaning(cls, f.name, meanings)}: see below |")
        else:
            out.append(_row(f"{name}.{f.name}", hints[f.name], f, _meaning(cls, f.name, meanings)))
    for f in nested:
        out += _section(f"{name}.{f.name}", hints[f.name])
    return out


def _row(key: str, hint: Any, field: dataclasses.Field, meaning: str) -> str:
    return f"| `{key}` | {type_name(hint)} | {default_of(field)} | {meaning} |"


def _meaning(cls: type, name: str, meanings: dict[str, str]) -> str:
    if name not in meanings:
        raise ValueError(f"{cls.__name__}.{name} has no comment in cocodc/config.py: say what the key means there")
    return meanings[name].replace("|", "\\|")


if __name__ == "__main__":
    sys.stdout.write(render())
