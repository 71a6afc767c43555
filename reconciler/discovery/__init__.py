"""Zero-config discovery (mDNS) and the decision that turns simultaneous first starts into one
cluster. mDNS finds candidates only; liveness is judged through Raft."""
from reconciler.discovery.bootstrap import (
    Bootstrap, Bootstrapped, Decision, Join, Joined, Wait, decide, run_bootstrap,
)
from reconciler.discovery.mdns import (
    SERVICE_TYPE, Announcement, AnnouncementError, CandidateEvent, MdnsDiscovery,
    cluster_id_from_secret,
)

__all__ = [
    "SERVICE_TYPE", "Announcement", "AnnouncementError", "Bootstrap", "Bootstrapped",
    "CandidateEvent", "Decision", "Join", "Joined", "MdnsDiscovery", "Wait",
    "cluster_id_from_secret", "decide", "run_bootstrap",
]
