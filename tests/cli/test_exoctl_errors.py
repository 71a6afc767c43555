"""Every user mistake is one clear line on stderr and a non-zero exit, never a traceback (the
``exoctl`` fixture asserts the absence of tracebacks on every run)."""
from __future__ import annotations

import socket

from tests.cli.cli_helpers import deployment_yaml
from tests.cli.cli_helpers import TOKEN


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_server_is_one_line_naming_the_url(exoctl, exoctl_env):
    url = f"http://127.0.0.1:{_closed_port()}"
    result = exoctl("get", "md", env={**exoctl_env, "EXOCTL_SERVER": url})
    assert result.code == 1
    assert result.stderr == (f"error: cannot reach the exo API at {url} (connection refused) — is a node running? "
                             "set --server or EXOCTL_SERVER\n")


def test_a_wrong_token_is_unauthorized_with_a_hint(exoctl):
    result = exoctl("--token", "wrong", "get", "md")
    assert result.code == 1
    assert result.stderr.startswith("error: unauthorized — the API rejected the token; set --token or EXOCTL_TOKEN "
                                    "to a role token (exoctl token create): Unauthorized")


def test_unknown_types_and_bad_flags_are_one_line_errors(exoctl):
    unknown = exoctl("get", "pods")
    bad_flag = exoctl("get", "md", "--frobnicate")
    bad_output = exoctl("get", "md", "-o", "table")
    bad_timeout = exoctl("wait", "md/x", "--for=delete", "--timeout=soon")
    for result in (unknown, bad_flag, bad_output, bad_timeout):
        assert result.code != 0 and len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert 'resource type "pods"' in unknown.stderr
    assert "--frobnicate" in bad_flag.stderr and "'table'" in bad_output.stderr and "'soon'" in bad_timeout.stderr


def test_server_and_token_come_from_the_config_file_when_flags_and_env_are_absent(api, exoctl, exoctl_env, tmp_path):
    config = tmp_path / "config" / "exoctl" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(f"server: {api.url}\ntoken: {TOKEN}\n")
    env = {k: v for k, v in exoctl_env.items() if not k.startswith("EXOCTL_")}
    result = exoctl("apply", "-f", "-", input=deployment_yaml(), env=env)
    assert (result.code, result.stdout) == (0, "modeldeployment.exo.dev/llama created\n"), result.stderr


def test_flags_win_over_the_environment(api, exoctl, exoctl_env):
    env = {**exoctl_env, "EXOCTL_SERVER": f"http://127.0.0.1:{_closed_port()}"}
    result = exoctl("get", "md", "--server", api.url, env=env)
    assert result.code == 0, result.stderr


def test_a_namespace_conflict_between_manifest_and_flag_is_refused(api, exoctl):
    result = exoctl("apply", "-n", "prod", "-f", "-", input=deployment_yaml(namespace="dev"))
    assert result.code == 1 and "<stdin>:5: the namespace from the object" in result.stderr
    assert api.store.revision == 0


def test_a_request_the_server_rejects_prints_kubectls_error_from_server_line(exoctl):
    result = exoctl("get", "md", "-l", "app in")
    assert result.code == 1
    assert result.stderr.startswith("Error from server (BadRequest): query parameter labelSelector: ")
    assert len(result.stderr.splitlines()) == 1
