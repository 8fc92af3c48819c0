"""SerialPort on real ptys: send/receive, discard, unplug, close while a reader waits."""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from drivers.serialio import DeviceGone, PortError, PortSettings, SerialPort
from tests.ptys import TIMEOUT, PtyLink, PtyPeer, open_pty_link


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[PtyPeer]:
    p = PtyPeer(tmp_path)
    yield p
    p.close()


@pytest.fixture
async def port(peer: PtyPeer) -> AsyncIterator[SerialPort]:
    async with await SerialPort.open(PortSettings(str(peer.path))) as p:
        yield p


@pytest.fixture
async def link(tmp_path: Path) -> AsyncIterator[PtyLink]:
    async with open_pty_link(tmp_path) as link:
        yield link


async def receive_exactly(port: SerialPort, n: int) -> bytes:
    data = b""
    with trio.fail_after(TIMEOUT):
        while len(data) < n:
            data += await port.receive_some()
    return data


async def test_send_and_receive(port: SerialPort, peer: PtyPeer) -> None:
    await port.send_all(b"PING\r\n")
    await peer.wait_received(lambda b: b == b"PING\r\n")  # raw mode: no CR/LF translation
    await peer.send(b"PONG\r\n\x00\xff")
    assert await receive_exactly(port, 8) == b"PONG\r\n\x00\xff"
    stats = port.statistics()
    assert stats["bytes_sent"] == 6
    assert stats["bytes_received"] == 8
    assert stats["open"] is True


async def test_large_write_waits_for_room(port: SerialPort, peer: PtyPeer) -> None:
    # Far more than a pty buffers: send_all must wait for writability on partial writes.
    data = bytes(range(256)) * 1024
    async with trio.open_nursery() as nursery:
        nursery.start_soon(port.send_all, data)
        received = await peer.wait_received(lambda b: len(b) >= len(data))
    assert received == data


async def test_receive_some_respects_max_bytes(port: SerialPort, peer: PtyPeer) -> None:
    await peer.send(b"abcdef")
    assert await port.receive_some(4) == b"abcd"
    assert await port.receive_some(4) == b"ef"
    with pytest.raises(ValueError, match="at least 1"):
        await port.receive_some(0)


async def test_discard_input_drops_stale_bytes(port: SerialPort, peer: PtyPeer) -> None:
    await peer.send(b"stale reply from before\r\n")
    with trio.fail_after(TIMEOUT):
        await trio.lowlevel.wait_readable(port.fileno())
    assert port.discard_input() == 25
    assert port.discard_input() == 0
    await peer.send(b"fresh")
    assert await receive_exactly(port, 5) == b"fresh"
    assert port.statistics()["bytes_discarded"] == 25


async def test_unplug_wakes_a_waiting_reader_with_device_gone(
    port: SerialPort, peer: PtyPeer
) -> None:
    async with trio.open_nursery() as nursery:
        caught: list[BaseException] = []

        async def reader() -> None:
            with pytest.raises(DeviceGone) as info:
                await port.receive_some()
            caught.append(info.value)

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        peer.unplug()
    assert "device gone" in str(caught[0])
    assert isinstance(caught[0], OSError)
    # Every further use says the same, not "empty read" or a hang.
    with pytest.raises(DeviceGone):
        await port.receive_some()
    with pytest.raises(DeviceGone) as info:
        await port.send_all(b"x")
    assert info.value.errno == errno.EIO
    with pytest.raises(DeviceGone):
        port.discard_input()


async def test_aclose_wakes_a_blocked_reader_and_is_idempotent(
    port: SerialPort, peer: PtyPeer
) -> None:
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await port.receive_some()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await port.aclose()
    await port.aclose()
    assert port.closed
    assert port.statistics()["open"] is False
    with pytest.raises(trio.ClosedResourceError):
        await port.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await port.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        port.discard_input()
    with pytest.raises(trio.ClosedResourceError):
        port.fileno()


async def test_aclose_closes_even_when_cancelled(peer: PtyPeer) -> None:
    port = await SerialPort.open(PortSettings(str(peer.path)))
    with trio.CancelScope() as scope:
        scope.cancel()
        await port.aclose()
    assert port.closed
    # The exclusive lock went with the fd: the port opens again.
    async with await SerialPort.open(PortSettings(str(peer.path))):
        pass


async def test_one_reader_at_a_time(port: SerialPort) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(port.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await port.receive_some()
        nursery.cancel_scope.cancel()


async def test_open_errors_say_what_is_wrong(tmp_path: Path, peer: PtyPeer) -> None:
    with pytest.raises(PortError, match="no such device: is the adapter plugged in") as info:
        await SerialPort.open(PortSettings(str(tmp_path / "ttyUSB9")))
    assert info.value.errno == errno.ENOENT
    async with await SerialPort.open(PortSettings(str(peer.path))):
        with pytest.raises(PortError, match="in use: another process holds the port"):
            await SerialPort.open(PortSettings(str(peer.path)))
    plain = tmp_path / "not-a-tty"
    plain.write_text("")
    with pytest.raises(PortError, match="is it a serial port"):
        await SerialPort.open(PortSettings(str(plain)))


async def test_rs485_refused_is_a_clear_error(peer: PtyPeer) -> None:
    with pytest.raises(PortError, match=r"refuses RS-485 mode .* set rs485 = false"):
        await SerialPort.open(PortSettings(str(peer.path), rs485=True))
    # The failed open closed the port again (else the exclusive lock would refuse this one).
    async with await SerialPort.open(PortSettings(str(peer.path))):
        pass


async def test_low_latency_unsupported_is_ignored(
    peer: PtyPeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.serialio")
    async with await SerialPort.open(PortSettings(str(peer.path), low_latency=True)) as port:
        await port.send_all(b"ok")
    assert "low-latency mode not supported" in caplog.text
    caplog.clear()
    async with await SerialPort.open(PortSettings(str(peer.path), low_latency=False)):
        pass
    assert "low-latency" not in caplog.text


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="parity"):
        PortSettings("/dev/ttyS0", parity="X")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="baudrate"):
        PortSettings("/dev/ttyS0", baudrate=0)


async def test_link_relays_both_ways_and_replugs(link: PtyLink) -> None:
    server = await SerialPort.open(PortSettings(link.server_path))
    try:
        client = await SerialPort.open(PortSettings(str(link.path), baudrate=19200))
        await client.send_all(b"\x01\x03\x00\x00\x00\x0a\xc5\xcd")
        assert await receive_exactly(server, 8) == b"\x01\x03\x00\x00\x00\x0a\xc5\xcd"
        await server.send_all(b"reply")
        assert await receive_exactly(client, 5) == b"reply"

        await link.unplug()
        with pytest.raises(DeviceGone):
            await client.receive_some()
        await client.aclose()
        with pytest.raises(PortError, match="no such device"):
            await SerialPort.open(PortSettings(str(link.path)))

        await server.send_all(b"lost while unplugged")
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_writable(server.fileno())
        await link.replug()
        async with await SerialPort.open(PortSettings(str(link.path))) as client:
            await server.send_all(b"again")
            assert await receive_exactly(client, 5) == b"again"
            await client.send_all(b"back")
            assert await receive_exactly(server, 4) == b"back"
    finally:
        await server.aclose()
