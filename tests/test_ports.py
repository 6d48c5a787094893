"""pipelines/utils/ports.py: ports for servers started later are drawn where no port-0 bind or outgoing
connection can take them in the meantime, and one process never hands out the same port twice."""

from __future__ import annotations

import socket
import sys

import pytest

from pipelines.utils import ports


@pytest.fixture(autouse=True)
def _nothing_handed_out(monkeypatch):
    monkeypatch.setattr(ports, "_handed_out", set())


def _bind(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    return sock


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the ephemeral range is read from /proc")
def test_ports_lie_outside_the_kernels_ephemeral_range_and_can_be_bound():
    first, last = (int(v) for v in ports.EPHEMERAL_RANGE_FILE.read_text().split())
    assert ports.ephemeral_range() == (first, last)
    chosen = ports.free_ports(7)
    assert len(set(chosen)) == 7
    if ports.candidate_ports((first, last)):  # this host leaves room outside its range
        outside = [port >= ports.LOWEST and not first <= port <= last for port in chosen]
        assert all(outside), (chosen, first, last)
    for sock in [_bind(port) for port in chosen]:  # each one binds: it was free
        sock.close()


def test_the_ranges_drawn_from_leave_out_the_ephemeral_range():
    assert ports.candidate_ports((32768, 60999)) == [range(31000, 32768), range(61000, 65536)]
    assert ports.candidate_ports((40000, 50000)) == [range(31000, 40000), range(50001, 65536)]
    assert ports.candidate_ports((1024, 65535)) == []
    assert ports.candidate_ports(None) == []


class Draws:
    """Stands in for the module's generator: the ports given, in turn, from the first range."""

    def __init__(self, *ports_: int) -> None:
        self.ports = iter(ports_)

    def choices(self, population, weights):
        return [population[0]]

    def choice(self, span):
        return next(self.ports)


def test_a_port_is_never_handed_out_twice_by_one_process(monkeypatch):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
    monkeypatch.setattr(ports, "_draw", Draws(port, *[port] * ports.ATTEMPTS))
    assert ports.free_ports(1, ephemeral=(60000, 61000)) == [port]
    again = ports.free_ports(1, ephemeral=(60000, 61000))  # the same port drawn every time: the kernel's
    assert again != [port] and len(again) == 1


def test_a_port_in_use_is_passed_over(monkeypatch):
    with socket.socket() as busy, socket.socket() as other:
        busy.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        taken, spare = busy.getsockname()[1], other.getsockname()[1]
        other.close()  # free again
        monkeypatch.setattr(ports, "_draw", Draws(taken, taken, spare))
        assert ports.free_ports(1, ephemeral=(60000, 61000)) == [spare]


def test_without_room_outside_the_range_the_kernel_chooses():
    chosen = ports.free_ports(3, ephemeral=(ports.LOWEST + 2, ports.HIGHEST))
    assert len(set(chosen)) == 3
    for sock in [_bind(port) for port in chosen]:
        sock.close()


def test_an_unreadable_range_file_means_no_range(tmp_path):
    assert ports.ephemeral_range(tmp_path / "missing") is None
    (tmp_path / "garbled").write_text("32768\n")
    assert ports.ephemeral_range(tmp_path / "garbled") is None
