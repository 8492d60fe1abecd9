"""Frame layer of the ext-plugin protocol: a 4-byte header (type, 24-bit length), then the payload.

Sans-IO like the rest of the codec: :class:`FrameDecoder` cuts whatever bytes arrived into whole
frames and :func:`encode_frame` puts a header in front of a payload. Both refuse an empty or
oversized payload, since APISIX can neither send nor read one. Public under ``runner.protocol.codec``.
"""

from __future__ import annotations

import struct
from typing import Final

from ._flat import DecodeError, FrameTooLarge
from .messages import MAX_PAYLOAD, Frame

__all__ = ["FrameDecoder", "encode_frame"]

_HEADER: Final = struct.Struct(">I")
_HEADER_UNPACK: Final = _HEADER.unpack_from
# Below this many consumed bytes a partly-read buffer is not worth moving.
_COMPACT_AT: Final = 1 << 16


class FrameDecoder:
    """Incremental frame splitter: feed() any chunks, next_frame() returns whole frames or None.

    ``frames(data)`` does both at once and is what the runner uses: one call per received chunk.

    A header announcing an empty or oversized payload raises as soon as its 4 bytes are seen,
    without waiting for the body. After an error every further call raises again.
    """

    __slots__ = ("_buf", "_error", "_max", "_pos")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        if not 1 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in 1..{MAX_PAYLOAD}")
        self._max = max_payload
        self._buf = bytearray()
        self._pos = 0
        self._error: DecodeError | None = None

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            self._fail_again()
        self._buf += data

    def next_frame(self) -> Frame | None:
        item = self._next()
        return None if item is None else Frame(*item)

    def frames(self, data: bytes) -> list[tuple[int, bytes]]:
        """Feed ``data`` and return every frame it completes, in order, as ``(type, payload)``.

        The same frames as ``feed(data)`` followed by ``next_frame()`` until None, without a
        Frame object per frame and, when nothing is buffered (APISIX sends one whole message at a
        time, so almost always), without copying ``data`` into the buffer first: payloads are
        sliced straight out of it.

        A bad header raises like ``next_frame`` would, but only once the frames before it are
        delivered: if this chunk completed frames first, they are returned and :attr:`error` is
        set; the caller handles them and then raises it (every later call raises too).
        """
        if self._error is not None:
            self._fail_again()
        if self._pos != len(self._buf):
            self._buf += data  # a partial frame is waiting: continue it in the buffer
            return self._drain()
        if type(data) is not bytes:
            data = bytes(data)  # payloads must be bytes whatever the caller passed
        out: list[tuple[int, bytes]] = []
        pos, n, limit = 0, len(data), self._max
        while n - pos >= 4:
            head = _HEADER_UNPACK(data, pos)[0]
            size = head & 0xFFFFFF
            if size == 0 or size > limit:
                self._reject(size)
                if out:
                    return out
                raise self._error  # type: ignore[misc]  # set by _reject
            end = pos + 4 + size
            if end > n:
                break
            out.append((head >> 24, data[pos + 4 : end]))
            pos = end
        if pos < n:
            self._buf += memoryview(data)[pos:]
        return out

    @property
    def error(self) -> DecodeError | None:
        """The framing error that made this decoder unusable, if any."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._pos

    def _drain(self) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        try:
            while (item := self._next()) is not None:
                out.append(item)
        except DecodeError:
            if not out:
                raise
        return out

    def _next(self) -> tuple[int, bytes] | None:
        if self._error is not None:
            self._fail_again()
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        head = _HEADER_UNPACK(buf, pos)[0]
        size = head & 0xFFFFFF
        if size == 0 or size > self._max:
            self._reject(size)
            raise self._error  # type: ignore[misc]  # set by _reject
        end = pos + 4 + size
        if end > len(buf):
            return None
        with memoryview(buf) as view:
            payload = bytes(view[pos + 4 : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end >= _COMPACT_AT and 2 * end >= len(buf):
            # Moving the tail is cheaper than what was consumed, so compaction stays linear.
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return head >> 24, payload

    def _reject(self, size: int) -> None:
        err = FrameTooLarge if size else DecodeError
        self._error = err(f"frame announces a payload of {size} bytes (allowed 1..{self._max})")

    def _fail_again(self) -> None:
        assert self._error is not None
        raise type(self._error)(f"decoder is unusable after an earlier error: {self._error}")


def encode_frame(rpc_type: int, payload: bytes) -> bytes:
    """Prefix ``payload`` with its frame header (mostly for tests: the message encoders return whole frames)."""
    if not 0 <= rpc_type <= 255:
        raise ValueError(f"frame type {rpc_type} is outside 0..255")
    size = len(payload)
    if size > MAX_PAYLOAD:
        raise FrameTooLarge(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
    if not size:
        raise ValueError("APISIX cannot handle an empty payload")
    return _HEADER.pack(rpc_type << 24 | size) + payload
