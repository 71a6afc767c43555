"""kubectl's JSONPath templates (``-o jsonpath=...``): text with ``{path}`` actions, ``{range
path}...{end}``, ``{"literal"}``, and paths with ``.field``, ``..field``, ``[n]``, ``[a:b]``, ``[*]``,
``['key']`` and filters ``[?(@.a.b=="x")]``. Missing keys print nothing, as kubectl get does."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


class JsonPathError(ValueError):
    """A template that cannot be parsed or evaluated."""


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Action:
    path: "Path"


@dataclass(frozen=True)
class Range:
    path: "Path"
    body: tuple[Any, ...]


@dataclass(frozen=True)
class Path:
    root: str  # "$" (the document) or "@" (the current item)
    steps: tuple[tuple[str, Any], ...]


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "'": "'"}
_FILTER = re.compile(r"^\s*(@[^=!<>]*?)\s*(==|!=|<=|>=|<|>)\s*(.+?)\s*$")


def _unquote(literal: str) -> str:
    body, out, i = literal[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(_ESCAPES.get(body[i + 1], "\\" + body[i + 1]))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def _actions(template: str) -> list[tuple[str, str]]:
    """The template split into ("text", ...) and ("action", ...) pieces."""
    pieces, i = [], 0
    while i < len(template):
        start = template.find("{", i)
        if start < 0:
            pieces.append(("text", template[i:]))
            break
        if start > i:
            pieces.append(("text", template[i:start]))
        j, quote = start + 1, None
        while j < len(template):
            c = template[j]
            if quote:
                if c == "\\":
                    j += 1
                elif c == quote:
                    quote = None
            elif c in "\"'":
                quote = c
            elif c == "}":
                break
            j += 1
        if j >= len(template):
            raise JsonPathError(f"unclosed action in {template!r}: a '{{' at column {start + 1} has no '}}'")
        pieces.append(("action", template[start + 1:j].strip()))
        i = j + 1
    return pieces


def parse(template: str) -> tuple[Any, ...]:
    nodes: list[list[Any]] = [[]]
    ranges: list[Path] = []
    for kind, value in _actions(template):
        if kind == "text":
            nodes[-1].append(Text(value))
        elif value == "end":
            if not ranges:
                raise JsonPathError(f"{template!r}: {{end}} without a matching {{range}}")
            body = tuple(nodes.pop())
            nodes[-1].append(Range(ranges.pop(), body))
        elif value.startswith("range ") or value == "range":
            ranges.append(parse_path(value[len("range"):].strip()))
            nodes.append([])
        elif value[:1] in "\"'" and len(value) >= 2 and value[-1] == value[0]:
            nodes[-1].append(Text(_unquote(value)))
        else:
            nodes[-1].append(Action(parse_path(value)))
    if ranges:
        raise JsonPathError(f"{template!r}: {{range}} without a matching {{end}}")
    return tuple(nodes[0])


def parse_path(text: str) -> Path:
    if not text:
        raise JsonPathError("empty JSONPath expression")
    root, i = "@", 0
    if text[0] in "$@":
        root, i = ("$" if text[0] == "$" else "@"), 1
    elif text[0] not in ".[":
        raise JsonPathError(f"unrecognized identifier {text!r}: a path starts with '.', '[', '$' or '@'")
    steps: list[tuple[str, Any]] = []
    while i < len(text):
        if text.startswith("..", i):
            j = i + 2
            while j < len(text) and text[j] not in ".[":
                j += 1
            steps.append(("descend", text[i + 2:j]))
            i = j
        elif text[i] == ".":
            j = i + 1
            while j < len(text) and (text[j] not in ".[" or text[j - 1] == "\\"):
                j += 1
            name = text[i + 1:j].replace("\\.", ".")
            if name:
                steps.append(("wild", None) if name == "*" else ("field", name))
            i = j
        elif text[i] == "[":
            j, depth = i + 1, 1
            while j < len(text) and depth:
                depth += {"[": 1, "]": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise JsonPathError(f"unterminated array in {text!r}")
            steps.append(_bracket(text[i + 1:j - 1].strip(), text))
            i = j
        else:
            raise JsonPathError(f"invalid character {text[i]!r} at column {i + 1} of {text!r}")
    return Path(root, tuple(steps))


def _bracket(inner: str, text: str) -> tuple[str, Any]:
    if inner == "*":
        return ("wild", None)
    if inner.startswith("?"):
        match = re.fullmatch(r"\?\((.*)\)", inner)
        if not match:
            raise JsonPathError(f"invalid filter {inner!r} in {text!r}: write [?(@.field==\"value\")]")
        condition = match.group(1)
        compared = _FILTER.match(condition)
        if compared is None:
            if re.search(r"[=!<>]", condition):
                raise JsonPathError(f"invalid filter {inner!r} in {text!r}: a comparison needs a value on each side")
            return ("filter", (parse_path(condition.strip()), None, None))
        left, op, right = compared.groups()
        return ("filter", (parse_path(left), op, _literal(right, text)))
    if inner[:1] in "\"'":
        return ("field", _unquote(inner))
    if ":" in inner:
        try:
            parts = [int(p) if p.strip() else None for p in inner.split(":")]
        except ValueError:
            raise JsonPathError(f"invalid array slice [{inner}] in {text!r}") from None
        return ("slice", tuple(parts + [None] * (3 - len(parts)))[:3])
    try:
        return ("index", int(inner))
    except ValueError:
        raise JsonPathError(f"invalid array index [{inner}] in {text!r}") from None


def _literal(text: str, template: str) -> Any:
    if text[:1] in "\"'" and text[-1:] == text[:1] and len(text) >= 2:
        return _unquote(text)
    if text.startswith("@") or text.startswith("$"):
        return parse_path(text)
    try:
        return json.loads(text)
    except ValueError:
        raise JsonPathError(f"invalid value {text!r} in the filter of {template!r}") from None


def _step(values: list[Any], step: tuple[str, Any], root: Any) -> list[Any]:
    kind, arg = step
    out: list[Any] = []
    for value in values:
        if kind == "field":
            if isinstance(value, dict) and arg in value:
                out.append(value[arg])
        elif kind == "wild":
            out.extend(value if isinstance(value, list) else value.values() if isinstance(value, dict) else [])
        elif kind == "descend":
            out.extend(_descend(value, arg))
        elif kind == "index":
            if isinstance(value, list):
                if not -len(value) <= arg < len(value):
                    raise JsonPathError(f"array index out of bounds: index {arg}, length {len(value)}")
                out.append(value[arg])
        elif kind == "slice":
            if isinstance(value, list):
                out.extend(value[slice(*arg)])
        elif kind == "filter":
            items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
            out.extend(item for item in items if _matches(item, arg, root))
    return out


def _descend(value: Any, name: str) -> list[Any]:
    found: list[Any] = []
    if isinstance(value, dict):
        if name in value:
            found.append(value[name])
        for child in value.values():
            found.extend(_descend(child, name))
    elif isinstance(value, list):
        for child in value:
            found.extend(_descend(child, name))
    return found


def _matches(item: Any, condition: tuple[Path, str | None, Any], root: Any) -> bool:
    path, op, right = condition
    lefts = evaluate(path, item, root)
    if op is None:
        return bool(lefts)
    rights = evaluate(right, item, root) if isinstance(right, Path) else [right]
    for left in lefts:
        for value in rights:
            try:
                if {"==": left == value, "!=": left != value}.get(op) if op in ("==", "!=") else \
                        {"<": left < value, ">": left > value, "<=": left <= value, ">=": left >= value}[op]:
                    return True
            except TypeError:
                continue
    return False


def evaluate(path: Path, current: Any, root: Any) -> list[Any]:
    values = [root if path.root == "$" else current]
    for step in path.steps:
        values = _step(values, step, root)
    return values


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # as Go's encoder


def render(template: str, document: Any) -> str:
    """The template's text for ``document`` (an object, or a List of them)."""
    out: list[str] = []

    def run(nodes: tuple[Any, ...], current: Any) -> None:
        for node in nodes:
            if isinstance(node, Text):
                out.append(node.text)
            elif isinstance(node, Action):
                out.append(" ".join(_format(v) for v in evaluate(node.path, current, document)))
            else:
                for item in evaluate(node.path, current, document):
                    run(node.body, item)

    run(parse(template), document)
    return "".join(out)
