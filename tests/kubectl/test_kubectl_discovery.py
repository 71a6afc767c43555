"""kubectl finds our API: version, api-resources, explain."""
from __future__ import annotations


async def test_kubectl_version_reports_the_server_version(kube):
    result = await kube("version", "-o", "json")
    assert result.json()["serverVersion"]["gitVersion"].startswith("v")


async def test_kubectl_api_resources_lists_our_kinds_with_short_names(kube):
    result = await kube("api-resources", "--api-group=exo.dev", "-o", "wide")
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(lines) == {"modeldeployments", "nodes", "shards"}
    assert " md," in lines["modeldeployments"] or " md " in lines["modeldeployments"]
    assert "exo.dev/v1alpha1" in lines["shards"]


async def test_kubectl_explain_reads_the_field_from_our_openapi(kube):
    result = await kube("explain", "modeldeployment.spec.placement")
    assert "KIND:       ModelDeployment" in result.stdout
    assert "strategy\t<string>" in result.stdout and "enum: Pack, Spread" in result.stdout
    assert "Which nodes hold the model's layers." in result.stdout
    assert "Pack: the fewest nodes that fit" in result.stdout


async def test_unknown_paths_answer_a_kubernetes_status(kube):
    for path in ("/api/v1/namespaces/default/pods", "/openapi/v3/apis/foo/v1", "/openapi/v4", "/apis/foo.dev/v1"):
        result = await kube("get", "--raw", path, check=False)
        assert result.code != 0 and "Error from server (NotFound)" in result.stderr, path
