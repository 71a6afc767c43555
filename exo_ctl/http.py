"""The one synchronous HTTP client of the codebase (standard library only): base URL, bearer
token, cluster-CA pinning, timeouts, JSON and streaming answers, and the decoding of error bodies
(Kubernetes ``Status``, OpenAI/Anthropic ``{"error": ...}``) into HttpError."""
from __future__ import annotations

import errno
import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from exo_ctl.api.status import REASONS
from exo_ctl.api.validation import Cause

DEFAULT_TIMEOUT = 30.0


class ClientConfigError(ValueError):
    """The server URL, token or config file is unusable."""


class ConnectionFailed(ConnectionError):
    """The API could not be reached (refused, unknown host, timeout, TLS); the message is one line."""


class HttpError(Exception):
    """The API answered with an error (a ``Status``, an OpenAI/Anthropic error body, or text)."""

    def __init__(self, code: int, reason: str, message: str, causes: list[Cause] | None = None):
        self.code, self.reason, self.message, self.causes = code, reason, message, causes or []
        self.retry_after: float | None = None
        super().__init__(f"{reason} ({code}): {message}")

    @classmethod
    def from_response(cls, code: int, body: bytes) -> "HttpError":
        reason = REASONS.get(code, "Unknown")
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            document = None
        if isinstance(document, dict) and isinstance(document.get("error"), dict):
            return cls.from_error_body(code, document["error"])
        if not isinstance(document, dict) or document.get("kind") != "Status":
            text = body.decode("utf-8", "replace").strip().splitlines()
            return cls(code, reason, text[0][:300] if text else f"HTTP {code}")
        details = document.get("details") or {}
        causes = [Cause(str(c.get("field") or ""), str(c.get("message") or ""), str(c.get("reason") or ""))
                  for c in details.get("causes") or [] if isinstance(c, dict)]
        return cls(int(document.get("code") or code), str(document.get("reason") or reason),
                   str(document.get("message") or f"HTTP {code}"), causes)

    @classmethod
    def from_error_body(cls, code: int, error: Mapping[str, Any]) -> "HttpError":
        """An OpenAI/Anthropic ``error`` object: ``{"message", "type", "param", "code"}``."""
        param = error.get("param")
        causes = [Cause(str(param), str(error.get("message") or ""), "")] if param else []
        return cls(code, str(error.get("type") or REASONS.get(code, "Unknown")),
                   str(error.get("message") or f"HTTP {code}"), causes)


def explain(error: BaseException, timeout: float | None) -> str:
    """A transport failure in a few words."""
    if isinstance(error, socket.gaierror):
        return "unknown host"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g}s" if timeout else "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, http.client.HTTPException):
        return f"bad HTTP answer: {type(error).__name__}"
    if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "host unreachable"
    return (getattr(error, "strerror", None) or str(error) or type(error).__name__).lower()


def pinned_context(ca: str) -> ssl.SSLContext:
    """Trusts the cluster CA and nothing else: a server with any other certificate is refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as error:
        raise ClientConfigError(f"ca: cannot load the cluster CA {ca}: {getattr(error, 'strerror', None) or error}") from None
    return context


def encode_body(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return body.encode() if isinstance(body, str) else json.dumps(body).encode()


class Response:
    """An answer whose body is read on demand: whole (``read``/``json``) or line by line (``lines``)."""

    def __init__(self, client: "HttpClient", connection: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, *, sock: socket.socket | None, timeout: float | None):
        self._client, self._connection, self._response, self._timeout = client, connection, response, timeout
        self._sock = sock  # http.client drops connection.sock when the answer is read until close
        self.status = response.status
        self.headers = dict(response.getheaders())

    def header(self, name: str) -> str | None:
        return self._response.getheader(name)

    def read(self) -> bytes:
        try:
            data = self._response.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise self._client.failed(error, self._timeout) from None
        self._client.release(self._connection, self._response)
        return data

    def json(self) -> Any:
        data = self.read()
        try:
            return json.loads(data) if data else {}
        except ValueError:
            raise HttpError(self.status, "BadResponse",
                           f"the server at {self._client.base_url} did not answer JSON") from None

    def lines(self, *, deadline: float | None = None, forever: bool = False) -> Iterator[bytes]:
        """The body's lines as they arrive. Past ``deadline`` (a ``time.monotonic()`` instant) it
        raises TimeoutError; ``forever``: no read timeout (a watch); a dropped connection is ConnectionFailed."""
        try:
            while True:
                sock = self._sock
                if deadline is not None and sock is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("no data in time")
                    sock.settimeout(remaining)
                elif forever and sock is not None:
                    sock.settimeout(None)
                try:
                    line = self._response.readline()
                except (socket.timeout, TimeoutError):
                    if deadline is None:
                        raise self._client.failed(TimeoutError(), self._timeout) from None
                    raise TimeoutError("no data in time") from None
                except (OSError, http.client.HTTPException) as error:
                    raise self._client.failed(error, self._timeout) from None
                if not line:
                    return
                yield line
        finally:
            self.close()

    def close(self) -> None:
        self._response.close()
        self._connection.close()

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class HttpClient:
    """Requests to one base URL. ``keep_alive`` reuses one connection between fully read answers
    (a benchmark's steady stream of requests); otherwise each request has its own connection."""

    def __init__(self, base_url: str, *, token: str | None = None, ca: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, keep_alive: bool = False, hint: str = "",
                 user_agent: str = "exoctl"):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientConfigError(f"invalid server URL {base_url!r} (expected http://HOST:PORT)")
        self.base_url, self.token, self.timeout, self.keep_alive = base_url.rstrip("/"), token, timeout, keep_alive
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._tls = pinned_context(ca) if self._https and ca else None
        self._hint, self._user_agent = hint, user_agent
        self._idle: http.client.HTTPConnection | None = None

    def failed(self, error: BaseException, timeout: float | None) -> ConnectionFailed:
        return ConnectionFailed(f"cannot reach the exo API at {self.base_url} ({explain(error, timeout)}){self._hint}")

    def _connection(self, timeout: float | None) -> tuple[http.client.HTTPConnection, bool]:
        if self._idle is not None:
            connection, self._idle = self._idle, None
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            return connection, True
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls), False
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout), False

    def release(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        if self.keep_alive and not response.will_close and self._idle is None:
            self._idle = connection
        else:
            connection.close()

    def open(self, method: str, path: str, *, query: Mapping[str, str] | str | None = None, body: Any = None,
             content_type: str | None = None, headers: Mapping[str, str] | None = None,
             timeout: float | None = None, check: bool = True) -> Response:
        """Send one request and return the answer unread. ``check``: an answer >= 400 raises HttpError
        (with ``retry_after`` from Retry-After); a failure to connect is always ConnectionFailed."""
        timeout = self.timeout if timeout is None else timeout
        payload = encode_body(body)
        sent = {"Accept": "application/json", "User-Agent": self._user_agent}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        if payload is not None:
            sent["Content-Type"] = content_type or "application/json"
        encoded = query if isinstance(query, str) else urlencode(query or {})  # a str: already encoded
        url = self._prefix + quote(path) + (f"?{encoded}" if encoded else "")
        while True:
            connection, reused = self._connection(timeout)
            try:
                connection.request(method, url, body=payload, headers={**sent, **(headers or {})})
                sock = connection.sock
                response = connection.getresponse()
                break
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                if not (reused and isinstance(error, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError))):
                    raise self.failed(error, timeout) from None
                # a kept-alive connection that the server had closed meanwhile: once more, on a fresh one
        answer = Response(self, connection, response, sock=sock, timeout=timeout)
        if check and answer.status >= 400:
            try:
                data = response.read()
            except (OSError, http.client.HTTPException):
                data = b""
            connection.close()
            error = HttpError.from_response(answer.status, data)
            error.retry_after = _seconds(answer.header("Retry-After"))
            raise error
        return answer

    def request_json(self, method: str, path: str, **options: Any) -> tuple[Any, dict[str, str]]:
        """One request; the decoded JSON answer and the response headers (errors raise, as ``open``)."""
        answer = self.open(method, path, **options)
        return answer.json(), answer.headers

    def close(self) -> None:
        if self._idle is not None:
            self._idle.close()
            self._idle = None


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
