"""The mDNS TXT record of a node and the public cluster id: pure, no network."""
import pytest

from reconciler.discovery.mdns import (
    Announcement, AnnouncementError, cluster_id_from_secret, validate_interfaces,
)

NODE = "3f2b8c1e-8a51-4d8e-9c6a-0d4c6f1b2a10"


def announcement(**overrides) -> Announcement:
    values = dict(cluster_id=cluster_id_from_secret("s3cret"), node_id=NODE, node_name="studio-1",
                  address="192.168.1.20", api_port=52415, raft_port=52416, version="0.1.0")
    return Announcement(**{**values, **overrides})


def test_cluster_id_is_the_same_for_the_same_secret_and_differs_for_another():
    assert cluster_id_from_secret("s3cret") == cluster_id_from_secret("s3cret")
    assert cluster_id_from_secret("s3cret") != cluster_id_from_secret("s3cret2")


def test_cluster_id_is_short_hex_that_does_not_contain_the_secret():
    secret = "abcdef0123456789"
    cid = cluster_id_from_secret(secret)
    assert len(cid) == 16 and int(cid, 16) >= 0
    assert secret not in cid and cid not in secret


def test_cluster_id_refuses_an_empty_secret():
    with pytest.raises(ValueError, match="cluster secret"):
        cluster_id_from_secret("")


def test_announcement_survives_a_txt_round_trip_in_bytes_as_received_from_the_wire():
    original = announcement(formed=True, leader=True)
    wire = {k.encode(): v.encode() for k, v in original.to_txt().items()}
    assert Announcement.from_txt(wire) == original


def test_txt_record_uses_short_keys_and_stays_within_the_dns_string_limit():
    txt = announcement(node_name="n" * 63, version="v" * 64).to_txt()
    assert txt["txtvers"] == "1" and txt["api"] == "52415" and txt["formed"] == "0"
    assert all(len(f"{k}={v}".encode()) <= 255 for k, v in txt.items())


def test_unknown_txt_keys_from_newer_versions_are_ignored():
    txt = {**announcement().to_txt(), "gpu": "m3-ultra"}
    assert Announcement.from_txt(txt) == announcement()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("api", "http", "TXT 'api' (api_port): must be a port number, got 'http'"),
    ("raft", "70000", "TXT 'raft' (raft_port): Input should be less than or equal to 65535"),
    ("formed", "yes", "TXT 'formed' (formed): must be 0 or 1, got 'yes'"),
    ("addr", "fe80::1", "TXT 'addr' (address): Value error, must be an IPv4 address, got 'fe80::1'"),
    ("nid", "node-1", "TXT 'nid' (node_id): Value error, must be a UUID, got 'node-1'"),
    ("cid", "XYZ", "TXT 'cid' (cluster_id): String should match pattern"),
    ("txtvers", "2", "TXT 'txtvers': expected '1', got '2'"),
])
def test_a_bad_txt_value_is_rejected_with_the_key_named(key, value, message):
    with pytest.raises(AnnouncementError) as error:
        Announcement.from_txt({**announcement().to_txt(), key: value})
    assert str(error.value).startswith(message)


def test_a_missing_txt_key_is_named():
    txt = announcement().to_txt()
    del txt["raft"]
    with pytest.raises(AnnouncementError, match=r"TXT 'raft' \(raft_port\): missing"):
        Announcement.from_txt(txt)


def test_non_utf8_txt_is_rejected_not_crashed_on():
    with pytest.raises(AnnouncementError, match="not UTF-8"):
        Announcement.from_txt({b"name": b"\xff\xfe"})


def test_an_uppercase_uuid_is_refused_so_every_node_orders_ids_the_same_way():
    with pytest.raises(ValueError, match="lowercase canonical UUID"):
        announcement(node_id=NODE.upper())


def test_announcement_is_frozen_and_rejects_unknown_fields():
    with pytest.raises(ValueError):
        announcement(color="blue")
    with pytest.raises(ValueError):
        announcement().formed = True  # type: ignore[misc]


def test_api_and_raft_addresses_are_host_colon_port():
    assert announcement().api_address == "192.168.1.20:52415"
    assert announcement().raft_address == "192.168.1.20:52416"


@pytest.mark.parametrize(("interfaces", "message"), [
    ([], "interfaces: give at least one IPv4 address"),
    (["eth0"], "interfaces[0]: must be an IPv4 address, got 'eth0'"),
    (["127.0.0.1", "0.0.0.0"], "interfaces[1]: must be a unicast IPv4 address"),
    (["224.0.0.251"], "interfaces[0]: must be a unicast IPv4 address"),
])
def test_discovery_interfaces_must_be_concrete_ipv4_addresses(interfaces, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_interfaces(interfaces)
