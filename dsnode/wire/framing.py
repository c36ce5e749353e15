"""Sans-I/O length-prefixed framing: feed bytes in, take whole frames out.

A frame is a 4-byte unsigned big-endian length ``L`` followed by ``L`` bytes.
``1 <= L <= max_frame_bytes``; anything else is a :class:`FrameError` and the
stream cannot be resynchronised, so the connection must be closed.
"""

from __future__ import annotations

import struct

import msgpack

HEADER = struct.Struct(">I")
HEADER_BYTES = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024


class FrameError(Exception):
    """The byte stream broke the framing rules; ``code`` is the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FrameDecoder:
    """Accumulates bytes and yields complete frame payloads.

    After a :class:`FrameError` the decoder is poisoned: further ``feed`` calls
    raise the same error.
    """

    __slots__ = ("_buf", "_max", "_error")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be >= 1")
        self._buf = bytearray()
        self._max = max_frame_bytes
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def max_frame_bytes(self) -> int:
        return self._max

    @max_frame_bytes.setter
    def max_frame_bytes(self, n: int) -> None:
        """Change the cap (e.g. raise it once a connection has authenticated)."""
        if n < 1:
            raise ValueError("max_frame_bytes must be >= 1")
        self._max = n

    def raise_limit(self, max_frame_bytes: int) -> None:
        """A connection that turned out to carry peer traffic takes larger frames."""
        self._max = max(self._max, max_frame_bytes)

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_BYTES:
            (length,) = HEADER.unpack_from(buf, pos)
            if length == 0:
                self._error = FrameError("bad_request", "frame length 0: a frame holds one msgpack map")
                raise self._error
            if length > self._max:
                self._error = FrameError(
                    "too_large", f"frame of {length} bytes exceeds max_frame_bytes={self._max}"
                )
                raise self._error
            if end - pos - HEADER_BYTES < length:
                break
            start = pos + HEADER_BYTES
            frames.append(bytes(buf[start : start + length]))
            pos = start + length
        if pos:
            del buf[:pos]
        return frames


def encode_frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload




def pack_frame(obj: object) -> bytes:
    """msgpack-encode ``obj`` (bin for bytes, str for text) and frame it."""
    payload = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def unpack_payload(payload: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> object:
    """Decode one frame payload with explicit limits; raises ValueError-family on garbage.

    Exactly one msgpack object must fill the payload (trailing bytes are an error).
    """
    return msgpack.unpackb(
        payload,
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_str_len=max_frame_bytes,
        max_bin_len=max_frame_bytes,
        max_array_len=1 << 20,
        max_map_len=1 << 20,
        max_ext_len=0,
    )
