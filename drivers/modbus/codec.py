"""Modbus frames and PDUs, sans-IO. The only module that imports pymodbus.

pymodbus's framers (``FramerRTU``, ``FramerSocket``) and PDU classes build and parse the
bytes; this module adds what a master needs around them: a request description of our own,
RTU response framing by expected length + CRC (never by silence), MBAP transaction ids with
stale responses skipped, exception responses turned into ``ModbusExceptionResponse``, and
an answer in another protocol altogether (an HTTP server on port 502, Modbus ASCII on the
line) told apart from a corrupted frame as ``NotModbusError``. A pymodbus API change touches
this file only.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import Any

import attrs
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDiscreteInputsRequest,
    ReadDiscreteInputsResponse,
    WriteMultipleCoilsRequest,
    WriteMultipleCoilsResponse,
    WriteSingleCoilRequest,
    WriteSingleCoilResponse,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
    WriteMultipleRegistersRequest,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterRequest,
    WriteSingleRegisterResponse,
)

EXCEPTION_NAMES = {
    0x01: "illegal function",
    0x02: "illegal address",
    0x03: "illegal value",
    0x04: "device failure",
    0x05: "acknowledge",
    0x06: "device busy",
    0x08: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target failed to respond",
}

READ_FUNCTIONS = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


class ModbusExceptionResponse(Exception):
    """The device answered with an exception code (a valid answer: the link is fine)."""

    def __init__(self, function_code: int, code: int) -> None:
        self.function_code = function_code
        self.code = code
        name = EXCEPTION_NAMES.get(code, "unknown exception")
        self.reason = f"exception {code:02X} {name}"
        super().__init__(f"{self.reason} (function {function_code})")


class FrameError(Exception):
    """A response that fails its CRC, has the wrong length, or does not match the request.
    ``reason`` is the reading's reason: ``crc`` on a serial line (noise corrupts frames),
    ``bad response`` over Modbus TCP (no CRC, TCP does not corrupt: the device answered
    wrongly, e.g. a gateway mixing up units)."""

    def __init__(self, message: str, reason: str = "crc") -> None:
        super().__init__(message)
        self.reason = reason


class NotModbusError(Exception):
    """The peer answered in another protocol (an HTTP or SSH server on the port, Modbus ASCII
    on the line): not noise, a wrong port or protocol. ``answer`` quotes what it sent."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        super().__init__(f"not Modbus: the device answered {answer} (wrong port or protocol?)")


def _quote(data: bytes, limit: int = 40) -> str:
    """The start of a foreign answer for a message: its first line as text when it is text
    (``'HTTP/1.1 400 Bad Request'``), else its first bytes in hex (``16 03 01 ...``)."""
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if line and all(0x20 <= b < 0x7F for b in line):
        text = line[:limit].decode("ascii")
        return repr(text + ("..." if len(line) > limit else ""))
    head = data[:12]
    return " ".join(f"{b:02x}" for b in head) + (" ..." if len(data) > 12 else "")


def _is_text(data: bytes | bytearray) -> bool:
    """Four printable ASCII characters: a Modbus RTU answer's second byte is a function code
    (1..127, or that + 0x80), never a letter, so text is another protocol speaking."""
    return len(data) >= 4 and all(0x20 <= b < 0x7F or b in (0x09, 0x0A, 0x0D) for b in data[:4])


@attrs.frozen
class Request:
    """One Modbus transaction as the poller and writer describe it."""

    function_code: int
    unit_id: int
    address: int
    count: int = 1
    registers: tuple[int, ...] = ()
    bits: tuple[bool, ...] = ()

    @classmethod
    def read(cls, table: str, unit_id: int, address: int, count: int) -> Request:
        return cls(READ_FUNCTIONS[table], unit_id, address, count)

    @classmethod
    def write_registers(cls, unit_id: int, address: int, registers: Sequence[int]) -> Request:
        regs = tuple(registers)
        fc = 6 if len(regs) == 1 else 16
        return cls(fc, unit_id, address, len(regs), registers=regs)

    @classmethod
    def write_coils(cls, unit_id: int, address: int, bits: Sequence[bool]) -> Request:
        values = tuple(bits)
        fc = 5 if len(values) == 1 else 15
        return cls(fc, unit_id, address, len(values), bits=values)

    def pdu(self, transaction_id: int = 0) -> ModbusPDU:
        cls = _PDU_CLASSES.get(self.function_code)
        if cls is None:
            raise ValueError(f"unsupported function code {self.function_code}")
        common: dict[str, Any] = {
            "dev_id": self.unit_id,
            "transaction_id": transaction_id,
            "address": self.address,
        }
        if self.function_code <= 4:
            return cls(count=self.count, **common)
        if self.bits:
            return cls(bits=list(self.bits), **common)
        return cls(registers=list(self.registers), **common)


_PDU_CLASSES: dict[int, type[ModbusPDU]] = {
    1: ReadCoilsRequest,
    2: ReadDiscreteInputsRequest,
    3: ReadHoldingRegistersRequest,
    4: ReadInputRegistersRequest,
    5: WriteSingleCoilRequest,
    6: WriteSingleRegisterRequest,
    15: WriteMultipleCoilsRequest,
    16: WriteMultipleRegistersRequest,
}


_RESPONSE_CLASSES: dict[int, type[ModbusPDU]] = {
    1: ReadCoilsResponse,
    2: ReadDiscreteInputsResponse,
    3: ReadHoldingRegistersResponse,
    4: ReadInputRegistersResponse,
    5: WriteSingleCoilResponse,
    6: WriteSingleRegisterResponse,
    15: WriteMultipleCoilsResponse,
    16: WriteMultipleRegistersResponse,
}


def _decode_pdu(data: bytes) -> ModbusPDU:
    """A response PDU (function code first) through pymodbus's PDU classes. Straight to the
    class: ``DecodePDU.decode`` also formats every PDU for a debug log line nobody reads."""
    fc = data[0]
    pdu: ModbusPDU
    if fc & 0x80:
        pdu = ExceptionResponse(fc & 0x7F)
    elif (cls := _RESPONSE_CLASSES.get(fc)) is not None:
        pdu = cls()
    else:
        raise FrameError(f"response with unsupported function code {fc}")
    try:
        pdu.decode(data[1:])
    except (ModbusException, ValueError, IndexError, struct.error) as e:
        # pymodbus's own text names its internals ("[Input/Output] byte_count"): the bytes
        # say more to a field engineer comparing with the device's manual.
        raise FrameError(f"undecodable response {data.hex()}") from e
    return pdu


@attrs.frozen
class Response:
    registers: tuple[int, ...] = ()
    bits: tuple[bool, ...] = ()


def _response(request: Request, pdu: ModbusPDU) -> Response:
    if isinstance(pdu, ExceptionResponse) or pdu.function_code & 0x80:
        if pdu.function_code & 0x7F != request.function_code:
            raise FrameError(
                f"exception response to function {pdu.function_code & 0x7F}, "
                f"expected {request.function_code}"
            )
        raise ModbusExceptionResponse(request.function_code, pdu.exception_code)
    if pdu.function_code != request.function_code:
        raise FrameError(
            f"response to function {pdu.function_code}, expected {request.function_code}"
        )
    if request.function_code in (1, 2):
        bits = tuple(bool(b) for b in pdu.bits)
        if len(bits) < request.count:
            raise FrameError(f"{len(bits)} bits in the response, expected {request.count}")
        return Response(bits=bits[: request.count])  # padded to a byte on the wire
    if request.function_code in (3, 4):
        if len(pdu.registers) != request.count:
            raise FrameError(
                f"{len(pdu.registers)} registers in the response, expected {request.count}"
            )
        return Response(registers=tuple(pdu.registers))
    return Response()


# A poll sends the same few requests over and over: build each frame once. Only the MBAP
# transaction id (the first two bytes) changes from one request to the next.
@functools.lru_cache(maxsize=1024)
def _rtu_frame(request: Request) -> bytes:
    frame: bytes = FramerRTU(DecodePDU(is_server=False)).buildFrame(request.pdu())
    return frame


@functools.lru_cache(maxsize=1024)
def _mbap_frame(request: Request) -> bytes:
    frame: bytes = FramerSocket(DecodePDU(is_server=False)).buildFrame(request.pdu())
    return frame


class RtuCodec:
    """Master side of Modbus RTU (also RTU over TCP). One transaction at a time:
    ``encode(request)``, then feed bytes to ``receive_data`` until ``response()`` returns
    a value (or raises ``FrameError`` / ``ModbusExceptionResponse``)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._request: Request | None = None

    def encode(self, request: Request) -> bytes:
        self._request = request
        self._buffer.clear()
        return _rtu_frame(request)

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def expected_length(self) -> int | None:
        """Bytes the whole response frame needs, once enough of it is in to tell."""
        buf = self._buffer
        if len(buf) < 3:
            return None
        if buf[1] & 0x80:
            return 5
        if buf[1] in (1, 2, 3, 4):
            return 3 + buf[2] + 2
        return 8

    def response(self) -> Response | None:
        """The response, when complete; None when more bytes are needed. Raises
        ``FrameError`` for a corrupted frame, ``NotModbusError`` for text."""
        assert self._request is not None, "encode() a request first"
        request = self._request
        if _is_text(self._buffer):
            answer = _quote(bytes(self._buffer))
            self._buffer.clear()
            raise NotModbusError(answer)
        size = self.expected_length()
        if size is None or len(self._buffer) < size:
            return None
        frame = bytes(self._buffer[:size])
        del self._buffer[:size]
        if frame[0] != request.unit_id:
            raise FrameError(f"response from unit {frame[0]}, expected {request.unit_id}")
        crc = int.from_bytes(frame[-2:], "big")
        if not FramerRTU.check_CRC(frame[:-2], crc):
            raise FrameError("CRC mismatch")
        return _response(request, _decode_pdu(frame[1:-2]))

    @property
    def pending(self) -> int:
        """Bytes received beyond the response (noise, or a late answer to an old request)."""
        return len(self._buffer)


class MbapCodec:
    """Master side of Modbus TCP (MBAP header). Each request gets the next transaction id;
    responses with another id (late answers to requests that already timed out) are skipped
    and counted, so a stale response is never taken for the current one."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._tid = 0
        self._request: Request | None = None
        self.stale = 0
        self.skipped = 0  # junk bytes dropped before a frame

    def encode(self, request: Request) -> bytes:
        self._tid = self._tid % 0xFFFF + 1  # 1..65535; 0 is never used
        self._request = request
        return self._tid.to_bytes(2, "big") + _mbap_frame(request)[2:]

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def response(self) -> Response | None:
        """The response, when complete; None when more bytes are needed. Raises
        ``FrameError`` for a malformed answer, ``NotModbusError`` when the bytes are not
        MBAP at all (TCP does not corrupt bytes: a bad header is another protocol)."""
        assert self._request is not None, "encode() a request first"
        while len(self._buffer) >= 4:
            if self._buffer[2:4] != b"\x00\x00":  # the protocol id is 0 for Modbus
                if self._skip_to_our_frame():
                    continue
                raise self._not_modbus()
            if len(self._buffer) < 6:
                return None
            size = 6 + int.from_bytes(self._buffer[4:6], "big")
            if size < 8 or size > 260:
                if self._skip_to_our_frame():
                    continue
                raise self._not_modbus()
            if len(self._buffer) < size:
                return None
            frame = bytes(self._buffer[:size])
            del self._buffer[:size]
            tid = int.from_bytes(frame[:2], "big")
            if tid != self._tid:
                self.stale += 1
                continue
            try:
                return self._checked(frame)
            except FrameError as e:
                raise FrameError(str(e), reason="bad response") from None
        return None

    def _checked(self, frame: bytes) -> Response:
        assert self._request is not None
        if frame[6] != self._request.unit_id:
            raise FrameError(f"response from unit {frame[6]}, expected {self._request.unit_id}")
        pdu = frame[7:]
        if pdu[0] in (1, 2, 3, 4) and len(pdu) >= 2 and len(pdu) != 2 + pdu[1]:
            raise FrameError(f"MBAP length says {len(pdu)} PDU bytes, the byte count {2 + pdu[1]}")
        return _response(self._request, _decode_pdu(pdu))

    def _skip_to_our_frame(self) -> bool:
        """Junk before a frame (a device that pads its answers, the tail of a garbled one):
        when our transaction id and protocol id 0 follow later in the buffer, drop what
        precedes them and count it. Another protocol's answer has no such header."""
        start = self._buffer.find(self._tid.to_bytes(2, "big") + b"\x00\x00", 1)
        if start < 0:
            return False
        self.skipped += start
        del self._buffer[:start]
        return True

    def _not_modbus(self) -> NotModbusError:
        # Nothing after a foreign header can be framed: drop it all (the link reconnects).
        error = NotModbusError(_quote(bytes(self._buffer)))
        self._buffer.clear()
        return error
