"""The machine's NATS server for the tests that need one: checked, and started with the command
of shared/DESIGN.md section 5 when it is down (never skipped)."""

from __future__ import annotations

import socket
import subprocess
import time

URL = "nats://127.0.0.1:4222"
START = ["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/nats-server",
         "--", "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server",
         "-l", "/var/log/nats-server.log"]


def nats_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1) as s:
            return s.recv(4) == b"INFO"
    except OSError:
        return False


def ensure_nats() -> str:
    """The server's URL, once it answers (started if it was down)."""
    if not nats_up():
        subprocess.run(START, check=True, timeout=30)
        deadline = time.monotonic() + 15
        while not nats_up():
            assert time.monotonic() < deadline, "nats-server did not come up"
            time.sleep(0.2)
    return URL
