"""A node restarted after SIGKILL must not serve the state it had when it died: it answers 503
until it has applied what the leader committed meanwhile (found by the chaos run: a restarted
follower served objects ~300 revisions old for up to 2 s, while its lag timer ran)."""
from __future__ import annotations

import json
import time

import pytest

from exo_ctl.client import APPLY_CONTENT_TYPE
from harness.chaos_runner import COLLECTION, manifest
from harness.cluster import http_json

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_a_restarted_node_serves_no_read_older_than_the_writes_acknowledged_while_it_was_down(exo_cluster):
    cluster = exo_cluster(3)
    writer, _, victim = cluster.nodes
    victim.kill()
    acknowledged = 0
    for serial in range(300):
        status, _, body = writer.request("PATCH", f"{COLLECTION}/down-{serial % 20}", content_type=APPLY_CONTENT_TYPE,
                                         body=json.dumps(manifest(f"down-{serial % 20}", f"v{serial}")))
        assert status in (200, 201), body
        acknowledged = int(body["metadata"]["resourceVersion"])
    victim.start()
    served, deadline = [], time.monotonic() + 45
    while time.monotonic() < deadline:
        try:
            status, _, body = http_json("GET", victim.api_url + COLLECTION, token=victim.secret, timeout=2.0)
        except OSError:
            time.sleep(0.01)
            continue
        if status == 200:
            served.append(int(body["metadata"]["resourceVersion"]))
            if len(served) >= 20:
                break
        time.sleep(0.005)
    assert served, f"{victim.name} served no read within 45 s\n{cluster.logs()}"
    stale = [revision for revision in served if revision < acknowledged]
    assert not stale, f"{victim.name} served revisions {stale[:5]} after {acknowledged} had been acknowledged"
