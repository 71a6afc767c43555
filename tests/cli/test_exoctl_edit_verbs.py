"""exoctl label, annotate, patch and scale change the stored object the way kubectl's do."""
from __future__ import annotations

import json

from tests.cli.cli_helpers import deployment_yaml


def stored(api):
    return api.get("ModelDeployment", "llama", namespace="default")


def test_label_sets_and_removes_labels_and_refuses_to_overwrite_without_the_flag(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml(labels={"app": "chat"}))
    assert exoctl("label", "md", "llama", "tier=gpu").stdout.strip() == "modeldeployment.exo.dev/llama labeled"
    assert stored(api)["metadata"]["labels"] == {"app": "chat", "tier": "gpu"}
    refused = exoctl("label", "md/llama", "tier=cpu")
    assert refused.code == 1 and "--overwrite is false" in refused.stderr
    exoctl("label", "md/llama", "tier=cpu", "app-", "--overwrite")
    assert stored(api)["metadata"]["labels"] == {"tier": "cpu"}
    bad = exoctl("label", "md/llama", "not a label")
    assert bad.code == 2 and "KEY=VALUE" in bad.stderr


def test_annotate_adds_an_annotation(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    assert "annotated" in exoctl("annotate", "md", "llama", "owner=team-a").stdout
    assert stored(api)["metadata"]["annotations"]["owner"] == "team-a"


def test_patch_applies_merge_and_json_patches_and_reports_server_errors(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    assert "patched" in exoctl("patch", "md", "llama", "-p", json.dumps({"spec": {"replicas": 2}})).stdout
    assert stored(api)["spec"]["replicas"] == 2
    exoctl("patch", "md/llama", "--type", "json", "-p",
           json.dumps([{"op": "replace", "path": "/spec/placement/strategy", "value": "Spread"}]))
    assert stored(api)["spec"]["placement"]["strategy"] == "Spread"
    invalid = exoctl("patch", "md/llama", "--type", "merge", "-p", json.dumps({"spec": {"replicas": "two"}}))
    assert invalid.code == 1 and "spec.replicas" in invalid.stderr


def test_scale_sets_replicas_through_the_scale_subresource(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    assert exoctl("scale", "md/llama", "--replicas", "3").stdout.strip() == "modeldeployment.exo.dev/llama scaled"
    assert stored(api)["spec"]["replicas"] == 3
    assert exoctl("scale", "shards/x", "--replicas", "3").code == 2
