"""Errors of the OpenAI-compatible API (``/v1/...``) in OpenAI's own shape:
``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

OPENAI_PREFIX = "/v1"


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


class OpenAIError(Exception):
    """Raise from a /v1 handler to answer with an OpenAI error body and ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or error_type(status)
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def openai_error_response(status: int, message: str, *, code: str | None = None,
                          headers: Mapping[str, str] | None = None) -> web.Response:
    return OpenAIError(status, message, code=code, headers=headers).response()
