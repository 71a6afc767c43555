"""Everything derived from the cluster secret, in one place: nothing else reads the raw secret.

Each key comes from HKDF-SHA256 with its own label, so holding one (a Raft password sniffed off
the LAN, a member proof) tells nothing about the secret or the others. The secret itself is only
the root credential of the API (accepted as admin over TLS or loopback, see server/auth.py).
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAFT_LABEL = b"exo/raft-password/v1"
DATA_PATH_LABEL = b"exo/data-path/v1"
MEMBER_LABEL = b"exo/member-proof/v1"
SALT = b"exo cluster keys"


def derive(secret: str, label: bytes, *, length: int = 32) -> bytes:
    if not secret:
        raise ValueError("cluster secret: must not be empty")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=SALT, info=label).derive(secret.encode())


@dataclass(frozen=True, repr=False)
class ClusterKeys:
    """The keys a node uses; ``repr`` shows none of them (they must never reach a log line)."""
    root: str           # the secret itself: the API's root credential only
    raft_password: str  # PySyncObj's password (it unpickles what this decrypts)
    data_path: str      # presented in the data port's HELLO
    member: str         # node-to-node membership and consistency calls: proves the secret, never sends it

    def __repr__(self) -> str:
        return "ClusterKeys(<redacted>)"

    def is_root(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.root.encode())


def cluster_keys(secret: str) -> ClusterKeys:
    return ClusterKeys(root=secret, raft_password=derive(secret, RAFT_LABEL).hex(),
                       data_path=derive(secret, DATA_PATH_LABEL).hex(), member=derive(secret, MEMBER_LABEL).hex())
