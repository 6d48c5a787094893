"""Free TCP ports on 127.0.0.1 for servers that a command or a test starts and then waits for.

A port found by binding port 0 comes from the kernel's ephemeral range, the range it also gives every
outgoing connection and every other port-0 bind. Between the probe and the server's own bind (an MLflow
server takes seconds to start) a busy host can hand that port to someone else, and the server fails
with "address already in use". A port below the ephemeral range and above the ranges Ray's workers are
given is taken only by a process that asks for it by number, so these are drawn from there at random and
checked free.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Ray's workers listen on 10002-19999 by default (`ray start --min-worker-port/--max-worker-port`), and on
# blocks of 20000-30999 in the local multi-node rehearsal (infra/local_multinode.py)
LOWEST = 31000
ATTEMPTS = 200


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """The kernel's (first, last) ephemeral port, or None where it cannot be read (not Linux)."""
    try:
        first, last = (int(field) for field in path.read_text().split())
    except (OSError, ValueError):
        return None
    return first, last


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int = 1, *, ephemeral: tuple[int, int] | None = None) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now, outside the ephemeral range where the host says what that
    is (``ephemeral``: that range, read from the kernel when not given); port-0 binds elsewhere."""
    span = ephemeral or ephemeral_range()
    if span is not None and span[0] - LOWEST >= 4 * n:
        ports: list[int] = []
        for _ in range(ATTEMPTS):
            port = random.randrange(LOWEST, span[0])
            if port not in ports and _bindable(port):
                ports.append(port)
                if len(ports) == n:
                    return ports
    # no room below the ephemeral range (or all tries taken): let the kernel choose, all bound at once
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """One port of :func:`free_ports`."""
    return free_ports(1)[0]
