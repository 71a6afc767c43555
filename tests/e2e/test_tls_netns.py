"""Two real ``exo`` nodes on two "hosts" (network namespaces on one bridge), with the defaults beyond
loopback: the API serves HTTPS from the cluster CA and stage traffic is TLS. A raw AF_PACKET
capture on the second host's wire sees the data port carry TLS records only: no frame of the
plaintext protocol, no prompt text and no prompt token ids, while a completion is served."""
import json
import struct
import subprocess
import sys
import time

import pytest

from harness.membership import unique_secret
from harness.serving import manifest
from tests.model_files import TWO_LAYER_LLAMA, write_model
from tests.netns import open_lab, spawn_exo_nodes

pytestmark = pytest.mark.slow

API_PORT, DATA_PORT = 52415, 52417
PROMPT = "confidential zebra umbrella quartz"

# Run on host 0: through its HTTPS API (trusting only the cluster CA), deploy the model over both
# nodes, wait until it serves, complete PROMPT; prints the completion's JSON.
DRIVER = """
import json, ssl, sys, time, urllib.error, urllib.request
base, token, ca, manifest, prompt = sys.argv[1:6]
def call(method, path, body=None, content_type="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, method=method, headers={
        "Authorization": "Bearer " + token, "Content-Type": content_type})
    try:
        context = ssl.create_default_context(cafile=ca)
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (OSError, ValueError) as err:
        return 0, str(err)
deadline = time.monotonic() + 90
def until(what, check):
    while not check():
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for " + what)
        time.sleep(0.3)
def two_ready():
    status, nodes = call("GET", "/apis/exo.dev/v1alpha1/nodes")
    return status == 200 and sum(any(c["type"] == "Ready" and c["status"] == "True"
                                     for c in n.get("status", {}).get("conditions", [])) for n in nodes["items"]) == 2
until("two Ready nodes", two_ready)
status, body = call("PATCH", "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments/tiny", manifest.encode(),
                    "application/apply-patch+yaml")
assert status in (200, 201), body
def serving():
    status, models = call("GET", "/v1/models")
    return status == 200 and any(m["id"] == "tiny" and m.get("ready") for m in models["data"])
until("the model to serve", serving)
status, body = call("POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 8})
assert status == 200, body
print(json.dumps(body))
"""

# Run on host 1: every TCP segment to or from the data port on eth0, as (sport, dport, seq, len) + payload.
CAPTURE = """
import socket, struct, sys
port, out = int(sys.argv[1]), open(sys.argv[2], "wb")
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
sock.bind(("eth0", 0))
print("capturing", flush=True)
while True:
    frame = sock.recv(1 << 18)
    if frame[12:14] != b"\\x08\\x00" or frame[23] != 6:
        continue
    ip = frame[14:]
    ihl, total = (ip[0] & 15) * 4, struct.unpack("!H", ip[2:4])[0] or len(ip)
    tcp = ip[ihl:total]
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    payload = tcp[(tcp[12] >> 4) * 4:]
    if payload and port in (sport, dport):
        out.write(struct.pack("!HHII", sport, dport, seq, len(payload)) + payload)
        out.flush()
"""


def streams(capture: bytes) -> dict[tuple[int, int], bytes]:
    """The captured TCP byte streams by (source port, destination port), in sequence order."""
    segments: dict[tuple[int, int], dict[int, bytes]] = {}
    offset = 0
    while offset + 12 <= len(capture):
        sport, dport, seq, length = struct.unpack_from("!HHII", capture, offset)
        segments.setdefault((sport, dport), {})[seq] = capture[offset + 12: offset + 12 + length]
        offset += 12 + length
    out = {}
    for key, by_seq in segments.items():
        data, expected = bytearray(), None
        for seq in sorted(by_seq):
            payload = by_seq[seq]
            expected = seq if expected is None else expected
            if seq > expected:
                break  # a segment the capture missed: judge the contiguous part
            data += payload[expected - seq:]
            expected = max(expected, seq + len(payload))
        out[key] = bytes(data)
    return out


def tls_records(stream: bytes) -> list[int]:
    """The content types of the TLS records ``stream`` consists of; AssertionError if it is not TLS."""
    types, offset = [], 0
    while offset + 5 <= len(stream):
        kind, major, minor, length = stream[offset], stream[offset + 1], stream[offset + 2], \
            struct.unpack_from("!H", stream, offset + 3)[0]
        assert kind in (20, 21, 22, 23) and major == 3 and minor <= 4 and length <= (1 << 14) + 256, \
            f"not a TLS record at byte {offset}: {stream[offset:offset + 16]!r}"
        types.append(kind)
        offset += 5 + length
    return types


def test_the_data_port_between_two_hosts_carries_only_tls_records(tmp_path):
    model = write_model(tmp_path / "tiny", TWO_LAYER_LLAMA, tokenizer=True)
    secret = unique_secret()
    with open_lab(2) as lab:
        first, second = lab.hosts
        processes, logs = spawn_exo_nodes(lab, data_root=tmp_path, secret=secret, extra_args=(
            "--compute-dtype", "files", "--blas", "bundled"))
        capture_file = tmp_path / "data-port.capture"
        capture = lab.spawn(second, [sys.executable, "-c", CAPTURE, str(DATA_PORT), str(capture_file)],
                            stdout=subprocess.PIPE)
        try:
            assert capture.stdout.readline().strip() == "capturing"
            try:
                driver = lab.run(first, [sys.executable, "-c", DRIVER, f"https://{first.address}:{API_PORT}", secret,
                                         str(tmp_path / "host0" / "cluster-ca.pem"),
                                         manifest("tiny", model, strategy="Spread"), PROMPT], timeout=120)
            except subprocess.CalledProcessError as failed:
                raise AssertionError(failed.stderr + "".join(p.read_text() for p in logs.values())) from None
            completion = json.loads(driver.stdout)
            assert completion["usage"]["completion_tokens"] >= 1
            time.sleep(0.5)  # the last segments reach the capture file
        finally:
            capture.kill()
            for process in processes:
                process.kill()
        captured = streams(capture_file.read_bytes())
        assert sum(map(len, captured.values())) > 2000, f"captured too little: {[len(s) for s in captured.values()]}"
        assert {DATA_PORT} & {port for key in captured for port in key}
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(model / "tokenizer.json")).encode(PROMPT).ids
        as_int32 = struct.pack(f"<{len(ids)}i", *ids)
        for key, stream in captured.items():
            kinds = tls_records(stream)
            assert kinds[:1] == [22], f"{key}: does not start with a TLS handshake"
            assert PROMPT.encode() not in stream and b"zebra" not in stream
            assert as_int32 not in stream
        assert any(23 in tls_records(s) for s in captured.values()), "no encrypted application data seen"
