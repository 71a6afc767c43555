"""``exoctl demo`` as a user runs it: a subprocess with its own HOME, a second ``exoctl`` that needs
no flags while it serves, Ctrl-C that stops every node and puts the config file back, and a
demo started again at once on the same ports (their TIME-WAIT connections do not block it)."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from exo_ctl.cli.demo import INTERRUPTS, _poll, port_in_use
from harness.cluster import free_port_block, time_wait_ports

ROOT = Path(__file__).resolve().parents[2]
EXOCTL = [sys.executable, "-m", "exo_ctl.cli.main"]


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """A user of their own: HOME and XDG dirs in tmp_path; the model cache shared (built once)."""
    from exo_ctl.model_builder.build_model import build_model, default_cache_dir

    build_model("tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXOCTL_", "EXO_CLUSTER", "XDG_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               XDG_DATA_HOME=str(tmp_path / "data"), EXO_MODEL_CACHE=str(default_cache_dir()))
    return env


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    found: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            found.put(line)
        found.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return found


def wait_for_line(lines: queue.Queue[str | None], text: str, seen: list[str], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            raise AssertionError("the demo exited early:\n" + "".join(seen))
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"no {text!r} line after {timeout}s:\n" + "".join(seen))


@contextmanager
def running_demo(env: dict[str, str], *args: str) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str | None],
                                                                   list[str]]]:
    """``exoctl demo ARGS`` as a user starts it: (the process, its lines as they come, the lines
    read so far); killed at the end if still running, its output printed."""
    demo = subprocess.Popen([*EXOCTL, "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    seen: list[str] = []
    try:
        yield demo, lines_of(demo), seen
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        print("".join(seen))


def node_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "reconciler.main" in cmdline and any(str(data_dir) in part for part in cmdline):
            found.append(proc)
    return found


@pytest.mark.slow
def test_the_demo_serves_a_three_node_cluster_that_exoctl_reaches_without_flags_until_ctrl_c_and_starts_again_at_once(
        user_env, tmp_path):
    config_file = tmp_path / "config" / "exoctl" / "config.yaml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text("server: http://127.0.0.1:1\ntoken: the-users-own\n")
    before = config_file.read_bytes()
    port = free_port_block(set(), size=9)
    data_dir = tmp_path / "demo"
    with running_demo(user_env, "--api-port", str(port), "--data-dir", str(data_dir), "--max-tokens", "8") as (
            demo, lines, seen):
        wait_for_line(lines, "serving at", seen, timeout=120)
        assert len(node_processes(data_dir)) == 3

        got = subprocess.run([*EXOCTL, "get", "nodes"], capture_output=True, text=True, env=user_env, cwd=ROOT,
                             timeout=30)
        assert got.returncode == 0, got.stderr
        rows = got.stdout.strip().splitlines()[1:]
        assert sorted(row.split()[:2] for row in rows) == [["demo-0", "Ready"], ["demo-1", "Ready"],
                                                           ["demo-2", "Ready"]]
        shards = subprocess.run([*EXOCTL, "get", "shards"], capture_output=True, text=True, env=user_env, cwd=ROOT,
                                timeout=30)
        assert len(shards.stdout.strip().splitlines()) == 4, shards.stdout + shards.stderr

        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
        time.sleep(0.2)
        while (line := lines.get(timeout=5)) is not None:
            seen.append(line)
    assert "exoctl demo: stopped 3 nodes\n" in seen
    assert not [line for line in seen if "warning" in line or "Traceback" in line]
    assert node_processes(data_dir) == []
    assert config_file.read_bytes() == before

    # Started again at once: the ports still hold TIME-WAIT connections, and that must not matter.
    assert time_wait_ports(range(port, port + 9)), "the first demo should leave connections in TIME-WAIT"
    with running_demo(user_env, "--api-port", str(port), "--data-dir", str(data_dir), "--max-tokens", "2") as (
            again, lines_again, seen_again):
        wait_for_line(lines_again, "serving at", seen_again, timeout=120)
        again.send_signal(signal.SIGINT)
        wait_for_line(lines_again, "exoctl demo: stopped 3 nodes", seen_again, timeout=30)
        assert again.wait(30) == 0
    assert node_processes(data_dir) == []


@pytest.mark.slow
def test_ctrl_c_while_the_nodes_start_stops_the_ones_started_and_exits_130(user_env, tmp_path):
    port = free_port_block(set(), size=9)
    data_dir = tmp_path / "demo"
    with running_demo(user_env, "--api-port", str(port), "--data-dir", str(data_dir)) as (demo, lines, seen):
        wait_for_line(lines, "started demo-0", seen, timeout=60)
        demo.send_signal(signal.SIGINT)  # demo-1 is starting: the demo polls it and its /readyz
        wait_for_line(lines, "exoctl demo: stopped", seen, timeout=30)
        assert demo.wait(30) == 130
    assert not [line for line in seen if "Traceback" in line]
    assert node_processes(data_dir) == []


class Exiting:
    """A process whose poll() is where a Ctrl-C lands."""
    def __init__(self):
        self.polled = False

    def poll(self):
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while INTERRUPTS.pending is None and time.monotonic() < deadline:  # until Python has run the handler
            time.sleep(0.001)
        self.polled = True
        return 0


def test_a_ctrl_c_during_a_process_poll_is_raised_once_the_poll_has_returned():
    previous = signal.signal(signal.SIGINT, INTERRUPTS.handler)
    proc = Exiting()
    try:
        with pytest.raises(KeyboardInterrupt):
            _poll(proc)
        assert proc.polled  # the poll ran to its end (CPython's would release its waitpid lock)
        assert INTERRUPTS.pending is None and INTERRUPTS.held == 0
        with pytest.raises(KeyboardInterrupt):  # outside a poll, Ctrl-C interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, previous)


def time_wait_port() -> int:
    """A port whose server is gone while its last connection sits in TIME-WAIT on the server's
    side (the server closed first), as a stopped demo leaves its ports."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()
            assert client.recv(1) == b""
    deadline = time.monotonic() + 5
    while not time_wait_ports(range(port, port + 1)):
        assert time.monotonic() < deadline, f"port {port} never reached TIME-WAIT"
        time.sleep(0.01)
    return port


def test_a_port_left_in_time_wait_by_a_stopped_server_is_free_for_the_demo():
    port = time_wait_port()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the check did before: "already in use" for a minute
    assert not port_in_use(port)
    with socket.socket() as server:  # and a node really can listen there
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()


@pytest.mark.parametrize("reuse_address", [False, True], ids=["plain", "SO_REUSEADDR"])
def test_a_port_with_a_live_listener_is_in_use_for_the_demo(reuse_address):
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_address))
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert port_in_use(listener.getsockname()[1])


def test_the_demo_refuses_a_taken_port_with_one_clear_line(user_env, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*EXOCTL, "demo", "--api-port", str(port), "--data-dir", str(tmp_path / "demo")],
                                capture_output=True, text=True, env=user_env, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use (demo-0 needs ports {port}-{port + 2}); "
        "is another exo node or exoctl demo running? stop it, or pass --api-port"]
    assert not (tmp_path / "demo").exists()
