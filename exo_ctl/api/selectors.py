"""Kubernetes label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``,
``a notin (x)``, joined by commas (all must hold). Pure parsing and matching."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from exo_ctl.api.meta import LABEL_KEY, LABEL_VALUE

Operator = Literal["=", "!=", "in", "notin", "exists", "!exists"]
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")
_VALUE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class SelectorError(ValueError):
    """A label selector that does not parse; the message says where and why."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "exists":
            return present
        if self.operator == "!exists":
            return not present
        if self.operator in ("=", "in"):
            return present and labels[self.key] in self.values
        # "!=" and "notin" also match objects without the label, as in Kubernetes.
        return not present or labels[self.key] not in self.values


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    @property
    def is_empty(self) -> bool:
        return not self.requirements


class _Scanner:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, problem: str) -> SelectorError:
        return SelectorError(f"invalid label selector {self.text!r}: {problem} at position {self.pos}")

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_spaces()
        return self.pos >= len(self.text)

    def peek(self, literal: str) -> bool:
        self.skip_spaces()
        return self.text.startswith(literal, self.pos)

    def take(self, literal: str) -> bool:
        if self.peek(literal):
            self.pos += len(literal)
            return True
        return False

    def word(self, allowed: frozenset[str]) -> str:
        self.skip_spaces()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in allowed:
            self.pos += 1
        return self.text[start:self.pos]


def _key(scanner: _Scanner) -> str:
    key = scanner.word(_KEY_CHARS)
    if not key:
        raise scanner.fail("expected a label key")
    if len(key) > 316 or not LABEL_KEY.match(key):
        raise scanner.fail(f"{key!r} is not a valid label key")
    return key


def _value(scanner: _Scanner) -> str:
    value = scanner.word(_VALUE_CHARS)
    if len(value) > 63 or not LABEL_VALUE.match(value):
        raise scanner.fail(f"{value!r} is not a valid label value")
    return value


def _value_set(scanner: _Scanner, operator: str) -> frozenset[str]:
    if not scanner.take("("):
        raise scanner.fail(f'expected "(" after "{operator}"')
    values = [_value(scanner)]
    while scanner.take(","):
        values.append(_value(scanner))
    if not scanner.take(")"):
        raise scanner.fail('expected "," or ")" in a value list')
    return frozenset(values)


def _set_operator(scanner: _Scanner) -> str | None:
    """``in`` or ``notin`` when the next word is one of them (followed by a space or "(")."""
    scanner.skip_spaces()
    for word in ("notin", "in"):
        end = scanner.pos + len(word)
        if scanner.text.startswith(word, scanner.pos) and (end == len(scanner.text) or scanner.text[end] in " \t("):
            scanner.pos = end
            return word
    return None


def _requirement(scanner: _Scanner) -> Requirement:
    if scanner.take("!"):
        return Requirement(_key(scanner), "!exists")
    key = _key(scanner)
    if scanner.at_end() or scanner.peek(","):
        return Requirement(key, "exists")
    if scanner.take("!="):
        return Requirement(key, "!=", frozenset([_value(scanner)]))
    if scanner.take("==") or scanner.take("="):
        return Requirement(key, "=", frozenset([_value(scanner)]))
    operator = _set_operator(scanner)
    if operator is None:
        raise scanner.fail(f'expected "=", "==", "!=", "in" or "notin" after {key!r}')
    return Requirement(key, operator, _value_set(scanner, operator))  # type: ignore[arg-type]


def parse_selector(text: str | None) -> Selector:
    """Parse a label selector; an empty or missing one selects everything."""
    scanner = _Scanner(text or "")
    if scanner.at_end():
        return Selector()
    requirements = [_requirement(scanner)]
    while not scanner.at_end():
        if not scanner.take(","):
            raise scanner.fail('expected "," between requirements')
        requirements.append(_requirement(scanner))
    return Selector(tuple(requirements))
