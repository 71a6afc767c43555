"""The real exoctl program against a live API: apply (dry runs, prune, all-or-nothing) and diff."""
from __future__ import annotations

import json

from tests.cli.cli_helpers import deployment_yaml

LAST_APPLIED = "exo.dev/last-applied-configuration"


def test_apply_reports_created_then_unchanged_then_configured(api, exoctl, tmp_path):
    manifest = tmp_path / "llama.yaml"
    manifest.write_text(deployment_yaml())
    first = exoctl("apply", "-f", str(manifest))
    again = exoctl("apply", "-f", str(manifest))
    manifest.write_text(deployment_yaml(replicas=2))
    changed = exoctl("apply", "-f", str(manifest))
    assert (first.code, first.stdout) == (0, "modeldeployment.exo.dev/llama created\n")
    assert again.stdout == "modeldeployment.exo.dev/llama unchanged\n"
    assert changed.stdout == "modeldeployment.exo.dev/llama configured\n"
    assert api.get("ModelDeployment", "llama", namespace="default")["spec"]["replicas"] == 2


def test_dry_runs_say_what_would_happen_and_write_nothing(api, exoctl):
    server = exoctl("apply", "-f", "-", "--dry-run=server", input=deployment_yaml())
    client = exoctl("apply", "-f", "-", "--dry-run=client", input=deployment_yaml())
    first, plan = server.stdout.splitlines()
    assert first == "modeldeployment.exo.dev/llama created (server dry run)", server.stderr
    assert plan.startswith("ModelNotFound: model 'hf://org/model' is not in the local Hugging Face cache")
    assert client.stdout == "modeldeployment.exo.dev/llama created (dry run)\n", client.stderr
    assert api.store.revision == 0


def test_one_invalid_document_applies_nothing_and_names_file_and_line(api, exoctl, tmp_path):
    (tmp_path / "a-good.yaml").write_text(deployment_yaml("good"))
    (tmp_path / "b-bad.yaml").write_text(deployment_yaml("bad") + "  placement:\n    strategy: pack\n")
    result = exoctl("apply", "-f", str(tmp_path))
    assert result.code == 1 and result.stdout == ""
    assert f"{tmp_path / 'b-bad.yaml'}:10: " in result.stderr
    assert "spec.placement.strategy" in result.stderr
    assert api.store.revision == 0


def test_prune_deletes_only_applied_objects_that_left_the_manifests(api, exoctl, tmp_path):
    labels = {"app": "demo"}
    (tmp_path / "a.yaml").write_text(deployment_yaml("a", labels=labels))
    (tmp_path / "b.yaml").write_text(deployment_yaml("b", labels=labels))
    assert exoctl("apply", "-f", str(tmp_path), "--prune", "-l", "app=demo").code == 0
    api.create({"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": "not-applied", "labels": labels, "namespace": "default"},
                "spec": {"model": {"source": "hf://org/model"}}})
    (tmp_path / "b.yaml").unlink()
    result = exoctl("apply", "-f", str(tmp_path), "--prune", "-l", "app=demo")
    assert result.stdout.splitlines() == ["modeldeployment.exo.dev/a unchanged", "modeldeployment.exo.dev/b pruned"]
    names = {key[2] for key in api.store.state.objects}
    assert names == {"a", "not-applied"}


def test_prune_without_a_selector_is_refused_before_any_write(api, exoctl, tmp_path):
    result = exoctl("apply", "-f", "-", "--prune", input=deployment_yaml())
    assert result.code != 0 and result.stderr.startswith("error: --prune needs a label selector")
    assert api.store.revision == 0


def test_apply_output_json_prints_the_resulting_object(api, exoctl):
    result = exoctl("apply", "-f", "-", "-o", "json", input=deployment_yaml())
    obj = json.loads(result.stdout)
    assert obj["metadata"]["name"] == "llama" and LAST_APPLIED in obj["metadata"]["annotations"]


def test_diff_exits_one_with_a_unified_diff_and_zero_when_nothing_changes(api, exoctl, tmp_path):
    manifest = tmp_path / "llama.yaml"
    manifest.write_text(deployment_yaml())
    exoctl("apply", "-f", str(manifest))
    same = exoctl("diff", "-f", str(manifest))
    manifest.write_text(deployment_yaml(replicas=3))
    changed = exoctl("diff", "-f", str(manifest))
    assert (same.code, same.stdout) == (0, "")
    assert changed.code == 1
    assert "-  replicas: 1\n+  replicas: 3\n" in changed.stdout
    assert "--- live/default/modeldeployment.exo.dev/llama" in changed.stdout
    assert api.get("ModelDeployment", "llama", namespace="default")["spec"]["replicas"] == 1


def test_diff_errors_exit_above_one(exoctl):
    result = exoctl("diff", "-f", "missing.yaml")
    assert result.code == 2 and result.stderr == 'error: the path "missing.yaml" does not exist\n'
