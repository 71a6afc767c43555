"""A loopback HTTP server in the Hugging Face hub's layout, serving local model directories, so the
real ``huggingface_hub`` code runs in tests with ``HF_ENDPOINT=hub.endpoint`` and no hub reachable.

What it answers is what huggingface_hub 2.4.0 asks for model repositories:

- ``GET /api/models/{repo}[/revision/{rev}]`` (``HfApi.model_info``; ``?blobs=True`` adds each
  file's size, git blob id and, for LFS files, ``lfs: {size, sha256, pointerSize}``);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (``get_hf_file_metadata``, ``hf_hub_download``,
  ``parse_safetensors_file_metadata`` and plain ranged reads): ``X-Repo-Commit``, ``ETag`` (git
  sha1, or the sha256 for LFS files with ``X-Linked-Etag``/``X-Linked-Size``), ``Content-Length``,
  ``Accept-Ranges``; a single ``Range`` gives 206 with ``Content-Range``, an unsatisfiable one 416.
  LFS files (safetensors and the like) answer 302 with those headers and a ``Location`` on another
  host name (``localhost``, standing in for the hub's CDN), as the hub does, so clients follow a
  redirect that drops the token; ``/cdn/...`` serves the bytes.

Errors carry the hub's ``X-Error-Code`` so huggingface_hub raises its own exceptions: an unknown
repository is 404 ``RepoNotFound``, an unknown revision 404 ``RevisionNotFound``, an unknown file
404 ``EntryNotFound``; a private repository asked without ``Authorization: Bearer <token>`` is 401
(as the hub answers for private and gated repositories). The revision is ``main`` or the repo's
commit sha. ``served_bytes[(repo, file)]`` counts the body bytes sent (``bytes_served(repo)`` sums
a repo's), ``requests`` lists every request. It is a real socket server (a thread here), so node
processes pointed at ``endpoint`` use it too. ``isolate_hub_env`` points this process's
huggingface_hub at it.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".model")  # stored in LFS, as on the hub
LFS_MIN_BYTES = 10 << 20  # and any file this big
_CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}  # (path, size, mtime) → (git sha1, sha256)


def _digests(path: Path) -> tuple[str, str]:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        git_sha1, sha256 = hashlib.sha1(b"blob %d\0" % stat.st_size), hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK * 8):
                git_sha1.update(chunk)
                sha256.update(chunk)
        _DIGESTS[key] = (git_sha1.hexdigest(), sha256.hexdigest())
    return _DIGESTS[key]


class Request(NamedTuple):
    method: str
    path: str
    range: str | None
    authorized: bool  # sent an Authorization header


class _RepoFile:
    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self.size = path.stat().st_size
        self.lfs = name.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_BYTES
        self.git_sha1, sha256 = _digests(path)
        self.sha256 = sha256 if self.lfs else None

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_sha1

    def sibling(self, *, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": self.name}
        entry = {"rfilename": self.name, "size": self.size, "blobId": self.git_sha1}
        if self.lfs:
            entry["lfs"] = {"size": self.size, "sha256": self.sha256, "pointerSize": 134}
        return entry


class _Repo:
    def __init__(self, repo: str, root: Path) -> None:
        files = sorted(p for p in Path(root).rglob("*") if p.is_file())
        self.files = {p.relative_to(root).as_posix(): _RepoFile(p, p.relative_to(root).as_posix()) for p in files}
        listing = "\n".join(f"{name} {f.etag}" for name, f in self.files.items())
        self.commit = hashlib.sha1(f"{repo}\n{listing}".encode()).hexdigest()


class FakeHub:
    """``with FakeHub({"org/tiny": path}) as hub:`` → ``hub.endpoint`` serves ``hf://org/tiny``."""

    def __init__(self, repos: dict[str, Path], *, private: set[str] | frozenset[str] = frozenset(),
                 token: str = "hf_test") -> None:
        self.token = token
        self.private = set(private)
        self.repos = {repo: _Repo(repo, Path(path)) for repo, path in repos.items()}
        self.served_bytes: dict[tuple[str, str], int] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def commit(self, repo: str) -> str:
        return self.repos[repo].commit

    def bytes_served(self, repo: str) -> int:
        with self._lock:
            return sum(n for (r, _), n in self.served_bytes.items() if r == repo)

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:  # kept-alive connections end too: the hub is gone
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- used by the handler --------------------------------------------------------------------

    def _count(self, repo: str, file: str, n: int) -> None:
        with self._lock:
            self.served_bytes[(repo, file)] = self.served_bytes.get((repo, file), 0) + n

    def _track(self, connection: socket.socket, *, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(connection)


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects

    def setup(self) -> None:
        super().setup()
        self.fake._track(self.connection, open_=True)

    def finish(self) -> None:
        self.fake._track(self.connection, open_=False)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read served_bytes
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        url = urlsplit(self.path)
        with self.fake._lock:
            self.fake.requests.append(Request(self.command, url.path, self.headers.get("Range"),
                                              "Authorization" in self.headers))
        try:
            if url.path.startswith("/api/models/"):
                self._model_info(unquote(url.path[len("/api/models/"):]), query=parse_qs(url.query), body=body)
            elif url.path.startswith("/cdn/"):  # where LFS files redirect to, as the hub's CDN
                repo, _, file = url.path[len("/cdn/"):].partition("/-/")
                self._cdn(unquote(repo), unquote(file), body=body)
            elif "/resolve/" in url.path:
                repo, _, rest = url.path.lstrip("/").partition("/resolve/")
                revision, _, file = rest.partition("/")
                self._resolve(unquote(repo), unquote(revision), unquote(file), body=body)
            else:
                raise _HubError(404, None, "Not Found")
        except _HubError as error:
            self._error(error, body=body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _repo(self, repo: str, revision: str | None) -> _Repo:
        if repo not in self.fake.repos:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if repo in self.fake.private:
            authorization = self.headers.get("Authorization")
            if authorization is None:
                raise _HubError(401, "RepoNotFound", "Invalid username or password.")
            if authorization != f"Bearer {self.fake.token}":
                raise _HubError(401, None, "Invalid credentials in Authorization header")
        found = self.fake.repos[repo]
        if revision not in (None, "main", found.commit):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return found

    def _model_info(self, path: str, *, query: dict[str, list[str]], body: bool) -> None:
        repo, _, revision = path.partition("/revision/")
        found = self._repo(repo, unquote(revision) if revision else None)
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        info = {"_id": found.commit[:24], "id": repo, "modelId": repo, "sha": found.commit,
                "private": repo in self.fake.private, "gated": False, "disabled": False, "tags": [],
                "siblings": [f.sibling(blobs=blobs) for f in found.files.values()]}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=body)

    def _resolve(self, repo: str, revision: str, file: str, *, body: bool) -> None:
        found = self._repo(repo, revision)
        entry = found.files.get(file)
        if entry is None:
            raise _HubError(404, "EntryNotFound", f"{file} does not exist on \"{revision}\"", commit=found.commit)
        headers = {"X-Repo-Commit": found.commit, "ETag": f'"{entry.etag}"'}
        if entry.lfs:  # the hub answers LFS files with a redirect to its CDN (another host, no token sent there)
            port = self.server.server_address[1]
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size),
                        "Location": f"http://localhost:{port}/cdn/{quote(repo)}/-/{quote(file)}"}
            self._send(302, b"", headers, body=body)
            return
        self._file(repo, entry, headers, body=body)

    def _cdn(self, repo: str, file: str, *, body: bool) -> None:
        found = self.fake.repos.get(repo)
        entry = found.files.get(file) if found is not None else None
        if entry is None:
            raise _HubError(404, None, "Not Found")
        self._file(repo, entry, {"ETag": f'"{entry.etag}"'}, body=body)

    def _file(self, repo: str, entry: _RepoFile, headers: dict[str, str], *, body: bool) -> None:
        file = entry.name
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, end, status = 0, entry.size, 200
        if (wanted := self.headers.get("Range")) is not None:
            span = _parse_range(wanted, entry.size)
            if span is None:
                raise _HubError(416, None, f"Range {wanted} not satisfiable")
            start, end, status = *span, 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        headers["Content-Length"] = str(end - start)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        with open(entry.path, "rb") as handle:
            handle.seek(start)
            left = end - start
            while left > 0:
                chunk = handle.read(min(_CHUNK, left))
                if not chunk:
                    break
                self.fake._count(repo, file, len(chunk))  # before the write: the client may be done first
                try:
                    self.wfile.write(chunk)
                except OSError:
                    self.fake._count(repo, file, -len(chunk))
                    raise
                left -= len(chunk)

    def _error(self, error: _HubError, *, body: bool) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self._send(error.status, json.dumps({"error": error.message}).encode(), headers, body=body)

    def _send(self, status: int, payload: bytes, headers: dict[str, str], *, body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)


def isolate_hub_env(monkeypatch: Any, *, home: Path, endpoint: str | None) -> None:
    """Point this process's huggingface_hub at ``endpoint`` with a fresh ``HF_HOME`` and no token,
    whatever the machine or earlier tests left: huggingface_hub reads some switches once, at
    import (an earlier test with HF_HUB_OFFLINE=1 would otherwise block every request)."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE",
                 "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(Path(home) / "token"))  # no saved login leaks in
    if endpoint is not None:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range, clamped to the file."""
    match = _RANGE.match(header.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), size if last == "" else min(size, int(last) + 1)
    return (start, end) if start < end else None
