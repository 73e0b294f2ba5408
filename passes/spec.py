"""Pipeline specs: one-line text, YAML or TOML, parsed into (pass name, options) items.

Text: ``fold-constants,fuse,calibrate(method=percentile,percentile=99.9),quantize``.
Files: a top-level ``passes`` list whose items are a name, a one-key mapping
``{name: {option: value}}``, or a table with a ``name`` key and option keys::

    # pipeline.yaml                     # pipeline.toml
    passes:                             [[passes]]
      - fold-constants                  name = "fold-constants"
      - calibrate: {method: entropy}    [[passes]]
      - quantize                        name = "calibrate"
                                        method = "entropy"
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from bitpass.frontend.errors import UsageError

SpecItem = tuple[str, dict[str, Any]]

_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


_OPTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPEN, _CLOSE = "([", ")]"


def parse_value(text: str) -> Any:
    """Option values: ints, floats, true/false, none, ``[a,b]`` lists, or strings (quotes optional).

    Quote a string that contains ``,()[]=`` or would otherwise read as a number,
    a bool or none: ``name="a,b"``, ``tag='8'``.
    """
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        inner = text[1:-1].strip()
        return [parse_value(item) for item in _split_top_level(inner, text)] if inner else []
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split_top_level(text: str, where: str) -> list[str]:
    """Split on commas outside brackets and quotes; unbalanced brackets or quotes are errors."""
    parts: list[str] = []
    stack: list[str] = []
    current: list[str] = []
    quote = ""
    for char in text:
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in _OPEN:
            stack.append(_CLOSE[_OPEN.index(char)])
        elif char in _CLOSE:
            if not stack or stack.pop() != char:
                raise UsageError(f"pipeline spec {where!r}: unbalanced {char!r}")
        if char == "," and not stack and not quote:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quote:
        raise UsageError(f"pipeline spec {where!r}: unterminated quote {quote}")
    if stack:
        raise UsageError(f"pipeline spec {where!r}: unbalanced {_OPEN[_CLOSE.index(stack[-1])]!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _has_bare_paren(text: str) -> bool:
    """Whether ``text`` has a parenthesis outside quotes."""
    quote = ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "()":
            return True
    return False


def parse_text(spec: str) -> list[SpecItem]:
    """Parse ``a,b(x=1),c`` into items; a clear error for any malformed piece."""
    if not spec.strip():
        raise UsageError("pipeline spec is empty")
    items = []
    for part in _split_top_level(spec, spec):
        if not part:
            raise UsageError(f"pipeline spec {spec!r}: empty item (stray comma?)")
        match = re.fullmatch(r"([^()\[\]'\"]+?)\s*(?:\((.*)\))?", part, flags=re.S)
        if match is None:
            raise UsageError(f"pipeline spec {spec!r}: cannot read {part!r} (expected name or name(key=value,...))")
        name, args = match.group(1).strip(), match.group(2)
        if not _NAME.fullmatch(name):
            raise UsageError(f"pipeline spec {spec!r}: {name!r} is not a pass name (kebab-case, e.g. fold-constants)")
        options: dict[str, Any] = {}
        if args and args.strip():
            for arg in _split_top_level(args, part):
                key, sep, value = arg.partition("=")
                key = key.strip()
                if not sep or not key:
                    raise UsageError(f"pipeline spec {spec!r}: option {arg!r} of {name!r} is not key=value")
                if not _OPTION.fullmatch(key):
                    raise UsageError(f"pipeline spec {spec!r}: {key!r} is not an option name (pass options are "
                                     f"identifiers; nested parentheses are not allowed)")
                if _has_bare_paren(value):
                    raise UsageError(f"pipeline spec {spec!r}: value of {name}({key}=...) contains parentheses: "
                                     f"nested parentheses are not allowed; quote the value if it is a string")
                if key in options:
                    raise UsageError(f"pipeline spec {spec!r}: option {key!r} of {name!r} is given twice")
                options[key] = parse_value(value)
        items.append((name, options))
    return items


def parse_document(data: Any, where: str) -> list[SpecItem]:
    """Items from a parsed YAML/TOML document (see module docstring for the shapes)."""
    entries = data.get("passes") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{where}: expected a non-empty top-level 'passes' list")
    items = []
    for number, entry in enumerate(entries, 1):
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, dict) and "name" in entry:
            name, options = entry["name"], {k: v for k, v in entry.items() if k != "name"}
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            if options is not None and not isinstance(options, dict):
                raise UsageError(f"{where}: pass {number} ({name!r}): options must be a mapping, "
                                 f"not {type(options).__name__} (a table of options needs a 'name' key)")
            options = dict(options or {})
        else:
            raise UsageError(f"{where}: cannot read pipeline entry {number}: {entry!r} (expected a pass name, "
                             f"{{name: {{option: value}}}} or a table with a 'name' key)")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UsageError(f"{where}: pass {number}: {name!r} is not a pass name (kebab-case, e.g. fold-constants)")
        bad = [k for k in options if not isinstance(k, str) or not _OPTION.fullmatch(k)]
        if bad:
            raise UsageError(f"{where}: pass {number} ({name!r}): {bad[0]!r} is not an option name")
        items.append((name, options))
    return items


def parse_file(path: str | Path) -> list[SpecItem]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"pipeline file {path}: no such file")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"pipeline file {path}: {str(err).splitlines()[0]}") from err
    return parse_document(data, str(path))


def looks_like_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml", ".toml"))
