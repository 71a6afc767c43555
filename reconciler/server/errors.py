"""API errors as Kubernetes ``Status`` responses."""
from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from exo_ctl.api.status import status_object
from exo_ctl.api.validation import Cause, InvalidObject


class ApiError(Exception):
    """Raise from any handler to answer with a ``Status`` body; the app's middleware renders it."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, kind: str | None = None,
                 name: str | None = None, causes: list[Cause] | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason
        self.kind, self.name, self.causes = kind, name, causes
        self.headers = dict(headers or {})

    @classmethod
    def invalid(cls, error: InvalidObject) -> "ApiError":
        return cls(422, error.describe(), kind=error.kind, name=error.name, causes=error.causes)

    def response(self) -> web.Response:
        return status_response(self.code, self.message, reason=self.reason, kind=self.kind, name=self.name,
                               causes=self.causes, headers=self.headers)


def status_response(code: int, message: str, *, reason: str | None = None, kind: str | None = None,
                    name: str | None = None, causes: list[Cause] | None = None,
                    headers: Mapping[str, str] | None = None) -> web.Response:
    body = status_object(code, message, reason=reason, kind=kind, name=name, causes=causes)
    return web.json_response(body, status=code, headers=dict(headers or {}))
