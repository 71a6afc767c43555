"""Reading the queries out of grafana/dashboards/*.json, as Grafana would run them."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRAFANA_DIR = Path(__file__).resolve().parents[2] / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
# Grafana's built-in interval variables, as Prometheus durations long enough for a short test run
# scraped every second (rate() needs two samples in its window).
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<metric>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")
_METRIC = re.compile(r"\b(exo_[a-zA-Z0-9_]+)\b")


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    expr: str          # as written in the dashboard
    promql: str        # with Grafana's variables substituted

    def where(self) -> str:
        return f"{self.dashboard} / {self.panel!r}: {self.expr}"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace ``$var``, ``${var}`` and ``[[var]]`` by their values; an unknown name is an error."""
    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in variables:
            raise KeyError(f"query uses ${name}, which the dashboard does not define: {expr}")
        return variables[name]
    return _VARIABLE.sub(value, expr)


def variable_query(query: Any) -> str:
    """A template variable's query as PromQL: ``label_values(m, l)`` → ``count by (l) (m)``."""
    text = query["query"] if isinstance(query, dict) else query
    match = _LABEL_VALUES.match(text)
    if not match:
        return text
    metric = match["metric"] or f'{{{match["label"]}!=""}}'
    return f"count by ({match['label']}) ({metric})"


def queries(path: Path) -> Iterator[Query]:
    """Every query of every panel (rows included) and every template variable, with variables
    set to "All" (their allValue, or .* when there is none)."""
    board = load(path)
    name = board.get("title", path.name)
    variables = dict(BUILTIN_VARIABLES)
    for variable in board.get("templating", {}).get("list", []):
        variables[variable["name"]] = variable.get("allValue") or ".*"
        if variable.get("type") == "query":
            expr = variable_query(variable["query"])
            yield Query(name, f"variable {variable['name']}", expr, substitute(expr, variables))
    for panel in panels(board):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield Query(name, panel.get("title", "?"), target["expr"], substitute(target["expr"], variables))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))
