"""The cluster CA: sealed under the secret in the replicated state, one CA per cluster however
nodes race to make it, and node certificates that name the node's addresses."""
import asyncio
import ipaddress
import ssl

import pytest
from cryptography import x509

from reconciler.store.memory import MemoryStore
from reconciler.tls import (CA_OBJECT, ClusterCA, TLSError, cluster_client_context, ensure_node_certificate,
                            replicated_ca, serves_https)


def test_the_sealed_key_opens_only_with_the_cluster_secret():
    ca = ClusterCA.create()
    spec = ca.seal("the-secret")
    assert ca.key_pem.decode() not in str(spec)
    assert ClusterCA.unseal(spec, "the-secret") == ca
    with pytest.raises(TLSError, match="sealedKey"):
        ClusterCA.unseal(spec, "another-secret")


def test_a_swapped_certificate_is_refused_even_with_the_right_secret():
    spec = ClusterCA.create().seal("s")
    forged = {**spec, "certificate": ClusterCA.create().cert_pem.decode()}
    with pytest.raises(TLSError, match="sealedKey"):
        ClusterCA.unseal(forged, "s")


def test_a_malformed_spec_names_the_field():
    with pytest.raises(TLSError, match="ClusterCA.spec"):
        ClusterCA.unseal({"certificate": 3}, "s")


def test_a_node_certificate_names_its_addresses_and_chains_to_the_ca(tmp_path):
    ca = ClusterCA.create()
    paths = ensure_node_certificate(ca, data_dir=tmp_path, node="n1", hosts=["10.1.2.3", "127.0.0.1", "n1.lan"])
    cert = x509.load_pem_x509_certificate(paths.cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.1.2.3"),
                                                             ipaddress.ip_address("127.0.0.1")}
    assert sans.get_values_for_type(x509.DNSName) == ["n1.lan"]
    cert.verify_directly_issued_by(ca.certificate)
    assert paths.key_path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cluster-ca-key.pem").stat().st_mode & 0o777 == 0o600


def test_the_node_certificate_is_reissued_only_when_an_address_or_the_ca_changes(tmp_path):
    ca = ClusterCA.create()
    first = ensure_node_certificate(ca, data_dir=tmp_path, node="n1", hosts=["127.0.0.1"]).cert_path.read_bytes()
    assert ensure_node_certificate(ca, data_dir=tmp_path, node="n1", hosts=["127.0.0.1"]).cert_path.read_bytes() == first
    moved = ensure_node_certificate(ca, data_dir=tmp_path, node="n1", hosts=["127.0.0.1", "10.0.0.9"])
    assert moved.cert_path.read_bytes() != first
    other = ClusterCA.create()
    ensure_node_certificate(other, data_dir=tmp_path, node="n1", hosts=["127.0.0.1", "10.0.0.9"])
    cert = x509.load_pem_x509_certificate(moved.cert_path.read_bytes())
    cert.verify_directly_issued_by(other.certificate)
    assert ClusterCA.load(tmp_path) == other


async def test_nodes_racing_to_make_the_ca_all_end_up_with_the_one_committed_first(tmp_path):
    store = MemoryStore()
    dirs = [tmp_path / f"n{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    cas = await asyncio.gather(*(replicated_ca(store, secret="s", data_dir=d, timeout_s=5) for d in dirs))
    assert cas[0] == cas[1] == cas[2]
    assert ClusterCA.unseal(store.get(CA_OBJECT)["spec"], "s") == cas[0]


async def test_a_node_keeps_the_ca_already_in_its_data_dir_when_it_proposes_one(tmp_path):
    ClusterCA.create().save(tmp_path)
    store = MemoryStore()
    assert await replicated_ca(store, secret="s", data_dir=tmp_path, timeout_s=5) == ClusterCA.load(tmp_path)


async def test_without_quorum_and_without_a_replicated_ca_the_wait_ends_with_a_clear_error(tmp_path):
    with pytest.raises(TLSError, match="no cluster CA"):
        await replicated_ca(MemoryStore(quorum=False), secret="s", data_dir=tmp_path, timeout_s=0.3, poll_s=0.05)


def test_a_client_context_from_the_ca_trusts_nothing_else(tmp_path):
    ca = ClusterCA.create()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    context = cluster_client_context(tmp_path / "ca.pem")
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1
    with pytest.raises(TLSError, match="missing.pem"):
        cluster_client_context(tmp_path / "missing.pem")


@pytest.mark.parametrize(("mode", "host", "https"), [
    ("auto", "127.0.0.1", False), ("auto", "0.0.0.0", True), ("auto", "10.0.0.2", True),
    ("on", "127.0.0.1", True), ("off", "10.0.0.2", False)])
def test_https_is_served_beyond_loopback_unless_turned_off(mode, host, https):
    assert serves_https(mode, host) is https


def test_an_unknown_tls_mode_names_the_flag():
    with pytest.raises(ValueError, match="--tls"):
        serves_https("yes", "127.0.0.1")


async def test_a_node_whose_ca_differs_from_the_replicated_one_switches_to_it(tmp_path):
    from types import SimpleNamespace

    from reconciler.tls import follow_replicated_ca, node_certificate

    store = MemoryStore()
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    cluster_ca = await replicated_ca(store, secret="s", data_dir=other_dir, timeout_s=5)
    ClusterCA.create().save(tmp_path)  # this node made its own while it was cut off
    config = SimpleNamespace(host="127.0.0.1", advertise_host="127.0.0.1", data_dir=tmp_path, name="n1", secret="s")
    certificate = await node_certificate(store, config=config, timeout_s=5)
    assert ClusterCA.load(tmp_path) != cluster_ca
    certificate.server  # the contexts the node serves with, made before the switch
    await follow_replicated_ca(store, config=config, certificate=certificate)
    assert ClusterCA.load(tmp_path) == cluster_ca
    x509.load_pem_x509_certificate(certificate.cert_path.read_bytes()).verify_directly_issued_by(
        cluster_ca.certificate)
