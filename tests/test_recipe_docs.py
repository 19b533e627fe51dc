"""docs/recipes.md's key table is tested against the schema (cspx/config.py) and the resume rule
(cspx/checkpoint.py), so the two cannot drift: every key, its type, its default and whether it may
change on resume."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing

from conftest import ROOT
from cspx import configio
from cspx.checkpoint import RESUME_FREE
from cspx.config import Config


def type_text(tp) -> str:
    """A field's type as the table writes it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{type_text(inner[0])} or null"
    if origin is typing.Literal:
        return ", ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {len(args)} {type_text(args[0])}s"
    return {int: "int", float: "number", str: "string", bool: "bool"}[tp]


def default_text(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value)


def schema():
    """{dotted key: (type, default, resume)} from the dataclasses."""
    out = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if configio.is_section(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = prefix + f.name
            out[key] = (type_text(tp), default_text(default),
                        "yes" if key.startswith(RESUME_FREE) else "no")
    walk(Config, "")
    return out


def table():
    """{dotted key: (type, default, resume)} from the key reference table."""
    text = open(os.path.join(ROOT, "docs", "recipes.md"), encoding="utf-8").read()
    section = text.split("## Key reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"`[a-z_.]+`", cells[0]):
            rows[cells[0].strip("`")] = (cells[1], cells[2].strip("`"), cells[5])
    return rows


def test_key_table_matches_the_schema():
    doc, code = table(), schema()
    assert sorted(doc) == sorted(code)
    for key in code:
        assert doc[key] == code[key], key
