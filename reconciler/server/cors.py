"""CORS: same-origin only, unless ``exo --cors-origin ORIGIN`` names browser origins that may call
the API. Other origins get no CORS headers (the browser keeps the answer from them) and their
preflights a 403; the token travels in the Authorization header, never in a cookie."""
from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp import web

from reconciler.server.errors import status_response

ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Accept, OpenAI-Organization, OpenAI-Project, X-Stainless-Lang"
MAX_AGE_S = "600"


def parse_origin(value: str) -> str:
    """``scheme://host[:port]`` exactly as browsers send it in ``Origin``; ValueError names the flag."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ValueError(f"--cors-origin: {value!r} is not an origin like https://app.example.com[:port]")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def cors_middleware(origins: Iterable[str]):
    allowed = frozenset(parse_origin(o) for o in origins)

    @web.middleware
    async def cors(request: web.Request, handler):
        origin = request.headers.get("Origin")
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        if origin is None or origin not in allowed:
            if preflight and origin is not None:
                return status_response(403, f"origin {origin} may not call this API (exo --cors-origin allows one)")
            return await handler(request)
        if preflight:
            response: web.StreamResponse = web.Response(status=204)
            response.headers.update({"Access-Control-Allow-Methods": ALLOWED_METHODS,
                                     "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                                     "Access-Control-Max-Age": MAX_AGE_S})
        else:
            try:
                response = await handler(request)
            except web.HTTPException as error:
                error.headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin"})
                raise
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")
        return response

    return cors
