"""A real node with ``--tls on --cors-origin ...``: the dashboard over HTTPS in headless Chromium keeps
its token out of every URL (it travels only in Authorization headers, and nothing the server
answers contains it), and CORS lets the named origin in and no other."""
from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import Cluster, start_cluster

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ALLOWED = "https://app.example.com"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install -y chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(1, tmp_path_factory.mktemp("tls-browser"),
                            extra_args=["--tls", "on", "--cors-origin", ALLOWED])
    yield cluster
    cluster.close()
    print(cluster.logs())


def test_the_dashboard_over_https_never_puts_its_token_in_a_url(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    seen: list[tuple[str, dict[str, str]]] = []
    leaks: list[str] = []

    def on_response(response: Any) -> None:
        location = response.headers.get("location", "")
        body = response.body() if response.request.resource_type in ("document", "script", "fetch") \
            and response.status < 300 and "event-stream" not in response.headers.get("content-type", "") else b""
        if node.secret in location or node.secret.encode() in body:
            leaks.append(response.url)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(ignore_https_errors=True)  # Chromium has no way to trust the CA here
        page = context.new_page()
        page.on("request", lambda request: seen.append((request.url, request.headers)))
        page.on("response", on_response)
        page.goto(f"{node.api_url}/#token={node.secret}")
        page.wait_for_selector("#conn[data-state='live']", timeout=15_000)
        page.wait_for_timeout(1500)  # watches and the throughput stream are open by now
        assert "token" not in page.url
        browser.close()

    assert seen and all(url.startswith("https://") for url, _ in seen)
    assert [url for url, _ in seen if node.secret in url or "token=" in url] == []
    with_token = [url for url, headers in seen if node.secret in headers.get("authorization", "")]
    assert any("/apis/" in url for url in with_token), "the page never sent the token in its header"
    assert leaks == []


def preflight(node: Any, origin: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(f"{node.api_url}/v1/models", method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    context = ssl.create_default_context(cafile=str(node.ca_path))
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def test_cors_admits_the_named_origin_and_refuses_others(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    status, headers = preflight(node, ALLOWED)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    status, headers = preflight(node, "https://evil.example")
    assert status == 403 and "Access-Control-Allow-Origin" not in headers

    request = urllib.request.Request(f"{node.api_url}/v1/models", headers={
        "Origin": "https://evil.example", "Authorization": f"Bearer {node.secret}"})
    context = ssl.create_default_context(cafile=str(node.ca_path))
    with urllib.request.urlopen(request, timeout=5, context=context) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers  # the browser keeps the answer from that page
    request = urllib.request.Request(f"{node.api_url}/v1/models", headers={
        "Origin": ALLOWED, "Authorization": f"Bearer {node.secret}"})
    with urllib.request.urlopen(request, timeout=5, context=context) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
