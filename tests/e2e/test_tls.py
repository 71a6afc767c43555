"""Real nodes serving HTTPS from the cluster CA (``--tls on`` on loopback): the official openai client
works with the CA, exoctl pins it and refuses any other server, a node that joins gets a
certificate from the same CA, and plain HTTP to the HTTPS port gets nowhere."""
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import httpx
import openai
import pytest
from cryptography import x509

from exo_ctl.client import Client, ClientConfig, ConnectionFailed
from harness.cluster import Cluster, running_cluster, wait_until
from reconciler.tls import ClusterCA, ensure_node_certificate


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two nodes with ``--tls on`` (node1 joined over HTTPS); no test here stops one."""
    with running_cluster(2, tmp_path_factory.mktemp("tls"), extra_args=["--tls", "on"]) as cluster:
        yield cluster


def openai_client(node, *, verify) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.api_url}/v1", api_key=node.secret, max_retries=0, timeout=10,
                         http_client=httpx.Client(verify=verify, trust_env=False))


def test_the_openai_client_works_over_https_with_the_cluster_ca_only(cluster):
    node = cluster.nodes[0]
    assert node.api_url.startswith("https://")
    assert f"or SSL_CERT_FILE=PATH): {node.ca_path}" in node.log_text()
    models = openai_client(node, verify=ssl.create_default_context(cafile=node.ca_path)).models.list()
    assert models.object == "list"
    with pytest.raises(openai.APIConnectionError):
        openai_client(node, verify=True).models.list()  # the system's CAs do not vouch for it


def test_plain_http_to_the_https_port_gets_no_answer(cluster):
    node = cluster.nodes[0]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/healthz", timeout=5)


def test_exoctl_pins_the_cluster_ca_and_refuses_a_server_with_a_foreign_certificate(cluster, tmp_path):
    node = cluster.nodes[0]
    pinned = Client(ClientConfig(server=node.api_url, token=node.secret, ca=str(node.ca_path), timeout=5))
    # a namespace no test here writes to: the other tests' deployments do not show
    assert pinned.request("GET", "/apis/exo.dev/v1alpha1/namespaces/pinned/modeldeployments")[0]["items"] == []

    # An impostor on another port with a certificate from another CA (valid for 127.0.0.1).
    foreign = ensure_node_certificate(ClusterCA.create(), data_dir=tmp_path, node="impostor", hosts=["127.0.0.1"])
    server = subprocess.Popen([sys.executable, "-c", IMPOSTOR, str(foreign.cert_path), str(foreign.key_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        impostor = Client(ClientConfig(server=f"https://127.0.0.1:{port}", token=node.secret,
                                       ca=str(node.ca_path), timeout=5))
        with pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED"):
            impostor.request("GET", "/apis/exo.dev/v1alpha1/modeldeployments")
    finally:
        server.kill()
        server.wait(5)


IMPOSTOR = """
import http.server, ssl, sys
server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_a_node_that_joins_over_https_gets_a_certificate_from_the_same_ca(cluster):
    first, second = cluster.nodes
    assert first.ca_path.read_bytes() == second.ca_path.read_bytes()
    for node in cluster.nodes:  # the scheme other nodes, /sd and status.endpoint use to reach it
        wait_until(lambda: (first.request("GET", f"/apis/exo.dev/v1alpha1/nodes/{node.name}")[2] or {})
                   .get("spec", {}).get("apiScheme") == "https", timeout=10, what=f"{node.name} says https",
                   cluster=cluster)
    ca = x509.load_pem_x509_certificate(first.ca_path.read_bytes())
    for node in cluster.nodes:
        cert = ssl.get_server_certificate(("127.0.0.1", node.api_port))
        x509.load_pem_x509_certificate(cert.encode()).verify_directly_issued_by(ca)
    status, _, _ = first.request("POST", "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments", body={
        "apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"},
        "spec": {"model": {"source": "hf://org/none"}, "replicas": 0}})
    assert status == 201
    wait_until(lambda: second.request("GET", "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments/m")[0] == 200,
               timeout=10, what="the write replicated to the joined node", cluster=cluster)
