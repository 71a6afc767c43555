"""exoctl get events, the Events section of describe, and config kubeconfig."""
from __future__ import annotations

import base64

import yaml

from reconciler.server.events import write_event
from tests.cli.cli_helpers import TOKEN, deployment_yaml


def test_get_events_and_describe_show_recorded_events(api, exoctl):
    assert exoctl("get", "events").stderr.strip() == "No events found in default namespace."
    exoctl("apply", "-f", "-", input=deployment_yaml())
    live = api.get("ModelDeployment", "llama", namespace="default")
    for _ in range(2):
        api.call(write_event(api.store, live, reason="Unschedulable", type_="Warning", message="no node fits",
                             component="scheduler"))
    header, row = exoctl("get", "events").stdout.splitlines()
    assert header.split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert row.split()[1:4] == ["Warning", "Unschedulable", "modeldeployment/llama"]
    assert "COUNT" in exoctl("get", "events", "-o", "wide").stdout.splitlines()[0]
    described = exoctl("describe", "md", "llama").stdout
    events = described.split("Events:")[1].splitlines()
    assert events[1].split() == ["Type", "Reason", "Age", "From", "Message"]
    assert events[3].split()[:2] == ["Warning", "Unschedulable"] and "(x2 over" in events[3]


def test_describe_without_events_says_none(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    assert "Events:  <none>" in exoctl("describe", "md", "llama").stdout


def test_config_kubeconfig_prints_server_token_and_ca(api, exoctl, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    result = exoctl("config", "kubeconfig", "--ca", str(ca))
    config = yaml.safe_load(result.stdout)
    assert config["clusters"][0]["cluster"]["server"] == api.url
    assert base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"]) == ca.read_bytes()
    assert config["users"][0]["user"]["token"] == TOKEN and config["current-context"] == "exo"
    assert "kubectl sends no token over HTTP" in result.stderr  # the test server is plain HTTP


def test_config_kubeconfig_refuses_an_https_server_without_a_ca_and_a_bad_ca_file(exoctl, tmp_path):
    https = exoctl("--server", "https://127.0.0.1:1", "config", "kubeconfig")
    assert https.code == 1 and "pass --ca" in https.stderr
    missing = exoctl("config", "kubeconfig", "--ca", str(tmp_path / "nope.pem"))
    assert missing.code == 1 and "--ca: cannot read" in missing.stderr
