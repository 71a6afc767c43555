"""Test helper run inside a network namespace: start MdnsDiscovery on one address, print one
JSON line once ``--expect`` candidates are seen (or after ``--timeout``), then keep announcing
until stdin closes.

    python tests/discovery/mdns_peer.py --address 10.213.0.1 --cluster-id ... --node-id ...
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from reconciler.discovery.mdns import Announcement, MdnsDiscovery

MDNS_GROUP_HEX = "FB0000E0"  # 224.0.0.251 as /proc/net/igmp writes it


def devices_joined_to_mdns_group() -> list[str]:
    """Devices in this namespace with a 224.0.0.251 membership, read from /proc/net/igmp."""
    devices, device = [], None
    with open("/proc/net/igmp") as igmp:
        for line in igmp.read().splitlines()[1:]:
            if line[:1].isdigit():
                device = line.split()[1]
            elif line.split() and line.split()[0] == MDNS_GROUP_HEX and device:
                devices.append(device)
    return sorted(set(devices))


async def main(args: argparse.Namespace) -> None:
    announcement = Announcement(cluster_id=args.cluster_id, node_id=args.node_id,
                                node_name=args.name, address=args.address, api_port=args.api_port,
                                raft_port=52416, version="test")
    discovery = MdnsDiscovery(announcement=announcement, interfaces=[args.address])
    await discovery.start()
    started = time.monotonic()
    try:
        while len(discovery.candidates()) < args.expect and time.monotonic() - started < args.timeout:
            await asyncio.sleep(0.05)
        report = {
            "node_id": args.node_id,
            "seconds": round(time.monotonic() - started, 3),
            "candidates": {node: c.address for node, c in discovery.candidates().items()},
            "mdns_group_devices": devices_joined_to_mdns_group(),
        }
        print(json.dumps(report), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await discovery.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--cluster-id", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--name", default="peer")
    parser.add_argument("--api-port", type=int, default=52415)
    parser.add_argument("--expect", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0)
    asyncio.run(main(parser.parse_args()))
