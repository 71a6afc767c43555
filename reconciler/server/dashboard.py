"""The web dashboard every node serves: static files at ``/`` and ``/dashboard/…``, and this node's
generated tokens/s as server-sent events at ``/internal/dashboard/v1/throughput``.

The page and its scripts are public (a browser cannot send a bearer token for ``<script src>``);
everything they show comes from the authenticated API. The throughput stream lives under
``/internal/`` so the app's auth middleware covers it like the rest of the API.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from reconciler.metrics import NodeMetrics
from reconciler.server.keys import NODE, WATCHES

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
THROUGHPUT_PATH = "/internal/dashboard/v1/throughput"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# Everything the page loads comes from this node; nothing inline, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DASHBOARD_FILES: web.AppKey[dict[str, "StaticFile"]] = web.AppKey("dashboard_files", dict)


@dataclass(frozen=True)
class StaticFile:
    path: Path
    content_type: str


def static_files(directory: Path = DASHBOARD_DIR) -> dict[str, StaticFile]:
    """The servable files: regular files directly in ``directory`` with a known type, by name.

    Requests are looked up in this table, never joined onto the file system, so no request path
    can reach outside the folder and no folder is ever listed."""
    files: dict[str, StaticFile] = {}
    for path in sorted(directory.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type and path.is_file() and not path.is_symlink() and not path.name.startswith("."):
            files[path.name] = StaticFile(path, content_type)
    if "index.html" not in files:
        raise FileNotFoundError(f"{directory}: the dashboard has no index.html")
    return files


def _file_response(file: StaticFile) -> web.Response:
    return web.Response(body=file.path.read_bytes(), headers={"Content-Type": file.content_type, **SECURITY_HEADERS})


async def index(request: web.Request) -> web.Response:
    return _file_response(request.app[DASHBOARD_FILES]["index.html"])


async def dashboard_file(request: web.Request) -> web.Response:
    file = request.app[DASHBOARD_FILES].get(request.match_info["name"])
    if file is None:
        raise web.HTTPNotFound(text="not found")
    return _file_response(file)


# --- throughput --------------------------------------------------------------------------------

def generated_totals(metrics: NodeMetrics) -> dict[str, float]:
    """Tokens generated so far on this node, per model (the ``exo_generated_tokens`` counter)."""
    totals: dict[str, float] = {}
    for family in metrics.generated_tokens.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                model = sample.labels.get("model", "")
                totals[model] = totals.get(model, 0.0) + sample.value
    return totals


def throughput(*, before: Mapping[str, float], after: Mapping[str, float], seconds: float) -> dict[str, float]:
    """Tokens per second per model between two readings of the counters (a model that appeared in
    between counts from zero; a counter never goes down, so a smaller reading counts as zero)."""
    if seconds <= 0:
        return {model: 0.0 for model in after}
    return {model: max(0.0, value - before.get(model, 0.0)) / seconds for model, value in after.items()}


def throughput_event(*, node: str, rates: Mapping[str, float], totals: Mapping[str, float]) -> bytes:
    """One SSE ``throughput`` event: total and per-model tokens/s, and tokens generated so far."""
    data = {
        "node": node,
        "tokensPerSecond": round(sum(rates.values()), 3),
        "models": {model: round(rate, 3) for model, rate in sorted(rates.items())},
        "generatedTokens": int(sum(totals.values())),
    }
    return f"event: throughput\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _throughput_handler(metrics: NodeMetrics, *, interval_s: float,
                        clock: Callable[[], float]) -> Callable[[web.Request], object]:
    async def stream(request: web.Request) -> web.StreamResponse:
        closing = request.config_dict[WATCHES].closing
        node = request.config_dict[NODE].name
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        before, then = generated_totals(metrics), clock()
        try:
            await response.write(f"retry: {int(interval_s * 1000) + 1000}\n".encode())
            await response.write(throughput_event(node=node, rates={m: 0.0 for m in before}, totals=before))
            while not closing.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(closing.wait(), timeout=interval_s)
                if closing.is_set():
                    break
                after, now = generated_totals(metrics), clock()
                rates = throughput(before=before, after=after, seconds=now - then)
                await response.write(throughput_event(node=node, rates=rates, totals=after))
                before, then = after, now
        except (ConnectionResetError, ConnectionError):
            pass  # the browser left; a write to its closed connection is how we notice
        return response
    return stream


def add_dashboard_routes(app: web.Application, *, metrics: NodeMetrics | None = None,
                         throughput_interval_s: float = 1.0,
                         clock: Callable[[], float] = time.monotonic) -> None:
    """Mount the dashboard on the node's app. Without ``metrics`` the page works but has no
    throughput stream (its path answers 404 and the page shows no figure)."""
    app[DASHBOARD_FILES] = static_files()
    app.router.add_get("/", index)
    app.router.add_get("/dashboard/{name}", dashboard_file)
    if metrics is not None:
        app.router.add_get(THROUGHPUT_PATH, _throughput_handler(metrics, interval_s=throughput_interval_s, clock=clock))
