"""The sans-IO codec: frames built by pymodbus, responses parsed by expected length + CRC
(RTU) or by transaction id (MBAP), without sockets or clocks."""

from __future__ import annotations

import re

import pytest
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

from drivers.modbus.codec import (
    FrameError,
    MbapCodec,
    ModbusExceptionResponse,
    NotModbusError,
    Request,
    Response,
    RtuCodec,
)

# A server-side framer of pymodbus's builds the responses: an independent encoder.
RTU_SERVER = FramerRTU(DecodePDU(is_server=True))
TCP_SERVER = FramerSocket(DecodePDU(is_server=True))


def rtu(pdu: ModbusPDU) -> bytes:
    frame: bytes = RTU_SERVER.buildFrame(pdu)
    return frame


def mbap(pdu: ModbusPDU) -> bytes:
    frame: bytes = TCP_SERVER.buildFrame(pdu)
    return frame


@pytest.mark.parametrize(
    ("request_", "wire"),
    [
        (Request.read("holding", 1, 0, 10), "01030000000ac5cd"),
        (Request.read("coil", 1, 0, 10), "01010000000abc0d"),
        (Request.write_coils(1, 3, [True]), "01050003ff007c3a"),
        (Request.write_registers(1, 5, [7]), "010600050007d809"),
        (Request.write_registers(1, 5, [7, 8]), "01100005000204000700088397"),
    ],
)
def test_rtu_requests_on_the_wire(request_: Request, wire: str) -> None:
    assert RtuCodec().encode(request_).hex() == wire


def test_rtu_response_framed_by_length_across_chunks() -> None:
    codec = RtuCodec()
    codec.encode(Request.read("holding", 1, 0, 3))
    frame = rtu(ReadHoldingRegistersResponse(registers=[1, 2, 3], dev_id=1))
    for byte in frame[:-1]:
        codec.receive_data(bytes([byte]))
        assert codec.response() is None  # incomplete: wait for more
    codec.receive_data(frame[-1:] + b"\x00\x00")  # plus trailing noise
    assert codec.response() == Response(registers=(1, 2, 3))
    assert codec.pending == 2


def test_rtu_crc_error() -> None:
    codec = RtuCodec()
    codec.encode(Request.read("holding", 1, 0, 2))
    frame = bytearray(rtu(ReadHoldingRegistersResponse(registers=[1, 2], dev_id=1)))
    frame[4] ^= 0x01
    codec.receive_data(bytes(frame))
    with pytest.raises(FrameError, match="CRC mismatch") as caught:
        codec.response()
    assert caught.value.reason == "crc"  # a serial line: noise is the likely cause


def test_rtu_answer_from_another_unit() -> None:
    codec = RtuCodec()
    codec.encode(Request.read("holding", 2, 0, 1))
    codec.receive_data(rtu(ReadHoldingRegistersResponse(registers=[1], dev_id=1)))
    with pytest.raises(FrameError, match="from unit 1, expected 2"):
        codec.response()


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (1, "exception 01 illegal function"),
        (2, "exception 02 illegal address"),
        (3, "exception 03 illegal value"),
        (4, "exception 04 device failure"),
        (0x0A, "exception 0A gateway path unavailable"),
        (0x0B, "exception 0B gateway target failed to respond"),
    ],
)
def test_exception_responses(code: int, reason: str) -> None:
    codec = RtuCodec()
    codec.encode(Request.read("holding", 1, 0, 2))
    codec.receive_data(rtu(ExceptionResponse(3, code, device_id=1)))
    with pytest.raises(ModbusExceptionResponse) as info:
        codec.response()
    assert info.value.reason == reason


def test_rtu_coils_are_trimmed_to_the_count() -> None:
    codec = RtuCodec()
    codec.encode(Request.read("coil", 1, 0, 3))
    codec.receive_data(rtu(ReadCoilsResponse(bits=[True, False, True] + [False] * 5, dev_id=1)))
    assert codec.response() == Response(bits=(True, False, True))


def test_rtu_wrong_register_count_is_a_frame_error() -> None:
    codec = RtuCodec()
    codec.encode(Request.read("holding", 1, 0, 3))
    codec.receive_data(rtu(ReadHoldingRegistersResponse(registers=[1, 2], dev_id=1)))
    with pytest.raises(FrameError, match="2 registers in the response, expected 3"):
        codec.response()


def test_mbap_skips_a_stale_response_to_an_earlier_request() -> None:
    codec = MbapCodec()
    first = codec.encode(Request.read("holding", 1, 0, 1))
    # The first request timed out; the second goes out before its answer arrives.
    second = codec.encode(Request.read("holding", 1, 0, 1))
    tid1 = int.from_bytes(first[:2], "big")
    tid2 = int.from_bytes(second[:2], "big")
    assert tid2 == tid1 + 1
    late = mbap(ReadHoldingRegistersResponse(registers=[111], dev_id=1, transaction_id=tid1))
    current = mbap(ReadHoldingRegistersResponse(registers=[222], dev_id=1, transaction_id=tid2))
    codec.receive_data(late)
    assert codec.response() is None  # the stale answer is not taken for the current one
    assert codec.stale == 1
    codec.receive_data(current[:5])
    assert codec.response() is None
    codec.receive_data(current[5:])
    assert codec.response() == Response(registers=(222,))


def test_mbap_transaction_ids_wrap_and_skip_zero() -> None:
    codec = MbapCodec()
    codec._tid = 0xFFFF
    frame = codec.encode(Request.read("holding", 1, 0, 1))
    assert frame[:2] == b"\x00\x01"


def test_mbap_http_answer_is_not_modbus_not_a_frame_error() -> None:
    codec = MbapCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(NotModbusError) as info:
        codec.response()
    assert str(info.value) == (
        "not Modbus: the device answered 'HTTP/1.1 400 Bad Request' (wrong port or protocol?)"
    )
    assert not isinstance(info.value, FrameError)  # not noise: nothing for `retries` to do


def test_mbap_not_modbus_is_told_from_the_first_four_bytes() -> None:
    codec = MbapCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(b"SS")
    assert codec.response() is None
    codec.receive_data(b"H-2.0-OpenSSH_9.6\r\n")
    with pytest.raises(NotModbusError, match=re.escape("answered 'SSH-2.0-OpenSSH_9.6'")):
        codec.response()


def test_mbap_impossible_length_is_not_modbus_and_binary_is_quoted_in_hex() -> None:
    codec = MbapCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(bytes.fromhex("0001 0000 ffff 01 03 02 00 07"))  # length 65535
    with pytest.raises(NotModbusError, match="answered 00 01 00 00 ff ff 01 03 02 00 07 "):
        codec.response()


def test_mbap_valid_answer_after_a_not_modbus_one_is_read() -> None:
    # The codec drops what it could not frame, so it cannot jam on the next request.
    codec = MbapCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(NotModbusError):
        codec.response()
    tid = int.from_bytes(codec.encode(Request.read("holding", 1, 0, 1))[:2], "big")
    codec.receive_data(
        mbap(ReadHoldingRegistersResponse(registers=[5], dev_id=1, transaction_id=tid))
    )
    assert codec.response() == Response(registers=(5,))


@pytest.mark.parametrize(
    ("answer", "quoted"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "'HTTP/1.1 400 Bad Request'"),
        (b":010300000001FB\r\n", "':010300000001FB'"),  # Modbus ASCII on the line
    ],
)
def test_rtu_text_answer_is_not_modbus(answer: bytes, quoted: str) -> None:
    codec = RtuCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(answer)
    with pytest.raises(NotModbusError) as info:
        codec.response()
    assert info.value.answer == quoted
    assert codec.pending == 0


def test_rtu_binary_garbage_is_still_a_frame_error() -> None:
    codec = RtuCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(bytes.fromhex("0103020007 0000"))  # a reply with a broken CRC
    with pytest.raises(FrameError, match="CRC mismatch"):
        codec.response()


def _mbap_answer(codec: MbapCodec, unit: int, pdu: bytes) -> bytes:
    """An MBAP frame with the codec's current transaction id around raw PDU bytes."""
    tid = codec._tid.to_bytes(2, "big")
    return tid + b"\x00\x00" + (len(pdu) + 1).to_bytes(2, "big") + bytes([unit]) + pdu


@pytest.mark.parametrize(
    ("unit", "pdu", "message"),
    [
        (1, bytes.fromhex("0304002a"), "MBAP length says 4 PDU bytes, the byte count 6"),
        (1, bytes.fromhex("0302002a0000"), "MBAP length says 6 PDU bytes, the byte count 4"),
        (1, bytes.fromhex("0402002a"), "response to function 4, expected 3"),
        (2, bytes.fromhex("0302002a"), "response from unit 2, expected 1"),
    ],
    ids=["short", "extra-bytes", "wrong-function", "wrong-unit"],
)
def test_mbap_wrong_answers_are_bad_responses_not_crc(unit: int, pdu: bytes, message: str) -> None:
    """TCP has no CRC: a malformed or mismatched answer is the device's fault, and the
    reading says ``bad response`` (``crc`` would send a technician to the wiring)."""
    codec = MbapCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(_mbap_answer(codec, unit, pdu))
    with pytest.raises(FrameError, match=re.escape(message)) as caught:
        codec.response()
    assert caught.value.reason == "bad response"
    assert "Input/Output" not in str(caught.value)


def test_mbap_junk_before_a_frame_is_skipped_and_counted() -> None:
    """A device that pads its answers: the junk glued in front of the next frame must not
    turn a good answer into 'not Modbus'."""
    codec = MbapCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(b"\x00\x00\x00" + _mbap_answer(codec, 1, bytes.fromhex("0302002a")))
    assert codec.response() == Response(registers=(42,))
    assert codec.skipped == 3


def test_mbap_answer_of_another_protocol_is_still_not_modbus_after_the_skip_rule() -> None:
    codec = MbapCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(NotModbusError):
        codec.response()


def test_exception_response_to_another_function_is_a_bad_response() -> None:
    codec = MbapCodec()
    codec.encode(Request.read("holding", 1, 0, 1))
    codec.receive_data(_mbap_answer(codec, 1, bytes.fromhex("8402")))
    with pytest.raises(FrameError, match="exception response to function 4, expected 3") as e:
        codec.response()
    assert e.value.reason == "bad response"
