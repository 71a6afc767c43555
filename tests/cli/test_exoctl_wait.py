"""`exoctl wait --for=condition=Ready` gives up as soon as the object is Stalled, saying why."""
from __future__ import annotations

import threading
import time

from tests.cli.cli_helpers import deployment_yaml

STALLED = [
    {"type": "Ready", "status": "False", "reason": "ShardFailed", "observedGeneration": 1,
     "message": "shard llama-0-0 on node-a: config.json: invalid JSON at line 3"},
    {"type": "Stalled", "status": "True", "reason": "ShardFailed", "observedGeneration": 1,
     "message": "shard llama-0-0 on node-a: config.json: invalid JSON at line 3"},
]


def test_wait_for_ready_exits_at_once_with_the_reason_when_the_deployment_stalls(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    timer = threading.Timer(0.5, lambda: api.set_status("ModelDeployment", "llama", {"conditions": STALLED},
                                                        namespace="default"))
    timer.start()
    started = time.monotonic()
    result = exoctl("wait", "md/llama", "--for=condition=Ready", "--timeout=60s")
    timer.join()
    assert result.code == 1 and result.stdout == ""
    assert result.stderr == (
        "error: modeldeployments/llama is Stalled and will not become Ready=True: "
        "ShardFailed: shard llama-0-0 on node-a: config.json: invalid JSON at line 3\n"
    )
    assert time.monotonic() - started < 30


def test_waiting_for_stalled_itself_succeeds_when_it_stalls(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    api.set_status("ModelDeployment", "llama", {"conditions": STALLED}, namespace="default")
    result = exoctl("wait", "md/llama", "--for=condition=Stalled", "--timeout=10s")
    assert (result.code, result.stdout) == (0, "modeldeployment.exo.dev/llama condition met\n"), result.stderr


def test_a_stalled_condition_of_an_older_generation_does_not_end_the_wait(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    old = [{**c, "observedGeneration": 0} for c in STALLED]
    api.set_status("ModelDeployment", "llama", {"conditions": old}, namespace="default")
    result = exoctl("wait", "md/llama", "--for=condition=Ready", "--timeout=1s")
    assert result.stderr == "error: timed out waiting for the condition on modeldeployments/llama\n"
