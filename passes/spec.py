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

Pipeline files are configuration, not data: at most 1 MiB, UTF-8, nested at
most 32 levels, and a YAML document expands (aliases included) to at most
10,000 nodes, so a few hundred bytes of anchors cannot become gigabytes.
Every message quotes the user's text shortened, so an error stays one line.
"""

from __future__ import annotations

import re
import reprlib
import tomllib
from pathlib import Path
from typing import Any

import yaml

from bitpass.frontend.errors import UsageError

SpecItem = tuple[str, dict[str, Any]]

_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


_OPTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPEN, _CLOSE = "([", ")]"

#: caps on pipeline files and specs (see the module docstring)
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_YAML_NODES = 10_000

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = 4
_REPR.maxlevel = 2


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a one-line message: nested and long values shortened."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_value(text: str, _depth: int = 0) -> Any:
    """Option values: ints, floats, true/false, none, ``[a,b]`` lists, or strings (quotes optional).

    Quote a string that contains ``,()[]=`` or would otherwise read as a number,
    a bool or none: ``name="a,b"``, ``tag='8'``.
    """
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        if _depth >= MAX_DEPTH:
            raise UsageError(f"pipeline spec value {shown(text)}: lists nested more than {MAX_DEPTH} deep")
        inner = text[1:-1].strip()
        return [parse_value(item, _depth + 1) for item in _split_top_level(inner, text)] if inner else []
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
                raise UsageError(f"pipeline spec {shown(where)}: unbalanced {char!r}")
        if char == "," and not stack and not quote:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quote:
        raise UsageError(f"pipeline spec {shown(where)}: unterminated quote {quote}")
    if stack:
        raise UsageError(f"pipeline spec {shown(where)}: unbalanced {_OPEN[_CLOSE.index(stack[-1])]!r}")
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
            raise UsageError(f"pipeline spec {shown(spec)}: empty item (stray comma?)")
        match = re.fullmatch(r"([^()\[\]'\"]+?)\s*(?:\((.*)\))?", part, flags=re.S)
        if match is None:
            raise UsageError(f"pipeline spec {shown(spec)}: cannot read {shown(part)} "
                             f"(expected name or name(key=value,...))")
        name, args = match.group(1).strip(), match.group(2)
        if not _NAME.fullmatch(name):
            raise UsageError(f"pipeline spec {shown(spec)}: {shown(name)} is not a pass name "
                             f"(kebab-case, e.g. fold-constants)")
        options: dict[str, Any] = {}
        if args and args.strip():
            for arg in _split_top_level(args, part):
                key, sep, value = arg.partition("=")
                key = key.strip()
                if not sep or not key:
                    raise UsageError(f"pipeline spec {shown(spec)}: option {shown(arg)} of {shown(name)} "
                                     f"is not key=value")
                if not _OPTION.fullmatch(key):
                    raise UsageError(f"pipeline spec {shown(spec)}: {shown(key)} is not an option name (pass options are "
                                     f"identifiers; nested parentheses are not allowed)")
                if _has_bare_paren(value):
                    raise UsageError(f"pipeline spec {shown(spec)}: value of {name}({shown(key, 40)}=...) contains parentheses: "
                                     f"nested parentheses are not allowed; quote the value if it is a string")
                if key in options:
                    raise UsageError(f"pipeline spec {shown(spec)}: option {shown(key)} of {shown(name)} "
                                     f"is given twice")
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
                raise UsageError(f"{where}: pass {number} ({shown(name)}): options must be a mapping, "
                                 f"not {type(options).__name__} (a table of options needs a 'name' key)")
            options = dict(options or {})
        else:
            raise UsageError(f"{where}: cannot read pipeline entry {number}: {shown(entry)} (expected a pass name, "
                             f"{{name: {{option: value}}}} or a table with a 'name' key)")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UsageError(f"{where}: pass {number}: {shown(name)} is not a pass name "
                             f"(kebab-case, e.g. fold-constants)")
        bad = [k for k in options if not isinstance(k, str) or not _OPTION.fullmatch(k)]
        if bad:
            raise UsageError(f"{where}: pass {number} ({shown(name)}): {shown(bad[0])} is not an option name")
        items.append((name, options))
    return items


def _yaml_nodes(node: yaml.Node, where: str) -> int:
    """Nodes of a composed YAML document as constructed, aliases expanded; refuses bombs and recursion."""
    counts: dict[int, int] = {}
    in_progress: set[int] = set()

    def count(item: yaml.Node, depth: int) -> int:
        key = id(item)
        if key in counts:
            return counts[key]
        if key in in_progress:
            raise UsageError(f"pipeline file {where}: a YAML alias refers to itself; write the pipeline out")
        if depth > MAX_DEPTH:
            raise UsageError(f"pipeline file {where}: nested more than {MAX_DEPTH} levels deep")
        in_progress.add(key)
        children: list[yaml.Node] = []
        if isinstance(item, yaml.SequenceNode):
            children = list(item.value)
        elif isinstance(item, yaml.MappingNode):
            children = [part for pair in item.value for part in pair]
        total = 1
        for child in children:
            total += count(child, depth + 1)
            if total > MAX_YAML_NODES:
                raise UsageError(f"pipeline file {where}: expands to more than {MAX_YAML_NODES:,} YAML nodes "
                                 f"(aliases included); a pipeline is a short list of passes")
        in_progress.discard(key)
        counts[key] = total
        return total

    return count(node, 0)


def _load_yaml(text: str, where: str) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _yaml_nodes(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _depth(data: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of parsed TOML (lists and tables), at most ``limit + 1``."""
    stack = [(data, 0)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _path_text(path: Path, limit: int = 150) -> str:
    """A path for a one-line message: as is when printable and short, else escaped and cut at the front."""
    text = str(path)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def parse_file(path: str | Path) -> list[SpecItem]:
    path = Path(path)
    where = _path_text(path)
    if not path.is_file():
        raise UsageError(f"pipeline file {where}: no such file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UsageError(f"pipeline file {where}: {size:,} bytes; a pipeline file is at most {MAX_FILE_BYTES:,} "
                         f"bytes (a short list of passes)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"pipeline file {where}: not UTF-8 text (byte {raw[err.start]:#04x} at offset "
                         f"{err.start}); save it as UTF-8") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
            if _depth(data) > MAX_DEPTH:
                raise UsageError(f"pipeline file {where}: nested more than {MAX_DEPTH} levels deep")
        else:
            data = _load_yaml(text, where)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"pipeline file {where}: {shown(first, 160)[1:-1]}") from None
    except RecursionError:
        raise UsageError(f"pipeline file {where}: nested more than {MAX_DEPTH} levels deep") from None
    return parse_document(data, where)


def looks_like_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml", ".toml"))
