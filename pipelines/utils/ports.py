"""Free TCP ports on 127.0.0.1 for servers that a command or a test starts and then waits for.

A port found by binding port 0 comes from the kernel's ephemeral range, the range it also gives every
outgoing connection and every other port-0 bind (Ray's processes make many). Between the probe and the
server's own bind (an MLflow server takes seconds to start) a busy host can hand that port to someone else,
and the server fails with "address already in use". Ports outside the ephemeral range and above the ranges
Ray's workers are given are taken only by a process that asks for one by number: these are drawn from
there at random, checked free, and never handed out twice by one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Ray's workers listen on 10002-19999 by default (`ray start --min-worker-port/--max-worker-port`), and on
# blocks of 20000-30999 in the local multi-node rehearsal (infra/local_multinode.py, which checks it)
LOWEST = 31000
HIGHEST = 65535
ATTEMPTS = 200

_handed_out: set[int] = set()  # by this process: its servers may not have bound them yet
_draw = random.Random()  # its own generator: a seeded global `random` would draw the same ports everywhere


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """The kernel's (first, last) ephemeral port, or None where it cannot be read (not Linux)."""
    try:
        first, last = (int(field) for field in path.read_text().split())
    except (OSError, ValueError):
        return None
    return first, last


def candidate_ports(ephemeral: tuple[int, int] | None) -> list[range]:
    """The ranges ports are drawn from: LOWEST to HIGHEST but the ``ephemeral`` range (none if unknown)."""
    if ephemeral is None:
        return []
    first, last = ephemeral
    below, above = range(LOWEST, min(first, HIGHEST + 1)), range(max(last + 1, LOWEST), HIGHEST + 1)
    return [span for span in (below, above) if span]


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int = 1, *, ephemeral: tuple[int, int] | None = None) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now and not handed out before by this process, outside the
    ephemeral range (``ephemeral``: that range, read from the kernel when not given). Where the host does not
    say what that range is, or it leaves too little room, the kernel chooses (port-0 binds)."""
    ranges = candidate_ports(ephemeral or ephemeral_range())
    room = sum(len(r) for r in ranges) - len(_handed_out)
    ports: list[int] = []
    if room >= 4 * n:
        for _ in range(ATTEMPTS):
            span = _draw.choices(ranges, weights=[len(r) for r in ranges])[0]
            port = _draw.choice(span)
            if port not in _handed_out and port not in ports and _bindable(port):
                ports.append(port)
                if len(ports) == n:
                    break
    if len(ports) < n:
        ports = _kernel_ports(n)
    _handed_out.update(ports)
    return ports


def _kernel_ports(n: int) -> list[int]:
    socks = []
    try:
        while len(socks) < n:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] in _handed_out:
                sock.close()
                continue
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """One port of :func:`free_ports`."""
    return free_ports(1)[0]
