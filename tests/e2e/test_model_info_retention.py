"""Real ``exo`` nodes started with ``--model-info-retention 1``: a deployed model's ModelInfo stays
in the replicated state however long it is deployed, is deleted on every replica about a second
after nothing refers to it any more, and is written again when the model is deployed again."""
from __future__ import annotations

import re
import time

import pytest

from exo_ctl.model_builder.build_model import build_model
from harness.cluster import running_cluster, wait_until
from harness.serving import DEPLOYMENTS, apply, client_for, wait_nodes_ready, wait_serving

pytestmark = pytest.mark.slow


def model_infos(node) -> float:
    """ModelInfo records in ``node``'s replica, from its /metrics (exo_store_objects)."""
    status, _, text = node.request("GET", "/metrics")
    assert status == 200, text
    found = re.search(r'^exo_store_objects\{[^}]*kind="ModelInfo"[^}]*\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_an_unreferenced_model_info_is_deleted_after_the_retention_and_written_again_on_deploy(tmp_path):
    model = build_model("tiny")
    with running_cluster(2, tmp_path, extra_args=("--model-info-retention", "1")) as cluster:
        wait_nodes_ready(cluster, 2)
        entry = cluster.nodes[0]
        apply(entry, "tiny", model)
        wait_serving(entry, "tiny", stages=2, timeout=60)
        time.sleep(3)  # three retentions: a record in use stays
        assert [model_infos(node) for node in cluster.nodes] == [1, 1]

        status, _, body = entry.request("DELETE", f"{DEPLOYMENTS}/tiny")
        assert status == 200, body
        wait_until(lambda: all(model_infos(node) == 0 for node in cluster.nodes), timeout=30,
                   what="the ModelInfo to be deleted on both replicas", cluster=cluster)

        apply(entry, "tiny", model)
        wait_serving(entry, "tiny", stages=2, timeout=60)
        reply = client_for(entry).completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
        assert reply.choices[0].text
        assert [model_infos(node) for node in cluster.nodes] == [1, 1]
