"""The one HTTP client (exo_ctl.http) and the one stream reader (exo_ctl.sse): framing, errors, cut streams."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exo_ctl import sse
from exo_ctl.http import HttpError, ConnectionFailed, HttpClient


def lines(text: str) -> list[bytes]:
    return [line.encode() for line in text.splitlines(keepends=True)]


# --- the SSE reader ---------------------------------------------------------------------------

def test_multi_line_data_is_joined_with_newlines_and_comments_are_skipped():
    stream = lines(": keep-alive\n\nevent: delta\nid: 7\ndata: first\ndata:second\n\n: ping\ndata: {\"a\": 1}\n\n")
    assert list(sse.events(stream)) == [sse.ServerSentEvent("first\nsecond", "delta", "7"), sse.ServerSentEvent('{"a": 1}', "message", "7")]


def test_crlf_line_endings_frame_events_like_lf():
    assert list(sse.events(lines('data: {"x": 1}\r\n\r\ndata: [DONE]\r\n\r\n'))) == [
        sse.ServerSentEvent('{"x": 1}'), sse.ServerSentEvent("[DONE]")]


def test_data_yields_json_payloads_and_stops_at_done():
    stream = lines('data: {"n": 1}\n\n: comment\n\ndata: {"n": 2}\n\ndata: [DONE]\n\ndata: {"n": 3}\n\n')
    assert list(sse.data(stream)) == [{"n": 1}, {"n": 2}]


def test_a_payload_with_an_error_object_raises_api_error_with_its_message():
    stream = lines('data: {"n": 1}\n\ndata: {"error": {"message": "the node is shutting down", '
                   '"type": "server_shutdown", "param": null, "code": 503}}\n\ndata: [DONE]\n\n')
    reader = sse.data(stream)
    assert next(reader) == {"n": 1}
    with pytest.raises(HttpError) as raised:
        next(reader)
    assert (raised.value.code, raised.value.reason, raised.value.message) == (
        503, "server_shutdown", "the node is shutting down")


def test_an_error_event_raises_even_without_an_error_key():
    with pytest.raises(HttpError, match="overloaded"):
        list(sse.data(lines('event: error\ndata: {"type": "overloaded_error", "message": "overloaded"}\n\n')))


def test_errors_can_be_yielded_instead_of_raised():
    stream = lines('data: {"error": {"message": "gone"}}\n\n')
    assert list(sse.data(stream, until_done=False, raise_errors=False)) == [{"error": {"message": "gone"}}]


def test_a_stream_cut_before_done_raises_stream_cut_and_drops_the_partial_event():
    reader = sse.data(lines('data: {"n": 1}\n\ndata: {"n": 2'))
    assert next(reader) == {"n": 1}
    with pytest.raises(sse.StreamCut, match=r"before data: \[DONE\]"):
        next(reader)
    assert list(sse.data(lines('data: {"n": 1}\n\n'), until_done=False)) == [{"n": 1}]


def test_an_event_that_is_not_json_is_a_bad_response():
    with pytest.raises(HttpError, match="not JSON"):
        list(sse.data(lines("data: hello\n\n")))


def test_json_lines_reads_one_document_per_line_and_skips_blank_keepalives():
    assert list(sse.json_lines(lines('{"type": "ADDED"}\n\n \n{"type": "DELETED"}\n'))) == [
        {"type": "ADDED"}, {"type": "DELETED"}]
    with pytest.raises(HttpError, match="not JSON"):
        list(sse.json_lines(lines("{broken\n")))


# --- the client, against a real HTTP server ---------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, str | None, int]] = []

    def log_message(self, *args: object) -> None:
        pass

    def answer(self, code: int, body: bytes, content_type: str = "application/json", **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        Handler.seen.append((self.command, self.path, self.headers.get("Authorization"), self.client_address[1]))
        if self.path == "/status":
            self.answer(409, json.dumps({"kind": "Status", "code": 409, "reason": "Conflict", "message": "taken",
                                         "details": {"causes": [{"field": "metadata.name", "message": "exists"}]}}).encode())
        elif self.path == "/openai":
            self.answer(400, json.dumps({"error": {"message": "max_tokens: must be at least 1", "type":
                                                   "invalid_request_error", "param": "max_tokens", "code": None}}).encode())
        elif self.path == "/busy":
            self.answer(429, b"too many requests\nsecond line", "text/plain", Retry_After="3")
        elif self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b': ping\n\ndata: {"n": 1}\n\ndata: {"n"')
            self.wfile.flush()
            self.close_connection = True  # the server dies mid-answer
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"type": "ADDED"}\n')
            self.wfile.flush()
            time.sleep(1.0)
            self.close_connection = True
        else:
            self.answer(200, json.dumps({"path": self.path}).encode())
            if self.path == "/hang-up":
                self.close_connection = True  # without saying so: the client believes it kept alive


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_status_answer_becomes_api_error_with_its_causes(server):
    with pytest.raises(HttpError) as raised:
        HttpClient(server).request_json("GET", "/status")
    assert (raised.value.code, raised.value.reason, [str(c) for c in raised.value.causes]) == (
        409, "Conflict", ["metadata.name: exists"])


def test_an_openai_error_body_becomes_api_error_naming_the_param(server):
    with pytest.raises(HttpError) as raised:
        HttpClient(server).request_json("GET", "/openai")
    assert (raised.value.code, raised.value.reason, raised.value.message) == (
        400, "invalid_request_error", "max_tokens: must be at least 1")
    assert [c.field for c in raised.value.causes] == ["max_tokens"]


def test_a_text_error_keeps_its_first_line_and_retry_after(server):
    with pytest.raises(HttpError) as raised:
        HttpClient(server).request_json("GET", "/busy")
    assert (raised.value.code, raised.value.message, raised.value.retry_after) == (429, "too many requests", 3.0)
    answer = HttpClient(server).open("GET", "/busy", check=False)
    assert (answer.status, answer.read()) == (429, b"too many requests\nsecond line")


def test_the_token_and_query_are_sent_and_keep_alive_reuses_one_connection(server):
    client = HttpClient(server, token="t0k", keep_alive=True)
    assert client.request_json("GET", "/a b", query={"labelSelector": "app=x"})[0] == {"path": "/a%20b?labelSelector=app%3Dx"}
    client.request_json("GET", "/again")
    client.close()
    assert [s[2] for s in Handler.seen] == ["Bearer t0k"] * 2
    assert Handler.seen[0][3] == Handler.seen[1][3]  # the same client port: one connection
    HttpClient(server).request_json("GET", "/fresh")
    assert Handler.seen[2][3] != Handler.seen[1][3]


def test_a_stream_the_server_cuts_raises_stream_cut_after_the_events_it_sent(server):
    got = []
    with pytest.raises(sse.StreamCut):
        for payload in sse.data(HttpClient(server).open("GET", "/stream").lines()):
            got.append(payload)
    assert got == [{"n": 1}]


def test_reading_lines_past_the_deadline_raises_timeout_error(server):
    reader = sse.json_lines(HttpClient(server).open("GET", "/slow").lines(deadline=time.monotonic() + 0.3))
    assert next(reader) == {"type": "ADDED"}
    with pytest.raises(TimeoutError):
        next(reader)


def test_an_unreachable_server_is_connection_failed_which_is_a_connection_error():
    with pytest.raises(ConnectionFailed, match="connection refused") as raised:
        HttpClient("http://127.0.0.1:9", timeout=2).request_json("GET", "/")
    assert isinstance(raised.value, ConnectionError)


def test_a_kept_alive_connection_the_server_closed_is_replaced_by_a_fresh_one(server):
    client = HttpClient(server, keep_alive=True)
    client.request_json("GET", "/hang-up")
    time.sleep(0.1)
    assert client.request_json("GET", "/next")[0] == {"path": "/next"}
    assert [s[1] for s in Handler.seen] == ["/hang-up", "/next"] and Handler.seen[0][3] != Handler.seen[1][3]
