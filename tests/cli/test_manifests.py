"""Loading manifests: files, directories, stdin, multi-document YAML, and errors with file:line."""
from __future__ import annotations

import io
import json

import pytest

from tests.cli.cli_helpers import deployment_yaml
from exo_ctl.manifests import MAX_FILE_BYTES, ManifestError, field_line, load_manifests, parse_documents


def _problems(*paths, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifests(list(paths), **kwargs)
    return caught.value.problems


def test_a_multi_document_file_yields_every_object_with_defaults_and_namespace(tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text(deployment_yaml("a") + "---\n---\n" + deployment_yaml("b"))
    manifests = load_manifests([str(path)])
    assert [m.name for m in manifests] == ["a", "b"]
    assert manifests[0].object["metadata"]["namespace"] == "default"
    assert manifests[0].object["spec"]["placement"]["strategy"] == "Pack"
    assert [m.line for m in manifests] == [1, 11]


def test_a_directory_reads_manifest_files_sorted_and_recurses_only_with_r(tmp_path):
    (tmp_path / "b.yml").write_text(deployment_yaml("b"))
    (tmp_path / "a.json").write_text(json.dumps({"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
                                                 "metadata": {"name": "a"}, "spec": {"model": {"source": "hf://o/m"}}}))
    (tmp_path / "notes.txt").write_text("not a manifest")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(deployment_yaml("c"))
    assert [m.name for m in load_manifests([str(tmp_path)])] == ["a", "b"]
    assert [m.name for m in load_manifests([str(tmp_path)], recursive=True)] == ["a", "b", "c"]


def test_stdin_is_read_with_dash():
    manifests = load_manifests(["-"], stdin=io.BytesIO(deployment_yaml().encode()))
    assert manifests[0].source == "<stdin>" and manifests[0].name == "llama"


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment: x\n")
    [problem] = _problems(str(path))
    assert problem.startswith(f"{path}:2:22: invalid YAML: mapping values are not allowed")


def test_json_syntax_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "kind": "ModelDeployment",\n  "metadata": }\n')
    [problem] = _problems(str(path))
    assert problem.startswith(f"{path}:3:15: invalid JSON")


def test_schema_violations_name_the_line_of_each_bad_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(deployment_yaml() + "  placement:\n    strategy: pack\n  colour: blue\n")
    problems = _problems(str(path))
    assert problems[0] == f'{path}:1: ModelDeployment "llama" is invalid:'
    assert f"  {path}:10: spec.placement.strategy: must be 'Pack' or 'Spread', got 'pack'" in problems
    assert f"  {path}:11: spec.colour: unknown field" in problems


def test_a_missing_field_points_at_its_parent(tmp_path):
    path = tmp_path / "nosource.yaml"
    path.write_text("apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: x\nspec:\n  model: {}\n")
    [problem] = _problems(str(path))
    assert problem == f'{path}:6: ModelDeployment "x" is invalid: spec.model.source: required field is missing'


def test_unknown_kind_and_api_version_are_refused_at_their_line(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("apiVersion: exo.dev/v1alpha1\nkind: Pod\nmetadata: {name: p}\n---\n"
                    "apiVersion: apps/v1\nkind: ModelDeployment\nmetadata: {name: q}\n")
    problems = _problems(str(path))
    assert problems[0].startswith(f'{path}:2: no matches for kind "Pod" in version "exo.dev/v1alpha1"')
    assert problems[1].startswith(f'{path}:5: no matches for kind "ModelDeployment" in version "apps/v1"')


def test_one_bad_document_fails_the_whole_set_and_every_problem_is_listed(tmp_path):
    (tmp_path / "a.yaml").write_text(deployment_yaml("good"))
    (tmp_path / "b.yaml").write_text("- just\n- a list\n")
    (tmp_path / "c.yaml").write_text(deployment_yaml("bad", replicas=-1))
    problems = _problems(str(tmp_path))
    assert len(problems) == 2
    assert "b.yaml:1: a manifest must be a mapping" in problems[0]
    assert "c.yaml:8: " in problems[1] and "spec.replicas" in problems[1]


def test_the_same_object_twice_is_refused_with_both_places(tmp_path):
    (tmp_path / "a.yaml").write_text(deployment_yaml())
    (tmp_path / "b.yaml").write_text(deployment_yaml(replicas=2))
    [problem] = _problems(str(tmp_path))
    assert problem == (f"{tmp_path / 'b.yaml'}:1: duplicate object modeldeployment.exo.dev/llama in namespace "
                       f"default (first defined at {tmp_path / 'a.yaml'}:1)")


def test_the_same_name_in_two_namespaces_is_two_objects(tmp_path):
    path = tmp_path / "ns.yaml"
    path.write_text(deployment_yaml(namespace="dev") + "---\n" + deployment_yaml(namespace="prod"))
    assert [m.namespace for m in load_manifests([str(path)])] == ["dev", "prod"]


def test_a_duplicate_key_within_a_document_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(deployment_yaml() + "  replicas: 3\n")
    [problem] = _problems(str(path))
    assert problem == f'{path}:9: duplicate key "replicas" (first at line 8)'


def test_files_over_one_mebibyte_are_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(deployment_yaml() + "#" * MAX_FILE_BYTES)
    [problem] = _problems(str(path))
    assert "larger than 1 MiB" in problem and str(path) in problem
    [from_stdin] = _problems("-", stdin=io.BytesIO(b"#" * (MAX_FILE_BYTES + 1)))
    assert from_stdin.startswith("<stdin>: larger than 1 MiB")


def test_a_missing_path_is_named():
    assert _problems("nowhere.yaml") == ['the path "nowhere.yaml" does not exist']


def test_the_namespace_flag_fills_a_missing_namespace_and_must_match_an_explicit_one(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(deployment_yaml())
    assert load_manifests([str(path)], namespace="prod")[0].namespace == "prod"
    path.write_text(deployment_yaml(namespace="dev"))
    [problem] = _problems(str(path), namespace="prod")
    assert problem.startswith(f'{path}:5: the namespace from the object ("dev") does not match --namespace "prod"')


def test_unquoted_dates_stay_strings_as_kubectl_converts_them(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(deployment_yaml().replace("  name: llama\n", "  name: llama\n  annotations:\n    since: 2024-05-01\n"))
    assert load_manifests([str(path)])[0].object["metadata"]["annotations"] == {"since": "2024-05-01"}


def test_a_kind_list_is_expanded_into_its_items(tmp_path):
    item = {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "x"},
            "spec": {"model": {"source": "hf://o/m"}}}
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [item, {**item, "metadata": {"name": "y"}}]}))
    assert [m.name for m in load_manifests([str(path)])] == ["x", "y"]


def test_field_line_follows_paths_through_lists():
    [document] = parse_documents("a:\n  items:\n    - name: x\n    - name: y\n      port: 1\n", source="t.yaml")
    assert field_line(document.node, "a.items[1].port") == 5
    assert field_line(document.node, "a.items[7]") == 2
