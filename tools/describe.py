"""Pass options in plain words for ``bitpass passes NAME``: types a user would write, defaults, and the
``#:`` comment written above each option in its ``Config`` (the convention Sphinx reads too)."""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

_COMMENT = re.compile(r"((?:[ \t]*#:.*\n)+)[ \t]*(\w+)\s*:")


@dataclass(frozen=True)
class OptionHelp:
    name: str
    kind: str
    default: str
    help: str


def plain_type(annotation: Any) -> str:
    """``Literal['a', 'b']`` → ``one of a, b``; ``float | None`` → ``number or none``; ``list[str]`` → ``list of text``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [plain_type(a) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(kinds)) + (" or none" if type(None) in args else "")
    if origin in (list, tuple, set, frozenset):
        inner = plain_type(args[0]) if args else "values"
        return f"list of {inner}"
    if origin is dict:
        return "mapping"
    if typing.get_origin(annotation) is typing.Annotated:
        return plain_type(args[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    return {bool: "true/false", int: "integer", float: "number", str: "text"}.get(annotation, getattr(
        annotation, "__name__", str(annotation)))


def _comments(config: type) -> dict[str, str]:
    """``#:`` comments above each field in the class source (and its bases')."""
    found: dict[str, str] = {}
    for cls in reversed(config.__mro__):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for block, name in _COMMENT.findall(source):
            found[name] = " ".join(line.strip()[2:].strip() for line in block.strip().splitlines())
    return found


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    return str(value)


def option_help(pass_class: Any) -> list[OptionHelp]:
    """Every option of a pass: name, plain type, default (or "required"), and its one-line description."""
    config = pass_class.Config
    comments = _comments(config)
    rows = []
    for name, info in config.model_fields.items():
        default = "required" if info.is_required() else _default_text(info.get_default(call_default_factory=True))
        described = info.description or comments.get(name, "")
        rows.append(OptionHelp(name, plain_type(info.annotation), default, described))
    return rows
