"""The network-namespace harness itself: hosts on one bridge, and nothing left behind."""
import os
import subprocess
import sys

import pytest

from tests.netns import NetnsLab, NetnsUnavailable, open_lab

CONNECT = ("import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"
           ".sendall(b'hello')")
SERVE = ("import socket, sys; s = socket.create_server((sys.argv[1], 47001)); print('ready', flush=True); "
         "c, addr = s.accept(); print(addr[0], c.recv(5).decode(), flush=True)")


def test_hosts_have_their_own_address_and_reach_each_other_over_the_bridge():
    with open_lab(2) as lab:
        a, b = lab.hosts
        links = lab.run(a, ["ip", "-br", "-4", "addr"]).stdout.split("\n")
        assert any(line.startswith("lo ") and "127.0.0.1" in line for line in links)
        assert any(line.startswith("eth0") and "10.213.0.1/24" in line for line in links)
        server = lab.spawn(b, [sys.executable, "-c", SERVE, b.address], stdout=subprocess.PIPE)
        assert server.stdout.readline().strip() == "ready"
        lab.run(a, [sys.executable, "-c", CONNECT, b.address, "47001"])
        assert server.stdout.readline().split() == [a.address, "hello"]


def test_a_failing_test_still_leaves_no_namespace_or_process_behind():
    lab = None
    with pytest.raises(RuntimeError, match="boom"):
        with open_lab(2) as lab:
            sleeper = lab.spawn(lab.hosts[0], ["sleep", "300"])
            raise RuntimeError("boom")
    assert lab is not None and lab.leftovers() == []
    assert sleeper.poll() is not None


def test_two_labs_at_once_get_distinct_names_that_include_the_pid():
    with open_lab(1) as first, open_lab(1) as second:
        assert first.prefix != second.prefix
        assert str(os.getpid()) in first.prefix
        assert first.leftovers() and second.leftovers()


def test_without_root_the_lab_refuses_with_a_clear_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsUnavailable, match="need root"):
        with NetnsLab(1):
            pass


def test_only_private_subnets_are_accepted():
    with pytest.raises(ValueError, match="not a private range"):
        NetnsLab(2, subnet="8.8.8.0/24")
