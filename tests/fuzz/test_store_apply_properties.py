"""Property tests of the pure ``apply(state, command)``: random sequences of commands, well-formed
or not, give only results (a refusal is ``ok: false`` with a code), never an exception; a refused
command leaves the objects, revision and history exactly as they were; the input state is never
modified; and replaying the same commands gives the same state (every replica agrees).

    FUZZ_SEED=1234 uv run pytest -q tests/fuzz/test_store_apply_properties.py -s
"""
from __future__ import annotations

import copy
import json
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from reconciler.server.app import create_app
from reconciler.store.memory import MemoryStore
from reconciler.store.state import LAST_APPLIED, OPS, StoreState, apply
from tests.fuzz.seeds import SEED, examples

EXAMPLES = examples(300)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=8)
WORDS = st.sampled_from(["a", "b", "llama", ""])
STRING_MAPS = st.dictionaries(st.sampled_from(["app", "tier", LAST_APPLIED]),
                              st.sampled_from(["x", "y", "{}", "not json", '{"metadata": 5}', "[1]"]), max_size=2)
METADATA = st.fixed_dictionaries({"name": WORDS}, optional={
    "namespace": WORDS, "labels": STRING_MAPS | JSON, "annotations": STRING_MAPS | JSON,
    "resourceVersion": st.sampled_from(["1", "2"]), "uid": WORDS})
BODIES = st.fixed_dictionaries({}, optional={
    "apiVersion": st.just("exo.dev/v1alpha1"), "kind": st.sampled_from(["ModelDeployment", "Shard"]),
    "metadata": METADATA | JSON, "spec": st.fixed_dictionaries({"replicas": st.integers(0, 3)}) | JSON,
    "status": JSON})
WELL_FORMED = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS), "kind": st.sampled_from(["ModelDeployment", "Shard", "Lease"]), "namespace": WORDS,
     "name": st.sampled_from(["a", "b"]), "now": st.just("2026-12-01T00:00:00Z"), "uid": st.sampled_from(["u1", "u2"])},
    optional={"opId": st.sampled_from(["op1", "op2", "op3", ""]), "object": BODIES,
              "expectedResourceVersion": st.sampled_from(["0", "1", "2", "3"]), "expectedUid": st.sampled_from(["u1", "u2"])})
FIELDS = ["op", "kind", "namespace", "name", "now", "uid", "opId", "object", "expectedResourceVersion", "expectedUid"]
MALFORMED = WELL_FORMED.flatmap(lambda command: st.fixed_dictionaries(
    {"field": st.sampled_from(FIELDS), "value": JSON | st.sampled_from(list(OPS))}).map(
    lambda change: {**command, change["field"]: change["value"]}))
COMMANDS = st.lists(WELL_FORMED | MALFORMED | JSON, min_size=1, max_size=25)


def fuzz_settings(function):
    return seed(SEED)(settings(max_examples=EXAMPLES, deadline=None, database=None,
                               suppress_health_check=[HealthCheck.too_slow])(function))


def snapshot(state: StoreState) -> str:
    """Everything a reader can observe, as canonical JSON."""
    return json.dumps({"revision": state.revision, "objects": sorted([list(k), v] for k, v in state.objects.items()),
                       "history": [[e.type, e.revision, e.object] for e in state.history_for(None)]}, sort_keys=True)


def fold(commands: list[Any]) -> tuple[StoreState, list[dict[str, Any]]]:
    state, results = StoreState(), []
    for command in commands:
        before, frozen = snapshot(state), copy.deepcopy(command)
        after, result = apply(state, command)
        assert snapshot(state) == before, "apply modified its input state"
        assert command == frozen, "apply modified its command"
        assert isinstance(result.get("ok"), bool), result
        if result["ok"]:
            assert after.revision in (state.revision, state.revision + 1)
        else:
            assert isinstance(result["code"], int) and 400 <= result["code"] < 500, result
            assert isinstance(result["message"], str) and result["message"]
            assert snapshot(after) == before, f"refused command changed the state: {command!r} -> {result}"
        json.dumps(result)  # results travel back to the proposer as JSON
        state = after
        results.append(result)
    return state, results


@fuzz_settings
@given(COMMANDS)
def test_random_commands_give_results_and_refusals_change_nothing(commands: list[Any]) -> None:
    fold(commands)


@fuzz_settings
@given(COMMANDS)
def test_replaying_the_same_commands_gives_the_same_state(commands: list[Any]) -> None:
    first, first_results = fold(commands)
    second, second_results = fold(json.loads(json.dumps(commands)))
    assert snapshot(first) == snapshot(second)
    assert first_results == second_results


def test_apply_over_a_corrupt_last_applied_annotation_still_merges() -> None:
    base = {"op": "create", "kind": "ModelDeployment", "namespace": "default", "name": "a", "now": "t", "uid": "u",
            "object": {"metadata": {"name": "a", "labels": {"app": "x"}, "annotations": {LAST_APPLIED: "not json"}},
                       "spec": {"replicas": 1}}}
    state, created = apply(StoreState(), base)
    assert created["ok"], created
    state, applied = apply(state, {**base, "op": "apply", "object": {"metadata": {"name": "a"}, "spec": {"replicas": 2}}})
    assert applied["ok"] and applied["object"]["metadata"]["labels"] == {"app": "x"}, applied
    assert applied["object"]["spec"] == {"replicas": 2}


async def test_server_side_apply_over_a_hand_written_last_applied_annotation_is_not_a_server_error() -> None:
    """Found by the properties above: a user-set, non-JSON last-applied annotation made the next
    apply raise inside ``apply`` (a 500, and on Raft an exception on every replica)."""
    app = create_app(store=MemoryStore(), token="t", node_name="node-a")
    path = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"
    body = {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "a", "annotations": {LAST_APPLIED: "not json"}},
            "spec": {"model": {"source": "/models/a"}}}
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        created = await client.post(path, json=body, headers={"Authorization": "Bearer t"})
        assert created.status == 201, await created.text()
        applied = await client.patch(f"{path}/a", data=json.dumps({**body, "spec": {"model": {"source": "/models/b"}}}),
                                     headers={"Authorization": "Bearer t", "Content-Type": "application/apply-patch+yaml"})
        assert applied.status == 200, await applied.text()
        assert (await applied.json())["spec"]["model"]["source"] == "/models/b"
