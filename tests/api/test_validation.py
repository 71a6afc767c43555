"""Validation errors name the field path, and normalization fills defaults."""
import pytest

from exo_ctl.api.meta import format_bytes, parse_quantity
from exo_ctl.api.resources import kind_for
from exo_ctl.api.validation import InvalidObject, normalize


def md(**spec):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"},
            "spec": {"model": {"source": "hf://org/model"}, **spec}}


def causes(obj):
    with pytest.raises(InvalidObject) as err:
        normalize(obj)
    return {c.field: c.message for c in err.value.causes}


def test_bad_strategy_names_the_field_path_and_the_allowed_values():
    found = causes(md(placement={"strategy": "pack"}))
    assert "spec.placement.strategy" in found
    assert "Pack" in found["spec.placement.strategy"] and "'pack'" in found["spec.placement.strategy"]


def test_unknown_field_is_rejected_with_its_path():
    assert causes(md(replica=3)) == {"spec.replica": "unknown field"}


def test_missing_model_is_reported_as_required():
    obj = md()
    del obj["spec"]["model"]
    assert causes(obj) == {"spec.model": "required field is missing"}


def test_unknown_kind_and_api_version_are_rejected():
    assert "kind" in causes({**md(), "kind": "Deployment"})
    assert "apiVersion" in causes({**md(), "apiVersion": "apps/v1"})


def test_invalid_name_and_label_are_rejected():
    obj = md()
    obj["metadata"] = {"name": "Llama_70B", "labels": {"bad key!": "x"}}
    assert set(causes(obj)) == {"metadata.name", "metadata.labels"}


def test_max_nodes_below_min_nodes_is_rejected():
    assert "spec.placement" in causes(md(placement={"minNodes": 3, "maxNodes": 2}))


def test_normalize_fills_defaults_and_namespace_and_drops_server_fields():
    obj = md()
    obj["metadata"]["resourceVersion"] = "42"
    obj["status"] = {"readyReplicas": 3}
    out = normalize(obj)
    assert out["metadata"]["namespace"] == "default"
    assert "resourceVersion" not in out["metadata"] and "status" not in out
    assert out["spec"]["placement"]["strategy"] == "Pack" and out["spec"]["replicas"] == 1


def test_bad_model_sources_are_rejected():
    assert "spec.model.source" in causes(md(model={"source": "s3://bucket/x"}))
    assert "spec.model.source" in causes(md(model={"source": "hf://only-org"}))


@pytest.mark.parametrize("text,expected", [("16Gi", 16 * 1024**3), ("512M", 512 * 10**6), (1024, 1024), ("1.5Gi", 1610612736)])
def test_quantities_parse_to_bytes(text, expected):
    assert parse_quantity(text) == expected


def test_bad_quantity_is_rejected():
    assert "spec.resources.memoryHeadroom" in causes(md(resources={"memoryHeadroom": "lots"}))
    assert format_bytes(40.1 * 1024**3) == "40.1Gi"


@pytest.mark.parametrize("word", ["md", "mds", "modeldeployment", "ModelDeployments", "modeldeployment.exo.dev"])
def test_short_and_long_names_resolve_to_model_deployments(word):
    assert kind_for(word).kind == "ModelDeployment"
