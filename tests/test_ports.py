"""pipelines/utils/ports.py: ports for servers started later are drawn where no port-0 bind or outgoing
connection can take them in the meantime."""

from __future__ import annotations

import socket
import sys

import pytest

from pipelines.utils import ports


def _bind(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    return sock


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the ephemeral range is read from /proc")
def test_ports_lie_below_the_kernels_ephemeral_range_and_can_be_bound():
    first, last = (int(v) for v in ports.EPHEMERAL_RANGE_FILE.read_text().split())
    assert ports.ephemeral_range() == (first, last)
    chosen = ports.free_ports(7)
    assert len(set(chosen)) == 7
    assert all(ports.LOWEST <= port < first for port in chosen), (chosen, first)
    held = [_bind(port) for port in chosen]  # each one binds: it was free
    try:
        # what the kernel hands a port-0 bind (and an outgoing connection) meanwhile is never one of them
        kernel = [_bind(0) for _ in range(50)]
        assert not {s.getsockname()[1] for s in kernel} & set(chosen)
        for sock in kernel:
            sock.close()
    finally:
        for sock in held:
            sock.close()


def test_a_port_in_use_is_passed_over(monkeypatch):
    busy = _bind(0)  # held: its port is in use
    taken = busy.getsockname()[1]
    try:
        other = _bind(0)
        spare = other.getsockname()[1]
        other.close()
        draws = iter([taken, taken, spare])
        monkeypatch.setattr(ports.random, "randrange", lambda lo, hi: next(draws))
        assert ports.free_ports(1, ephemeral=(60000, 61000)) == [spare]
    finally:
        busy.close()


def test_without_room_below_the_range_the_kernel_chooses():
    chosen = ports.free_ports(3, ephemeral=(ports.LOWEST + 2, 60999))
    assert len(set(chosen)) == 3
    for sock in [_bind(port) for port in chosen]:
        sock.close()


def test_an_unreadable_range_file_means_no_range(tmp_path):
    assert ports.ephemeral_range(tmp_path / "missing") is None
    (tmp_path / "garbled").write_text("32768\n")
    assert ports.ephemeral_range(tmp_path / "garbled") is None
