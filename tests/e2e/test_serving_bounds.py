"""Bounds at the door of a real ``exo`` node serving the tiny model (2,048-token context): over-
context prompts and absurd max_tokens are 400s answered at once, refused sampling values are
400s (never 500s), big bodies 413, and with one slot and one queue place a third request is a 429
with Retry-After; deployments whose names differ only by namespace both get their shards."""
from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from harness.cluster import Cluster, ExoProcess, start_cluster
from harness.serving import API, APPLY, apply, shards_of, wait_nodes_ready, wait_serving

pytestmark = pytest.mark.slow

CONTEXT = 2048  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    cluster: Cluster = start_cluster(1, tmp_path_factory.mktemp("bounds"),
                                     extra_args=["--max-concurrent-requests", "1", "--max-queued-requests", "1"])
    try:
        wait_nodes_ready(cluster, 1)
        entry = cluster.nodes[0]
        apply(entry, "tiny", model_dir, strategy="Pack")
        wait_serving(entry, "tiny", stages=1)
        yield entry
    finally:
        cluster.close()
        print(cluster.logs())


def complete(node: ExoProcess, **fields) -> tuple[int, dict[str, str], dict]:
    return node.request("POST", "/v1/completions", body={"model": "tiny", **fields}, timeout=60.0)


def openai_error(answer: tuple[int, dict[str, str], dict], status: int) -> dict:
    code, _, body = answer
    assert code == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_a_prompt_beyond_the_context_is_a_400_naming_the_numbers_in_well_under_a_second(node):
    started = time.monotonic()
    error = openai_error(complete(node, prompt=[5] * 2102, max_tokens=512), 400)
    took = time.monotonic() - started
    assert error["message"] == ("prompt has 2102 tokens and max_tokens is 512: 2614 exceed the model's "
                                "context length of 2048")
    assert error["code"] == "context_length_exceeded" and took < 1.0, took
    print(f"2102 prompt tokens refused in {took * 1000:.0f} ms")


@pytest.mark.parametrize(("words", "says"), [(20_000, "prompt has 20014 tokens: the model's context length is 2048"),
                                             (200_000, "prompt has at least")])
def test_a_long_text_up_to_the_body_limit_is_refused_in_well_under_a_second(node, words, says):
    started = time.monotonic()  # counted after tokenizing, or refused at once when it cannot fit
    chat = node.request("POST", "/v1/chat/completions", timeout=60.0,
                        body={"model": "tiny", "messages": [{"role": "user", "content": "word " * words}]})
    took = time.monotonic() - started
    error = openai_error(chat, 400)
    assert error["param"] == "messages" and says in error["message"], error
    assert took < 1.0, took
    print(f"{words * 5} characters refused in {took * 1000:.0f} ms")


@pytest.mark.parametrize("max_tokens", [10**7, 10**12])
def test_an_absurd_max_tokens_is_a_400(node, max_tokens):
    error = openai_error(complete(node, prompt="Once upon a time", max_tokens=max_tokens), 400)
    assert error["param"] == "max_tokens" and str(max_tokens) in error["message"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": -1}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"seed": 2**64}, "seed"), ({"seed": "7"}, "seed"), ({"max_tokens": 0}, "max_tokens"),
])
def test_a_sampling_value_the_data_path_refuses_is_a_400_naming_it(node, fields, param):
    error = openai_error(complete(node, prompt="Once upon a time", **fields), 400)
    assert error["param"] == param and error["message"].startswith(param + ":")


@pytest.mark.parametrize("fields", [{"top_p": 0, "temperature": 0.9}, {"seed": -1, "temperature": 1.0},
                                    {"seed": 2**64 - 1, "temperature": 1.0}])
def test_top_p_zero_and_any_64_bit_seed_are_served(node, fields):
    status, _, body = complete(node, prompt="Once upon a time", max_tokens=2, **fields)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] <= 2


def test_top_p_zero_answers_what_greedy_answers(node):
    texts = {}
    for fields in ({"temperature": 0}, {"top_p": 0, "temperature": 1.5}):
        _, _, body = complete(node, prompt="Once upon a time", max_tokens=4, **fields)
        texts[json.dumps(fields)] = body["choices"][0]["text"]
    assert len(set(texts.values())) == 1, texts


def test_a_body_over_one_mebibyte_is_a_413(node):
    body = json.dumps({"model": "tiny", "prompt": "a" * (2 << 20)})
    error = openai_error(node.request("POST", "/v1/completions", body=body, timeout=60.0), 413)
    assert error["code"] == "request_too_large" and str(1 << 20) in error["message"]


def test_beyond_one_slot_and_one_queue_place_the_third_request_is_a_429_with_retry_after(node):
    long = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "stream": True}
    first = open_request(node, long, receive_buffer=4096)  # a slow reader: its stream stays in flight
    read_events(first, 2)                                  # generating: the one slot is taken
    second = open_request(node, long)
    wait_metric(node, "exo_inference_queued", 1)
    status, headers, body = complete(node, prompt="Hi", max_tokens=2)
    error = openai_error((status, headers, body), 429)
    assert headers["Retry-After"] == "1" and error["code"] == "rate_limit_exceeded"
    assert metric(node, "exo_inference_rejected_total") == 1
    second.close()                                          # its client leaves while queued
    wait_metric(node, "exo_inference_queued", 0)
    first.close()                                           # and this one while generating
    status, _, body = complete(node, prompt="Hi", max_tokens=2)
    assert status == 200, body


def test_a_dotted_name_and_the_same_words_split_by_namespace_both_get_shards(node, model_dir):
    apply(node, "a.b", model_dir, strategy="Pack")
    manifest = (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: a\n  namespace: b\n"
                f"spec:\n  model:\n    source: {model_dir}\n  placement:\n    strategy: Pack\n")
    status, _, answer = node.request("PATCH", f"{API}/namespaces/b/modeldeployments/a", body=manifest,
                                     content_type=APPLY)
    assert status in (200, 201), answer
    try:
        deadline = time.monotonic() + 20
        while True:
            _, _, listing = node.request("GET", f"{API}/shards")
            owners = {s["metadata"]["name"]: s["spec"]["deployment"] for s in listing["items"]}
            if {"default/a.b", "b/a"} <= set(owners.values()):
                break
            assert time.monotonic() < deadline, owners
            time.sleep(0.1)
        assert owners["a.b-r0-s0"] == "default/a.b" and shards_of(node, "a.b")
    finally:
        node.request("DELETE", f"{API}/namespaces/default/modeldeployments/a.b")
        node.request("DELETE", f"{API}/namespaces/b/modeldeployments/a")


# --- raw HTTP for requests held open ----------------------------------------------------------

def open_request(node: ExoProcess, body: dict, *, receive_buffer: int | None = None) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", node.api_port))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {node.secret}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    sock.sendall(head.encode() + data)
    return sock


def read_events(sock: socket.socket, count: int) -> bytes:
    received = b""
    while received.count(b"data: ") < count:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received
    return received


def metric(node: ExoProcess, name: str) -> float:
    status, _, text = node.request("GET", "/metrics")
    assert status == 200, text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_metric(node: ExoProcess, name: str, value: float, *, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(node, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.05)
