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


def parse_value(text: str) -> Any:
    """Option values: ints, floats, true/false, none, or strings (quotes optional)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
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
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"pipeline spec {where!r}: unbalanced ')'")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise UsageError(f"pipeline spec {where!r}: unbalanced '('")
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_text(spec: str) -> list[SpecItem]:
    """Parse ``a,b(x=1),c`` into items; a clear error for any malformed piece."""
    if not spec.strip():
        raise UsageError("pipeline spec is empty")
    items = []
    for part in _split_top_level(spec, spec):
        if not part:
            raise UsageError(f"pipeline spec {spec!r}: empty item (stray comma?)")
        match = re.fullmatch(r"([^()]+?)\s*(?:\((.*)\))?", part, flags=re.S)
        if match is None:
            raise UsageError(f"pipeline spec {spec!r}: cannot read {part!r}")
        name, args = match.group(1).strip(), match.group(2)
        if not _NAME.fullmatch(name):
            raise UsageError(f"pipeline spec {spec!r}: {name!r} is not a pass name (kebab-case, e.g. fold-constants)")
        options: dict[str, Any] = {}
        if args and args.strip():
            for arg in _split_top_level(args, part):
                key, sep, value = arg.partition("=")
                if not sep or not key.strip():
                    raise UsageError(f"pipeline spec {spec!r}: option {arg!r} of {name!r} is not key=value")
                options[key.strip()] = parse_value(value)
        items.append((name, options))
    return items


def parse_document(data: Any, where: str) -> list[SpecItem]:
    """Items from a parsed YAML/TOML document (see module docstring for the shapes)."""
    entries = data.get("passes") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{where}: expected a non-empty top-level 'passes' list")
    items = []
    for entry in entries:
        if isinstance(entry, str):
            items.append((entry, {}))
        elif isinstance(entry, dict) and "name" in entry:
            options = {k: v for k, v in entry.items() if k != "name"}
            items.append((str(entry["name"]), options))
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            if options is not None and not isinstance(options, dict):
                raise UsageError(f"{where}: options of {name!r} must be a mapping")
            items.append((str(name), dict(options or {})))
        else:
            raise UsageError(f"{where}: cannot read pipeline entry {entry!r}")
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
