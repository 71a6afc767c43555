"""The cluster CA and each node's serving certificate.

The first node makes an EC P-256 CA in its data dir. It is replicated through the Raft state as a
``ClusterCA`` object whose private key is sealed with AES-GCM under a key derived from the
cluster secret (the certificate is the associated data, so a peer that can open the key also knows
the certificate is genuine). Replicated state rather than a hand-over at join: every member gets
it from any leader, it survives the first node, and "create if absent" settles a race in the log.
Each node signs its own serving certificate (its addresses as SANs) with the CA once it holds it.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import os
import secrets
import socket
import ssl
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reconciler.cluster_keys import derive

if TYPE_CHECKING:
    from reconciler.datapath.wire import DataPathTLS

log = logging.getLogger(__name__)

CA_OBJECT = ("ClusterCA", "", "cluster-ca")  # store key of the replicated CA
CA_KEY_LABEL = b"exo/cluster-ca-key/v1"
CA_CERT_FILE = "cluster-ca.pem"
CA_KEY_FILE = "cluster-ca-key.pem"
NODE_CERT_FILE = "node-cert.pem"
NODE_KEY_FILE = "node-key.pem"
CA_DAYS = 3650
NODE_DAYS = 365
TLS_MODES = ("auto", "on", "off")


class TLSError(Exception):
    """The CA or a certificate cannot be used; the message names the file or field."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serves_https(mode: str, host: str) -> bool:
    """--tls auto: HTTPS when bound beyond loopback (0.0.0.0 included); on/off force it."""
    if mode not in TLS_MODES:
        raise ValueError(f"--tls: must be one of {', '.join(TLS_MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and not is_loopback(host))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


@dataclass(frozen=True, repr=False)
class ClusterCA:
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return f"ClusterCA({self.certificate.subject.rfc4514_string()})"

    @classmethod
    def create(cls, *, cluster: str = "exo") -> ClusterCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} cluster CA {secrets.token_hex(4)}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def _private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    # -- replication ----------------------------------------------------------------------

    def seal(self, secret: str) -> dict[str, str]:
        """The spec of the replicated ClusterCA object: the certificate, and the key under AES-GCM."""
        nonce = os.urandom(12)
        sealed = AESGCM(derive(secret, CA_KEY_LABEL)).encrypt(nonce, self.key_pem, self.cert_pem)
        return {"certificate": self.cert_pem.decode(), "sealedKey": base64.b64encode(nonce + sealed).decode()}

    @classmethod
    def unseal(cls, spec: Any, secret: str) -> ClusterCA:
        if not isinstance(spec, dict) or not isinstance(spec.get("certificate"), str) \
                or not isinstance(spec.get("sealedKey"), str):
            raise TLSError("ClusterCA.spec: needs the strings certificate and sealedKey")
        cert_pem = spec["certificate"].encode()
        try:
            raw = base64.b64decode(spec["sealedKey"], validate=True)
            key_pem = AESGCM(derive(secret, CA_KEY_LABEL)).decrypt(raw[:12], raw[12:], cert_pem)
        except (ValueError, InvalidTag):
            raise TLSError("ClusterCA.spec.sealedKey: does not open with this cluster's secret") from None
        return cls(cert_pem, key_pem)

    # -- files ----------------------------------------------------------------------------

    def save(self, data_dir: Path) -> None:
        (data_dir / CA_CERT_FILE).write_bytes(self.cert_pem)
        _write_private(data_dir / CA_KEY_FILE, self.key_pem)

    @classmethod
    def load(cls, data_dir: Path) -> ClusterCA | None:
        cert, key = data_dir / CA_CERT_FILE, data_dir / CA_KEY_FILE
        if not cert.exists() or not key.exists():
            return None
        ca = cls(cert.read_bytes(), key.read_bytes())
        try:
            ca.certificate, ca._private_key()
        except ValueError as exc:
            raise TLSError(f"{cert} / {key}: not a PEM certificate and key ({exc}); remove them") from None
        return ca

    # -- node certificates ----------------------------------------------------------------

    def issue(self, *, node: str, hosts: list[str]) -> tuple[bytes, bytes]:
        """A serving (and client) certificate for ``hosts`` (IPs or DNS names): (cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        ca_cert = self.certificate
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(_now() + datetime.timedelta(days=NODE_DAYS))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                               critical=False)
                .sign(self._private_key(), hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def node_hosts(*, host: str, advertise_host: str) -> list[str]:
    """The names a node is reached by: its addresses, its hostname, and loopback."""
    names = [advertise_host, "127.0.0.1", "localhost", socket.gethostname()]
    if host not in ("0.0.0.0", "::", ""):
        names.insert(1, host)
    return [n for n in dict.fromkeys(names) if n]


def _covers(cert_path: Path, *, ca: ClusterCA, hosts: list[str]) -> bool:
    """Whether the saved node certificate is from ``ca``, valid for a month more, and names ``hosts``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    named = {str(v) for v in sans.get_values_for_type(x509.IPAddress)} | set(sans.get_values_for_type(x509.DNSName))
    fresh = cert.not_valid_after_utc > _now() + datetime.timedelta(days=30)
    return cert.issuer == ca.certificate.subject and fresh and set(hosts) <= named


@dataclass(frozen=True)
class NodeCertificate:
    """Paths of what a node serves with and trusts, and one server and one client context made
    from them (shared by the API port, the data port and node-to-node calls)."""
    ca_path: Path
    cert_path: Path
    key_path: Path

    @cached_property
    def server(self) -> ssl.SSLContext:
        return self.server_context()

    @cached_property
    def client(self) -> ssl.SSLContext:
        return self.client_context()

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        """Trusts the cluster CA only. Any member's certificate will do (membership is what the
        CA signs), so host names are not checked between nodes."""
        return cluster_client_context(self.ca_path, check_hostname=False)

    def data_path(self, *, loopback: bool = False) -> DataPathTLS:
        from reconciler.datapath.wire import DataPathTLS

        return DataPathTLS(server=self.server, client=self.client, loopback=loopback)


def cluster_client_context(ca: Path | str, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that trusts exactly the cluster CA (a path or PEM text)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if isinstance(ca, Path):
            context.load_verify_locations(cafile=str(ca))
        else:
            context.load_verify_locations(cadata=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cluster CA {ca if isinstance(ca, Path) else '(PEM)'}: cannot be loaded ({exc})") from None
    context.check_hostname = check_hostname
    return context


def ensure_node_certificate(ca: ClusterCA, *, data_dir: Path, node: str, hosts: list[str]) -> NodeCertificate:
    """Write the CA certificate and (re)issue this node's certificate when it is missing, from
    another CA, near expiry, or lacks one of ``hosts``."""
    paths = NodeCertificate(data_dir / CA_CERT_FILE, data_dir / NODE_CERT_FILE, data_dir / NODE_KEY_FILE)
    if ClusterCA.load(data_dir) != ca:
        ca.save(data_dir)
    if not (paths.key_path.exists() and _covers(paths.cert_path, ca=ca, hosts=hosts)):
        cert, key = ca.issue(node=node, hosts=hosts)
        _write_private(paths.key_path, key)
        paths.cert_path.write_bytes(cert)
        log.info("issued this node's certificate from the cluster CA for %s", ", ".join(hosts))
    return paths


async def replicated_ca(store: Any, *, secret: str, data_dir: Path, timeout_s: float,
                        poll_s: float = 0.2) -> ClusterCA:
    """The cluster's CA from the replicated state; when there is none yet, propose this node's
    (from its data dir, or a new one) with "create if absent": the first committed one wins."""
    from reconciler.store.base import StoreError, StoreUnavailable, make_command

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    proposed: ClusterCA | None = None
    while True:
        obj = store.get(CA_OBJECT)
        if obj is not None:
            ca = ClusterCA.unseal(obj.get("spec"), secret)
            if proposed is not None and ca != proposed:
                log.info("adopted the cluster CA another node made first")
            return ca
        if store.has_quorum:
            proposed = proposed or ClusterCA.load(data_dir) or ClusterCA.create()
            body = {"apiVersion": "exo.dev/v1alpha1", "kind": CA_OBJECT[0],
                    "metadata": {"name": CA_OBJECT[2]}, "spec": proposed.seal(secret)}
            try:
                await store.submit(make_command("create", CA_OBJECT, body=body), timeout=5.0)
            except (StoreError, StoreUnavailable) as exc:  # AlreadyExists: read the winner next round
                log.debug("proposing the cluster CA: %s", exc)
        if loop.time() > deadline:
            raise TLSError(f"no cluster CA in the replicated state after {timeout_s:g}s (no quorum?)")
        await asyncio.sleep(poll_s)


async def node_certificate(store: Any, *, config: Any, timeout_s: float) -> NodeCertificate:
    """This node's certificate: at once when its data dir holds the CA (a restart needs no
    quorum), else once the replicated CA is known (the first node makes it)."""
    hosts = node_hosts(host=config.host, advertise_host=config.advertise_host)
    ca = ClusterCA.load(config.data_dir) or await replicated_ca(
        store, secret=config.secret, data_dir=config.data_dir, timeout_s=timeout_s)
    return ensure_node_certificate(ca, data_dir=config.data_dir, node=config.name, hosts=hosts)


async def follow_replicated_ca(store: Any, *, config: Any, certificate: NodeCertificate,
                               retry_s: float = 5.0) -> None:
    """Make sure the CA this node serves with is the replicated one (proposing it when the state
    has none); a different one replaces it: new handshakes use a certificate from it."""
    while True:
        try:
            ca = await replicated_ca(store, secret=config.secret, data_dir=config.data_dir, timeout_s=60.0)
            break
        except TLSError as exc:
            log.debug("cluster CA: %s", exc)
            await asyncio.sleep(retry_s)
    if ClusterCA.load(config.data_dir) == ca:
        return
    log.warning("this node's CA differs from the cluster's replicated one: switching to the cluster's")
    ensure_node_certificate(ca, data_dir=config.data_dir, node=config.name,
                            hosts=node_hosts(host=config.host, advertise_host=config.advertise_host))
    certificate.server.load_cert_chain(certificate.cert_path, certificate.key_path)
    certificate.client.load_verify_locations(cafile=str(certificate.ca_path))
