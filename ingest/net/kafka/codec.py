"""Sans-IO codec of Kafka's wire protocol: size-prefixed frames, request header v1,
response header v0, and message bodies encoded/decoded by walking schema.py's tables.

No sockets here: `FrameReader.feed(bytes)` yields whole frames, `decode_request(frame)`
gives the header and body as dicts, `encode_response(...)` gives bytes to send.
Anything malformed raises KafkaProtocolError with a reason the caller counts; the
connection that sent it cannot be resynchronised and must be closed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ingest.net.kafka.schema import CODEC_VERSIONS, SCHEMAS, ApiKey

# A request larger than this is refused before it is buffered. Kafka's broker default
# (socket.request.max.bytes) is 100 MiB; a produce request here carries batches of
# telemetry, so 16 MiB (twice the fetch reply cap) bounds a connection's memory.
REQUEST_BYTES_MAX = 16 << 20
SIZE_BYTES = 4
# Arrays longer than this in a request are malformed (a partition count, a topic list):
# bounds the work one small frame can ask for.
ARRAY_LENGTH_MAX = 100_000

_I8, _I16, _I32, _I64 = struct.Struct(">b"), struct.Struct(">h"), struct.Struct(">i"), struct.Struct(">q")
_FIXED = {"int8": _I8, "int16": _I16, "int32": _I32, "int64": _I64}


class KafkaProtocolError(ValueError):
    """A frame that breaks the protocol; `reason` labels the invalid-frames metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None


# ---- framing -----------------------------------------------------------------------------


class FrameReader:
    """Bytes from a stream in, whole request frames (without the size prefix) out."""

    def __init__(self, frame_bytes_max: int = REQUEST_BYTES_MAX) -> None:
        self._buf = bytearray()
        self._frame_bytes_max = frame_bytes_max

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        while len(self._buf) >= SIZE_BYTES:
            size = _I32.unpack_from(self._buf)[0]
            if not 0 < size <= self._frame_bytes_max:
                raise KafkaProtocolError("size", f"request size {size} is outside 1..{self._frame_bytes_max}")
            if len(self._buf) < SIZE_BYTES + size:
                break
            frames.append(bytes(self._buf[SIZE_BYTES:SIZE_BYTES + size]))
            del self._buf[:SIZE_BYTES + size]
        return frames

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)


def frame(payload: bytes) -> bytes:
    return _I32.pack(len(payload)) + payload


# ---- primitive reads and writes ----------------------------------------------------------


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf, pos: int = 0) -> None:
        self.buf = memoryview(buf)
        self.pos = pos

    def fixed(self, s: struct.Struct) -> int:
        if self.pos + s.size > len(self.buf):
            raise KafkaProtocolError("truncated", "request body ends inside a field")
        v = s.unpack_from(self.buf, self.pos)[0]
        self.pos += s.size
        return v

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise KafkaProtocolError("truncated", "request body ends inside a string or bytes field")
        v = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return v


def _read(r: _Reader, kind, version: int):
    if isinstance(kind, tuple):
        nullable = kind[0] == "narray"
        n = r.fixed(_I32)
        if n == -1 and nullable:
            return None
        if not 0 <= n <= ARRAY_LENGTH_MAX:
            raise KafkaProtocolError("malformed", f"array length {n} is invalid")
        item = kind[1]
        if isinstance(item, str):
            return [_read(r, item, version) for _ in range(n)]
        return [_read_struct(r, item, version) for _ in range(n)]
    s = _FIXED.get(kind)
    if s is not None:
        return r.fixed(s)
    if kind == "bool":
        return r.fixed(_I8) != 0
    if kind in ("string", "nstring"):
        n = r.fixed(_I16)
        if n == -1 and kind == "nstring":
            return None
        if n < 0:
            raise KafkaProtocolError("malformed", f"string length {n} is invalid")
        try:
            return r.raw(n).decode()
        except UnicodeDecodeError:
            raise KafkaProtocolError("malformed", "a string is not UTF-8") from None
    if kind in ("bytes", "nbytes"):
        n = r.fixed(_I32)
        if n == -1 and kind == "nbytes":
            return None
        if n < 0:
            raise KafkaProtocolError("malformed", f"bytes length {n} is invalid")
        return r.raw(n)
    raise AssertionError(f"unknown schema type {kind!r}")


def _fields(fields, version: int):
    return [(name, kind) for name, kind, first, last in fields if first <= version <= last]


def _read_struct(r: _Reader, fields, version: int) -> dict:
    return {name: _read(r, kind, version) for name, kind in _fields(fields, version)}


def _write(out: list, kind, value, version: int) -> None:
    if isinstance(kind, tuple):
        if value is None:
            assert kind[0] == "narray", "null for a non-nullable array"
            out.append(_I32.pack(-1))
            return
        out.append(_I32.pack(len(value)))
        item = kind[1]
        for v in value:
            if isinstance(item, str):
                _write(out, item, v, version)
            else:
                _write_struct(out, item, v, version)
        return
    s = _FIXED.get(kind)
    if s is not None:
        out.append(s.pack(value))
    elif kind == "bool":
        out.append(b"\x01" if value else b"\x00")
    elif kind in ("string", "nstring"):
        if value is None:
            assert kind == "nstring", "null for a non-nullable string"
            out.append(_I16.pack(-1))
        else:
            data = value.encode()
            out.append(_I16.pack(len(data)))
            out.append(data)
    elif kind in ("bytes", "nbytes"):
        if value is None:
            assert kind == "nbytes", "null for non-nullable bytes"
            out.append(_I32.pack(-1))
        else:
            out.append(_I32.pack(len(value)))
            out.append(value)
    else:
        raise AssertionError(f"unknown schema type {kind!r}")


_DEFAULTS = {"int8": 0, "int16": 0, "int32": 0, "int64": 0, "bool": False, "string": "", "nstring": None,
             "bytes": b"", "nbytes": None}


def _write_struct(out: list, fields, value: dict, version: int) -> None:
    for name, kind in _fields(fields, version):
        v = value.get(name, _DEFAULTS.get(kind) if isinstance(kind, str) else [])
        _write(out, kind, v, version)


# ---- messages ----------------------------------------------------------------------------


def encode_body(fields, value: dict, version: int) -> bytes:
    """The body of a message with `fields` at `version`; absent fields take their
    type's default (0, "", null, empty array), as Kafka's generated classes do."""
    out: list = []
    _write_struct(out, fields, value, version)
    return b"".join(out)


def decode_body(fields, data, version: int, pos: int = 0) -> dict:
    r = _Reader(data, pos)
    value = _read_struct(r, fields, version)
    if r.pos != len(r.buf):
        raise KafkaProtocolError("malformed", f"{len(r.buf) - r.pos} bytes after the request body")
    return value


def decode_header(data) -> tuple[RequestHeader, int]:
    """Request header v1 (the header of every non-flexible request); returns it and the
    body's position."""
    r = _Reader(data)
    api_key, api_version, correlation_id = r.fixed(_I16), r.fixed(_I16), r.fixed(_I32)
    client_id = _read(r, "nstring", 0)
    return RequestHeader(api_key, api_version, correlation_id, client_id), r.pos


def decode_request(data) -> tuple[RequestHeader, dict]:
    """Header and body of a request whose api key and version the codec knows; raises
    KafkaProtocolError("api_key" | "version" | "truncated" | "malformed") otherwise."""
    header, pos = decode_header(data)
    check_version(header)
    return header, decode_body(SCHEMAS[header.api_key][0], data, header.api_version, pos)


def check_version(header: RequestHeader) -> None:
    if header.api_key not in SCHEMAS:
        raise KafkaProtocolError("api_key", f"api key {header.api_key} is not supported")
    low, high = CODEC_VERSIONS[ApiKey(header.api_key)]
    if not low <= header.api_version <= high:
        raise KafkaProtocolError("version", f"api key {header.api_key} version {header.api_version} "
                                            f"is not supported ({low}..{high})")


def encode_request(api_key: int, version: int, correlation_id: int, client_id: str | None, body: dict) -> bytes:
    """A whole request frame (size prefix included): what a client sends."""
    head = _I16.pack(api_key) + _I16.pack(version) + _I32.pack(correlation_id)
    head += encode_body([("client_id", "nstring", 0, 0)], {"client_id": client_id}, 0)
    return frame(head + encode_body(SCHEMAS[ApiKey(api_key)][0], body, version))


def encode_response(api_key: int, version: int, correlation_id: int, body: dict) -> bytes:
    """A whole response frame: response header v0 (correlation id) and the body."""
    return frame(_I32.pack(correlation_id) + encode_body(SCHEMAS[ApiKey(api_key)][1], body, version))


def decode_response(api_key: int, version: int, data) -> tuple[int, dict]:
    """(correlation id, body) of a response frame without its size prefix."""
    correlation_id = _I32.unpack_from(data)[0]
    return correlation_id, decode_body(SCHEMAS[ApiKey(api_key)][1], data, version, 4)
