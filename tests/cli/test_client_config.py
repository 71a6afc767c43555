"""Which server and token exoctl uses, the config file, and parsing Status errors."""
from __future__ import annotations

import json
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exo_ctl.api.resources import KINDS
from exo_ctl.client import (DEFAULT_SERVER, OP_ID_HEADER, HttpError, Client, ClientConfigError, config_path, load_config,
                            save_config)


def test_flags_beat_environment_which_beats_the_config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("server: http://file:1\ntoken: from-file\n")
    env = {"EXOCTL_SERVER": "http://env:2", "EXOCTL_TOKEN": "from-env"}
    assert load_config(server="http://flag:3", env=env, path=path).server == "http://flag:3"
    assert load_config(env=env, path=path).token == "from-env"
    from_file = load_config(env={}, path=path)
    assert (from_file.server, from_file.token, from_file.sources["token"]) == ("http://file:1", "from-file", str(path))


def test_without_anything_the_default_server_is_used(tmp_path):
    config = load_config(env={}, path=tmp_path / "absent.yaml")
    assert (config.server, config.token) == (DEFAULT_SERVER, None)


def test_the_config_file_lives_under_xdg_config_home_or_dot_config():
    assert str(config_path({"XDG_CONFIG_HOME": "/x"})) == "/x/exoctl/config.yaml"
    assert str(config_path({"HOME": "/home/u"})) == "/home/u/.config/exoctl/config.yaml"


def test_save_config_writes_a_private_file_that_load_config_reads_back(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    path = save_config(server="127.0.0.1:52415", token="s3cret", env=env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load_config(env=env)
    assert (config.server, config.token) == ("http://127.0.0.1:52415", "s3cret")


@pytest.mark.parametrize(("content", "message"), [
    ("server: [1\n", "invalid YAML"), ("- a\n", "must be a mapping"), ("token: 5\n", "token must be a string"),
])
def test_a_broken_config_file_is_a_clear_error_naming_it(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ClientConfigError, match=message) as caught:
        load_config(env={}, path=path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("server", ["ftp://host:1", "http://host:notaport", "http://", "http://h:1/?q=1"])
def test_a_server_that_is_not_an_http_url_is_refused(server, tmp_path):
    with pytest.raises(ClientConfigError, match="server URL"):
        load_config(server=server, env={}, path=tmp_path / "none.yaml")


def test_status_bodies_become_api_errors_with_causes():
    body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422, "reason": "Invalid",
                       "message": 'ModelDeployment "x" is invalid',
                       "details": {"causes": [{"field": "spec.replicas", "message": "too big", "reason": "FieldValueInvalid"}]}})
    error = HttpError.from_response(422, body.encode())
    assert (error.code, error.reason, str(error.causes[0])) == (422, "Invalid", "spec.replicas: too big")
    plain = HttpError.from_response(502, b"Bad Gateway\nfrom a proxy")
    assert (plain.code, plain.message) == (502, "Bad Gateway")


class _FlakyApi(BaseHTTPRequestHandler):
    """Answers the first write with 504 (outcome unknown), then succeeds; records op ids."""

    op_ids: list[str] = []

    def do_PATCH(self) -> None:  # noqa: N802 — http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).op_ids.append(self.headers.get(OP_ID_HEADER, ""))
        code = 504 if len(self.op_ids) == 1 else 200
        body = json.dumps({"kind": "Status", "code": 504, "reason": "Timeout", "message": "unknown"} if code == 504
                          else {"kind": "ModelDeployment", "metadata": {"name": "x"}}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code == 200:
            self.send_header("X-Exo-Apply-Result", "created")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        return None


def test_a_write_with_unknown_outcome_is_retried_with_the_same_op_id(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = load_config(server=f"http://127.0.0.1:{server.server_address[1]}", env={}, path=tmp_path / "n.yaml")
        obj = {"kind": "ModelDeployment", "metadata": {"name": "x", "namespace": "default"}}
        answer, action = Client(config, sleep=lambda s: None).apply(KINDS["ModelDeployment"], obj)
    finally:
        server.shutdown()
        server.server_close()
    assert (answer["metadata"]["name"], action) == ("x", "created")
    assert len(_FlakyApi.op_ids) == 2 and _FlakyApi.op_ids[0] == _FlakyApi.op_ids[1] != ""
