"""schemathesis against a real node serving the tiny model: every operation of /openapi.json,
valid and invalid inputs, with the cluster token. No response may be a 5xx, every response must
match its description, and the node must still be healthy (and still serve) afterwards.

    FUZZ_SEED=1234 FUZZ_EXAMPLES=30 uv run pytest -q tests/fuzz/test_api_fuzz.py -s
"""
from __future__ import annotations

import json
import time
import zlib
from collections import Counter, defaultdict
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from reconciler.membership import MEMBERS_PATH
from reconciler.server.dashboard import THROUGHPUT_PATH
from reconciler.server.watch import WATCH_CONTENT_TYPE
from harness.cluster import start_cluster
from harness.serving import apply, wait_serving
from tests.fuzz.seeds import SEED, examples

pytestmark = pytest.mark.slow

EXAMPLES = examples(10)
OPENAI_EXAMPLES = 3 * EXAMPLES  # the /v1 routes get more: their bodies have the most rules
DEPLOYMENT = "tiny"
FUZZ_MAX_TOKENS = 4  # generation stays cheap; larger fuzzed values are still sent when they are invalid
NOT_FUZZED = {
    ("GET", THROUGHPUT_PATH): "an endless event stream with no inputs",
    ("POST", MEMBERS_PATH): "the node would connect to whatever raftAddress a body names",
}
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
# Kubernetes answers a list at a resourceVersion newer than the server's with this 504, and client-go
# retries on its cause: the one 5xx that is an answer, not a fault.
TOO_LARGE_CHECKS = [response_schema_conformance, content_type_conformance]


def _too_large_resource_version(response: requests.Response) -> bool:
    if response.status_code != 504:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    causes = (body.get("details") or {}).get("causes") or [] if isinstance(body, dict) else []
    return any(isinstance(c, dict) and c.get("reason") == "ResourceVersionTooLarge" for c in causes)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    from exo_ctl.model_builder.build_model import build_model

    model = build_model("tiny")
    # Fuzzed deployments name hf:// sources: the node must never reach a real hub from a test.
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    cluster = start_cluster(1, tmp_path_factory.mktemp("fuzz"))
    try:
        entry = cluster.nodes[0]
        apply(entry, DEPLOYMENT, model, strategy="Pack")
        wait_serving(entry, DEPLOYMENT, stages=1, timeout=60)
        yield entry
    finally:
        cluster.close()
        patch.undo()
        print(cluster.logs()[-5000:])


def _cheap(case: Any, aim_at_model: bool) -> Any:
    """Keep fuzzed requests quick: often aim them at the served model, cap valid token budgets,
    and end watches after a second."""
    path_parameters = case.path_parameters or {}
    if aim_at_model and "model" in path_parameters:
        path_parameters["model"] = DEPLOYMENT
    body = case.body
    if aim_at_model and case.path.startswith("/apis/") and "name" in path_parameters:
        _aim_at_a_valid_object(path_parameters, body)
    if isinstance(body, dict) and case.path.startswith("/v1/"):
        if aim_at_model and "model" in body:
            body["model"] = DEPLOYMENT
        budgets = [f for f in ("max_tokens", "max_completion_tokens") if f in body]
        for field in budgets:
            value = body[field]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and FUZZ_MAX_TOKENS < value <= 4096:
                body[field] = FUZZ_MAX_TOKENS
        if not budgets:
            body["max_tokens"] = FUZZ_MAX_TOKENS
    query = case.query
    if isinstance(query, dict) and "watch" in query:  # any value: repeated or odd ones may still start one
        query["timeoutSeconds"] = 1
    return case


def _aim_at_a_valid_object(path_parameters: dict[str, Any], body: Any) -> None:
    """Valid names in the URL, and the same ones in the body, so that writes reach the store
    (random names are refused at once). Never the served deployment's name."""
    for key, prefix in (("name", "fuzz"), ("namespace", "ns")):
        if key in path_parameters:
            drawn = str(path_parameters[key]).encode("utf-8", "replace")
            path_parameters[key] = f"{prefix}-{zlib.crc32(drawn) % 50}"
    metadata = body.get("metadata") if isinstance(body, dict) else None
    if isinstance(metadata, dict):
        metadata.update({key: path_parameters[key] for key in ("name", "namespace") if key in path_parameters})


def _fuzz_operation(operation: Any, *, mode: GenerationMode, url: str, token: str, session: requests.Session,
                    tally: Counter, per_operation: defaultdict[str, Counter], failures: list[str]) -> None:
    """Up to the operation's number of examples; every failed check is collected in ``failures``
    (no shrinking against a live server)."""
    strategy = st.tuples(operation.as_strategy(generation_mode=mode), st.sampled_from([True, True, False]))
    count = OPENAI_EXAMPLES if operation.path.startswith("/v1/") else EXAMPLES

    @seed(SEED)
    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(pair: tuple[Any, bool]) -> None:
        case = _cheap(*pair)
        try:
            response = case.call(base_url=url, session=session, headers={"Authorization": f"Bearer {token}"},
                                 timeout=30)
        except requests.RequestException as error:
            tally["no answer"] += 1
            failures.append(f"{mode.value} {case.method} {case.formatted_path}: no answer ({error})\n"
                            f"  reproduce: {case.as_curl_command()}"[:3000])
            return
        tally["cases"] += 1
        too_large = _too_large_resource_version(response)
        tally["504 too large resource version" if too_large else f"{response.status_code // 100}xx"] += 1
        per_operation[f"{case.method} {case.path} {mode.value}"][response.status_code] += 1
        watch = response.headers.get("content-type", [""])[0] == WATCH_CONTENT_TYPE
        try:
            # A watch is a stream of JSON lines, which schemathesis would read as one JSON document.
            checks = [not_a_server_error] if watch else TOO_LARGE_CHECKS if too_large else CHECKS
            case.validate_response(response, checks=checks)
            events = [json.loads(line) for line in response.content.splitlines()] if watch else []
            assert all(set(event) == {"type", "object"} for event in events), response.content[:500]
        except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001  (collected, all reported below)
            failures.append(f"{mode.value} {case.method} {case.formatted_path} -> {response.status_code}: "
                            f"{str(error)[:600]}\n  reproduce: {case.as_curl_command()}")

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        tally["operations without invalid inputs"] += 1  # nothing to break: no parameters, no body


def test_fuzzed_requests_never_get_a_server_error_and_leave_the_node_serving(node) -> None:
    schema = schemathesis.openapi.from_url(node.api_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    tally: Counter = Counter()
    per_operation: defaultdict[str, Counter] = defaultdict(Counter)
    seconds: dict[str, float] = {}
    session = requests.Session()
    failures: list[str] = []
    started = time.monotonic()
    print(f"\nfuzz seed {SEED} (FUZZ_SEED), {EXAMPLES} examples per operation and mode, {OPENAI_EXAMPLES} for /v1 "
          "(FUZZ_EXAMPLES)")
    for operation in operations:
        if (operation.method.upper(), operation.path) in NOT_FUZZED:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            began = time.monotonic()
            _fuzz_operation(operation, mode=mode, url=node.api_url, token=node.secret, session=session,
                            tally=tally, per_operation=per_operation, failures=failures)
            seconds[f"{operation.method.upper()} {operation.path} {mode.value}"] = time.monotonic() - began
    elapsed = time.monotonic() - started
    print(f"fuzz: {tally['cases']} cases over {len(operations) - len(NOT_FUZZED)} operations in {elapsed:.0f} s; "
          f"{dict(sorted((k, v) for k, v in tally.items() if k != 'cases'))}; "
          f"5xx seen: {tally['5xx']}; failed checks: {len(failures)}")
    for name, statuses in sorted(per_operation.items()):
        print(f"  {name}: {dict(sorted(statuses.items()))} in {seconds.get(name, 0):.1f} s")
    assert not failures, "\n".join(failures[:20])
    assert tally["5xx"] == 0
    assert node.running, node.log_text()
    assert node.request("GET", "/healthz")[0] == 200
    assert node.request("GET", "/readyz")[0] == 200
    status, _, answer = node.request("POST", "/v1/completions", timeout=30,
                                     body={"model": DEPLOYMENT, "prompt": "hello", "max_tokens": 4})
    assert status == 200, answer
