"""The dashboard in a real headless Chromium, served by three real ``exo`` nodes on 127.0.0.1.

Needs Debian's chromium at /usr/bin/chromium (``apt-get install chromium``) and the Python
``playwright`` package (never ``playwright install``: we drive the system browser). The page is
loaded from node0; writes go through node1, so what the page shows travelled through Raft.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import Cluster, start_cluster, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
MD = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"
APPLY = "application/apply-patch+yaml"
UI_TIMEOUT_MS = 15_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install -y chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

def manifest(name: str, source: str) -> str:
    return (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\n"
            f"spec:\n  model:\n    source: {source}\n  replicas: 1\n  placement:\n    strategy: Spread\n")


def screenshot(page: Any, name: str = "dashboard.png") -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, "the screenshot is suspiciously small"
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(3, tmp_path_factory.mktemp("dashboard-cluster"))
    yield cluster
    cluster.close()
    print(cluster.logs())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage); uncaught script errors fail the test."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def open_dashboard(page: Any, cluster: Cluster, token: str | None = None) -> None:
    page.goto(f"{cluster.nodes[0].api_url}/#token={token or cluster.secret}")


def test_the_token_in_the_address_is_kept_for_the_tab_and_removed_from_the_address_bar(page, cluster) -> None:
    open_dashboard(page, cluster)
    page.wait_for_selector("#conn[data-state='live']")
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('exo-dashboard-token')") == cluster.secret
    page.reload()
    page.wait_for_selector("#conn[data-state='live']")
    assert page.is_hidden("#auth")


def test_a_refused_token_brings_back_the_token_form_and_a_good_one_connects(page, cluster) -> None:
    open_dashboard(page, cluster, token="not-the-secret")
    page.wait_for_selector("#auth:not([hidden])")
    assert "401" in page.text_content("#auth-error")
    assert page.evaluate("sessionStorage.getItem('exo-dashboard-token')") is None
    page.fill("#token-input", cluster.secret)
    page.click("#auth-form button[type='submit']")
    page.wait_for_selector("#conn[data-state='live']")
    assert page.is_hidden("#auth")


def test_a_deployment_applied_through_the_api_appears_live_without_reload(page, cluster) -> None:
    open_dashboard(page, cluster)
    page.wait_for_selector("#conn[data-state='live']")
    page.evaluate("window.__sameDocument = true")
    status, _, body = cluster.nodes[1].request("PATCH", f"{MD}/live-llama", content_type=APPLY,
                                               body=manifest("live-llama", "hf://org/live-llama"))
    assert status == 201, body
    row = page.wait_for_selector("#deployments tr[data-deployment='default/live-llama']")
    assert "hf://org/live-llama" in row.text_content()
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    page.wait_for_selector("#shard-map [data-deployment='default/live-llama']")
    screenshot(page)

    status, _, body = cluster.nodes[2].request("DELETE", f"{MD}/live-llama")
    assert status == 200, body
    page.wait_for_selector("#deployments tr[data-deployment='default/live-llama']", state="detached")
    assert page.evaluate("window.__sameDocument") is True


def test_every_node_appears_with_its_readiness_and_exactly_one_leader(page, cluster) -> None:
    registered = _registered_nodes(cluster, timeout=15.0)
    assert registered == sorted(n.name for n in cluster.nodes), (
        f"only {registered} of the cluster's nodes registered a Node object\n{cluster.logs()}")
    open_dashboard(page, cluster)
    for node in cluster.nodes:
        page.wait_for_selector(f"#nodes tr[data-node='{node.name}']")
    rows = page.query_selector_all("#nodes tr[data-node]")
    assert sorted(r.get_attribute("data-node") for r in rows) == sorted(n.name for n in cluster.nodes)
    page.wait_for_function("document.querySelectorAll('#nodes .badge.leader').length === 1",
                           timeout=UI_TIMEOUT_MS)
    assert "127.0.0.1" in page.text_content("#nodes")
    assert page.text_content(f"#nodes tr[data-node='{cluster.nodes[0].name}'] .badge.here") == "this node"
    status, _, body = cluster.nodes[1].request("PATCH", f"{MD}/shown-llama", content_type=APPLY,
                                               body=manifest("shown-llama", "hf://org/shown-llama"))
    assert status == 201, body
    page.wait_for_selector("#deployments tr[data-deployment='default/shown-llama']")
    page.wait_for_timeout(500)  # let the last frame paint
    screenshot(page)


def _registered_nodes(cluster: Cluster, *, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = cluster.nodes[0].request("GET", "/apis/exo.dev/v1alpha1/nodes")
        names = sorted(item["metadata"]["name"] for item in body.get("items", [])) if status == 200 else []
        if len(names) == len(cluster.nodes) or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


def test_every_shard_is_drawn_on_its_node_and_a_chat_answer_streams_in(page, cluster) -> None:
    status, _, body = cluster.nodes[0].request("GET", "/v1/models")
    assert status == 200, f"node0 does not serve /v1/models: {status} {body}"
    from exo_ctl.model_builder.build_model import build_model

    model_dir = build_model("tiny")
    status, _, body = cluster.nodes[1].request("PATCH", f"{MD}/tiny-llama", content_type=APPLY,
                                               body=manifest("tiny-llama", str(model_dir)))
    assert status in (200, 201), body

    def ready_shards() -> list[dict] | None:
        status, _, body = cluster.nodes[0].request("GET", "/apis/exo.dev/v1alpha1/shards")
        shards = [s for s in body.get("items", []) if s["spec"]["deployment"] == "default/tiny-llama"]
        done = shards and all((s.get("status") or {}).get("phase") == "Ready" for s in shards)
        return shards if done else None

    shards = wait_until(ready_shards, timeout=180, what="every shard of default/tiny-llama to be Ready")
    open_dashboard(page, cluster)
    for shard in shards:
        name = shard["metadata"]["name"]
        segment = page.wait_for_selector(f"#shard-map .segment[data-shard='{name}'][data-phase='Ready']")
        assert segment.get_attribute("data-node") == shard["spec"]["nodeName"]
        assert shard["spec"]["nodeName"] in segment.text_content()

    status, _, models = cluster.nodes[0].request("GET", "/v1/models")
    ids = [m["id"] for m in models["data"]]
    model_id = next((i for i in ids if "tiny-llama" in i), None)
    assert model_id, f"/v1/models does not list the deployment: {ids}"
    page.wait_for_selector(f"#chat-model option[value='{model_id}']", state="attached")
    page.select_option("#chat-model", model_id)
    page.fill("#chat-max-tokens", "24")
    page.evaluate("""() => {
        window.__answerUpdates = 0;
        new MutationObserver(() => { window.__answerUpdates += 1; })
            .observe(document.getElementById('chat-log'), {subtree: true, characterData: true, childList: true});
    }""")
    page.fill("#chat-input", "Tell me a short story.")
    page.press("#chat-input", "Enter")
    answer = page.wait_for_selector(".message-row.assistant[data-done='true']", timeout=120_000)
    assert answer.query_selector(".chat-error") is None, answer.text_content()
    assert answer.query_selector(".bubble-text").text_content().strip(), "the answer is empty"
    assert int(answer.get_attribute("data-chunks")) >= 2, "the answer did not arrive token by token"
    assert page.evaluate("window.__answerUpdates") >= 3
    screenshot(page, "dashboard-serving.png")


def test_a_downloading_shard_says_how_much_of_its_weights_arrived_and_how_fast(page, cluster) -> None:
    open_dashboard(page, cluster)
    page.wait_for_selector("#conn[data-state='live']")
    phase, text, title = page.evaluate("""async () => {
        const { renderShardMap } = await import('/dashboard/views.js');
        const shard = { metadata: { name: 'big-r0-s1' },
          spec: { deployment: 'default/big', replica: 0, index: 1, nodeName: 'node1', totalLayers: 8,
                  layers: { start: 4, end: 8 } },
          status: { phase: 'Downloading', bytesDownloaded: 42 * 2 ** 20, bytesToDownload: 100 * 2 ** 20,
                    downloadRate: 12.5 * 2 ** 20 } };
        const segment = renderShardMap([], [shard], { colours: new Map() }).querySelector('.segment');
        return [segment.dataset.phase, segment.textContent, segment.title];
    }""")
    assert phase == "Downloading"
    assert "Downloading 42% · 12.5 MiB/s" in text
    assert "42.0 MiB of 100 MiB fetched" in title


def test_the_page_reconnects_after_its_node_restarts_and_stays_live(page, cluster) -> None:
    open_dashboard(page, cluster)
    page.wait_for_selector("#conn[data-state='live']")
    page.evaluate("window.__sameDocument = true")
    cluster.nodes[0].kill()
    page.wait_for_selector("#conn[data-state='warn']")
    cluster.nodes[0].start()
    cluster.nodes[0].wait_ready()
    page.wait_for_selector("#conn[data-state='live']", timeout=45_000)
    status, _, body = cluster.nodes[1].request("PATCH", f"{MD}/after-restart", content_type=APPLY,
                                               body=manifest("after-restart", "hf://org/after-restart"))
    assert status == 201, body
    page.wait_for_selector("#deployments tr[data-deployment='default/after-restart']")
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
