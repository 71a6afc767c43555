"""Pure pieces of exoctl: ages, tables, describe text, durations, --for, apply/prune decisions."""
from __future__ import annotations

import json

import pytest

from exo_ctl.api.resources import KINDS
from exo_ctl.cli import printers
from exo_ctl.cli.apply import client_apply_action, object_diff, prune_candidates
from exo_ctl.cli.common import UsageError, parse_duration, resolve_targets
from exo_ctl.cli.describe import describe, title
from exo_ctl.cli.wait import WaitFor, parse_for

NOW = 1_714_557_600.0  # 2024-05-01T10:00:00Z
LAST = printers.LAST_APPLIED


def _md(name="llama", *, created="2024-05-01T09:57:00Z", generation=1, conditions=(), annotations=None, spec=None):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created,
                         "generation": generation, "annotations": annotations or {}, "labels": {}},
            "spec": spec or {"model": {"source": "hf://org/model"}, "replicas": 2},
            "status": {"readyReplicas": 1, "conditions": list(conditions)}}


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (5, "5s"), (59, "59s"), (60, "1m"), (3599, "59m"), (7200, "2h"), (4 * 86400 + 5, "4d"),
    (400 * 86400, "1y"), (-0.5, "0s"), (-30, "<invalid>"),
])
def test_ages_are_short_like_kubectl(seconds, text):
    assert printers.short_duration(seconds) == text


def test_a_table_pads_columns_two_spaces_apart_and_trims_the_end():
    lines = printers.format_table(["NAME", "AGE"], [["a-long-name", "5s"], ["b", "10m"]])
    assert lines == ["NAME         AGE", "a-long-name  5s", "b            10m"]


def test_modeldeployment_rows_show_ready_over_desired_and_the_ready_condition():
    obj = _md(conditions=[{"type": "Ready", "status": "False"}])
    columns = printers.table_columns(KINDS["ModelDeployment"], wide=False, all_namespaces=False)
    assert printers.table_rows([obj], columns, NOW) == [["llama", "hf://org/model", "1/2", "False", "3m"]]
    wide = printers.table_columns(KINDS["ModelDeployment"], wide=True, all_namespaces=True)
    assert [c.header for c in wide][:1] == ["NAMESPACE"] and "STRATEGY" in [c.header for c in wide]


def test_a_node_without_a_ready_condition_is_unknown_and_without_role_shows_none():
    node = {"metadata": {"name": "n"}, "spec": {"address": "10.0.0.2"}, "status": {}}
    columns = printers.table_columns(KINDS["Node"], wide=False, all_namespaces=False)
    assert printers.table_rows([node], columns, NOW)[0][:5] == ["n", "Unknown", "<none>", "<none>", "10.0.0.2"]


def test_yaml_of_several_objects_is_a_list_and_name_output_is_refs():
    text = printers.render_objects([_md("a"), _md("b")], "yaml", single=False)
    assert text.startswith("apiVersion: v1\nkind: List\n")
    assert printers.render_objects([_md("a")], "name", single=True) == "modeldeployment.exo.dev/a"


def test_describe_renders_spec_keys_as_words_and_conditions_as_a_table():
    text = describe(_md(annotations={LAST: "{}", "team": "ml"},
                        conditions=[{"type": "Ready", "status": "True", "reason": "AllShardsReady"}]), now=NOW)
    assert "Annotations:  team=ml\n" in text and LAST not in text
    assert "  Replicas:  2\n" in text and "  Age:                3m\n" in text
    assert text.splitlines()[-2].split() == ["Type", "Status", "Reason", "Message", "LastTransitionTime"]
    assert title("memoryHeadroom") == "Memory Headroom" and title("observedGeneration") == "Observed Generation"


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("2m", 120), ("1h30m", 5400), ("500ms", 0.5), ("45", 45)])
def test_durations_parse_like_kubectl(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "-3", "1m-2s"])
def test_bad_durations_are_usage_errors_naming_the_flag(text):
    with pytest.raises(UsageError, match="invalid --timeout"):
        parse_duration(text)


def test_for_condition_defaults_to_true_and_respects_observed_generation():
    wanted = parse_for("condition=Ready")
    fresh = _md(generation=2, conditions=[{"type": "Ready", "status": "True", "observedGeneration": 2}])
    stale = _md(generation=2, conditions=[{"type": "Ready", "status": "True", "observedGeneration": 1}])
    assert wanted == WaitFor("Ready", "True")
    assert wanted.met(fresh) and not wanted.met(stale) and not wanted.met(None)
    assert parse_for("condition=Ready=false").met(_md(conditions=[{"type": "Ready", "status": "False"}]))
    assert parse_for("delete").met(None)
    with pytest.raises(UsageError):
        parse_for("condition=Ready=maybe")


def test_types_resolve_by_short_name_plural_kind_and_group():
    words = ["md", "mds", "modeldeployment", "ModelDeployment", "modeldeployments.exo.dev"]
    assert {resolve_targets([w])[0][0].kind for w in words} == {"ModelDeployment"}
    assert resolve_targets(["no/a", "md/b"]) == [(KINDS["Node"], "a"), (KINDS["ModelDeployment"], "b")]
    with pytest.raises(UsageError):
        resolve_targets(["md", "x/y"])


def test_client_dry_run_judges_created_configured_and_unchanged():
    manifest = {"metadata": {"name": "llama", "labels": {"app": "x"}}, "spec": {"replicas": 2}}
    applied = json.dumps({"metadata": {"labels": {"app": "x", "old": "y"}}})
    live = {"metadata": {"labels": {"app": "x"}, "annotations": {LAST: applied}}, "spec": {"replicas": 2}}
    assert client_apply_action(None, manifest) == "created"
    assert client_apply_action(live, manifest) == "unchanged"
    assert client_apply_action({**live, "spec": {"replicas": 3}}, manifest) == "configured"
    with_old_label = {**live, "metadata": {**live["metadata"], "labels": {"app": "x", "old": "y"}}}
    assert client_apply_action(with_old_label, manifest) == "configured"


def test_prune_only_takes_objects_with_the_last_applied_annotation_that_left_the_set():
    kept, gone, foreign = _md("kept", annotations={LAST: "{}"}), _md("gone", annotations={LAST: "{}"}), _md("foreign")
    applied = {("ModelDeployment", "default", "kept")}
    assert prune_candidates([kept, gone, foreign], applied) == [gone]


def test_diff_ignores_resource_version_and_the_last_applied_annotation():
    live = _md(annotations={LAST: "{}"})
    merged = json.loads(json.dumps(live))
    merged["metadata"].update(resourceVersion="9", annotations={LAST: '{"x": 1}'})
    assert object_diff(live, merged, label="x") == ""
    merged["spec"]["replicas"] = 3
    assert "-  replicas: 2\n+  replicas: 3\n" in object_diff(live, merged, label="x")
