"""FlatBuffers reader for the A6 schema (private to runner.protocol; use it through ``_flat``).

The generated ``A6`` accessors cost ~0.5 ms per request (runner.md §1.4), so messages are read
with ``struct`` straight from the payload.

Every offset is checked against the buffer before it is followed, so malformed input raises
:class:`DecodeError` and nothing else. Alignment is not checked on read: ``struct`` reads
unaligned data correctly, so the check would cost time without protecting anything.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import cache
from typing import Final

from .messages import Pairs


class DecodeError(ValueError):
    """The peer sent bytes that are not a valid message (maps to Err BAD_REQUEST / closing)."""


class FrameTooLarge(DecodeError):
    """A frame announced (or an encoder was asked for) more than the allowed payload size."""


# Public under runner.protocol.codec; say so in tracebacks and pickles.
DecodeError.__module__ = FrameTooLarge.__module__ = "runner.protocol.codec"

_U32: Final = struct.Struct("<I").unpack_from
_I32: Final = struct.Struct("<i").unpack_from
_U16: Final = struct.Struct("<H").unpack_from
_U16X2: Final = struct.Struct("<HH").unpack_from


@cache
def _unpack_u16s(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}H")


def _unpack_u32s(buf: bytes, pos: int, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}I", buf, pos)


def table(buf: bytes, pos: int, sizes: tuple[int, ...]) -> list[int]:
    """Open the table at ``pos``; return the absolute position of each field in ``sizes``, 0 if absent.

    ``sizes`` gives the inline byte size of slots 0..n-1; each present field must lie inside
    the table's declared inline size, which itself lies inside the buffer. After this check,
    scalars can be read at the returned positions without further bounds checks.
    """
    n = len(buf)
    if pos + 4 > n:
        raise DecodeError("table offset out of range")
    vt = pos - _I32(buf, pos)[0]
    if vt < 0 or vt + 4 > n:
        raise DecodeError("vtable offset out of range")
    vtsize, tsize = _U16X2(buf, vt)
    if vtsize < 4 or vtsize & 1 or vt + vtsize > n or tsize < 4 or pos + tsize > n:
        raise DecodeError("bad vtable")
    want = len(sizes)
    have = min(want, (vtsize - 4) >> 1)
    fields = [0] * want
    if have:
        for i, off in enumerate(_unpack_u16s(have).unpack_from(buf, vt + 4)):
            if off:
                if off < 4 or off + sizes[i] > tsize:
                    raise DecodeError("field outside its table")
                fields[i] = pos + off
    return fields


class Shape:
    """A table's slots (inline byte size of slots 0..n-1), prepared for :func:`root_offsets`.

    Remembers the vtables it has validated: builders emit the same vtable for every message with
    the same fields present, so APISIX's requests share a handful of them.
    """

    __slots__ = ("known", "sizes")

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes
        self.known: dict[bytes, tuple[int, ...]] = {}
        """vtable bytes after vtsize (tsize, slot offsets) -> relative slot offsets; bounded."""


# Validated vtables remembered per Shape, and the largest vtable worth remembering: together they
# bound the memory a peer sending ever-different vtables can make us hold (here ~16 KiB per Shape).
_KNOWN_VTABLES: Final = 256
_KNOWN_VTABLE_BYTES: Final = 64


def root_offsets(buf: bytes, shape: Shape) -> tuple[int, tuple[int, ...]]:
    """Open the root table: its position and each slot's offset *relative* to it (0 if absent).

    Accepts and rejects exactly what :func:`root` does. Whether the fields fit their table depends
    only on the vtable (table size and slot offsets), so a vtable validated once is looked up by its
    bytes instead of being checked slot by slot again; what remains per message are the checks that
    involve the message's own length.
    """
    n = len(buf)
    if n < 4:
        raise DecodeError("payload shorter than a root offset")
    pos: int = _U32(buf, 0)[0]
    if pos + 4 > n:
        raise DecodeError("table offset out of range")
    vt = pos - _I32(buf, pos)[0]
    if vt < 0 or vt + 4 > n:
        raise DecodeError("vtable offset out of range")
    vtsize, tsize = _U16X2(buf, vt)
    if vtsize < 4 or vtsize & 1 or vt + vtsize > n or tsize < 4 or pos + tsize > n:
        raise DecodeError("bad vtable")
    layout = buf[vt + 2 : vt + vtsize]
    offsets = shape.known.get(layout)
    if offsets is None:
        offsets = tuple(f - pos if f else 0 for f in table(buf, pos, shape.sizes))
        if len(shape.known) < _KNOWN_VTABLES and vtsize <= _KNOWN_VTABLE_BYTES:
            shape.known[bytes(layout)] = offsets
    return pos, offsets


def root_byte_vector(buf: bytes) -> bytes | None:
    """The ``[ubyte]`` in slot 0 of the root table, or None if the slot is absent.

    Exactly ``byte_vector(buf, root(buf, (4,))[0])`` with the same checks and messages, in one
    function: this is A6.ExtraInfo.Resp, decoded once per variable of every request.
    """
    n = len(buf)
    if n < 4:
        raise DecodeError("payload shorter than a root offset")
    pos: int = _U32(buf, 0)[0]
    if pos + 4 > n:
        raise DecodeError("table offset out of range")
    vt = pos - _I32(buf, pos)[0]
    if vt < 0 or vt + 4 > n:
        raise DecodeError("vtable offset out of range")
    vtsize, tsize = _U16X2(buf, vt)
    if vtsize < 4 or vtsize & 1 or vt + vtsize > n or tsize < 4 or pos + tsize > n:
        raise DecodeError("bad vtable")
    off: int = _U16(buf, vt + 4)[0] if vtsize >= 6 else 0
    if not off:
        return None
    if off < 4 or off + 4 > tsize:
        raise DecodeError("field outside its table")
    field = pos + off
    first = field + _U32(buf, field)[0] + 4
    if first > n:
        raise DecodeError("vector offset out of range")
    end: int = first + _U32(buf, first - 4)[0]
    if end > n:
        raise DecodeError("truncated vector")
    return buf[first:end]


def root(buf: bytes, sizes: tuple[int, ...]) -> list[int]:
    """Open the root table of a payload (see :func:`table`)."""
    if len(buf) < 4:
        raise DecodeError("payload shorter than a root offset")
    return table(buf, _U32(buf, 0)[0], sizes)


def sub_table(buf: bytes, field: int, sizes: tuple[int, ...]) -> list[int]:
    """Open the table referenced by the uoffset field at ``field``."""
    return table(buf, field + _U32(buf, field)[0], sizes)


def _vector(buf: bytes, field: int, elem_size: int) -> tuple[int, int]:
    """Position of the first element and the length of the vector referenced by ``field``."""
    first = field + _U32(buf, field)[0] + 4
    if first > len(buf):
        raise DecodeError("vector offset out of range")
    count: int = _U32(buf, first - 4)[0]
    if first + elem_size * count > len(buf):
        raise DecodeError("truncated vector")
    return first, count


def byte_vector(buf: bytes, field: int) -> bytes:
    """Read the ``[ubyte]`` referenced by the uoffset field at ``field``."""
    first, count = _vector(buf, field, 1)
    return buf[first : first + count]


def _span(buf: bytes, field: int) -> tuple[int, int]:
    """Start and end of the bytes of the string referenced by ``field``."""
    start = field + _U32(buf, field)[0] + 4
    if start > len(buf):
        raise DecodeError("string offset out of range")
    end: int = start + _U32(buf, start - 4)[0]
    # The NUL terminator is part of the format; its absence means the string was cut short.
    if end >= len(buf) or buf[end]:
        raise DecodeError("truncated string")
    return start, end


def string(buf: bytes, field: int, errors: str = "surrogateescape") -> str:
    """Read the string referenced by ``field``.

    HTTP data (paths, header and arg names/values) may carry bytes that are not UTF-8; they are
    decoded with ``surrogateescape`` so that re-encoding with the same handler restores them
    exactly. Identifiers the runner interprets (conf entries, var names) use ``errors="strict"``
    and a non-UTF-8 string is then a :class:`DecodeError`.
    """
    start, end = _span(buf, field)
    try:
        return buf[start:end].decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        raise DecodeError("string is not UTF-8") from exc


_Shapes = dict[int, tuple[int, int, int]]


def _entry_shape(buf: bytes, vt: int) -> tuple[int, int, int]:
    if vt < 0 or vt + 4 > len(buf):
        raise DecodeError("vtable offset out of range")
    vtsize, tsize = _U16X2(buf, vt)
    if vtsize < 4 or vtsize & 1 or vt + vtsize > len(buf) or tsize < 4:
        raise DecodeError("bad vtable")
    slots = (vtsize - 4) >> 1
    name_off = _U16(buf, vt + 4)[0] if slots >= 1 else 0
    value_off = _U16(buf, vt + 6)[0] if slots >= 2 else 0
    if not name_off:
        raise DecodeError("TextEntry without a name")
    for off in (name_off, value_off):
        if off and (off < 4 or off + 4 > tsize):
            raise DecodeError("field outside its table")
    return name_off, value_off, tsize


def text_entries(buf: bytes, field: int, errors: str = "surrogateescape") -> Pairs:
    """Read a ``[TextEntry]`` in one pass; an entry without ``value`` gives ``None``.

    This loop is most of the cost of decoding a request, so the entry-table and :func:`_span`
    checks are inlined here rather than read through :func:`_names` (a third faster than calls per
    entry, a quarter faster than the generator); the checks are the same.
    """
    first, count = _vector(buf, field, 4)
    n = len(buf)
    # Entries may point at the same or overlapping strings; without a budget a 1 MB frame could
    # expand into gigabytes of text. Honest encoders never share strings, so the decoded text
    # cannot exceed the frame itself.
    budget = n
    shapes: _Shapes = {}
    out: list[tuple[str, str | None]] = []
    append = out.append
    u32, i32 = _U32, _I32
    slot = first
    try:
        for rel in _unpack_u32s(buf, first, count):
            t = slot + rel
            slot += 4
            if t + 4 > n:
                raise DecodeError("table offset out of range")
            vt = t - i32(buf, t)[0]
            shape = shapes.get(vt)
            if shape is None:
                shape = shapes[vt] = _entry_shape(buf, vt)
            name_off, value_off, tsize = shape
            if t + tsize > n:
                raise DecodeError("bad vtable")
            start = t + name_off
            start += u32(buf, start)[0] + 4
            if start > n:
                raise DecodeError("string offset out of range")
            end = start + u32(buf, start - 4)[0]
            if end >= n or buf[end]:
                raise DecodeError("truncated string")
            budget -= end - start
            name = buf[start:end].decode("utf-8", errors)
            if value_off:
                start = t + value_off
                start += u32(buf, start)[0] + 4
                if start > n:
                    raise DecodeError("string offset out of range")
                end = start + u32(buf, start - 4)[0]
                if end >= n or buf[end]:
                    raise DecodeError("truncated string")
                budget -= end - start
                append((name, buf[start:end].decode("utf-8", errors)))
            else:
                append((name, None))
            if budget < 0:
                raise DecodeError("entries share strings: decoded text larger than the frame")
    except UnicodeDecodeError as exc:
        raise DecodeError("string is not UTF-8") from exc
    return tuple(out)


def _names(buf: bytes, field: int) -> Iterator[tuple[int, int, int, int]]:
    """(table, value field offset or 0, name start, name end) of each TextEntry of the vector at
    ``field``, in order, with the entry-table and :func:`_span` checks inlined (a generator step is
    cheaper than two calls per entry, and the lookups below run on every request)."""
    first, count = _vector(buf, field, 4)
    shapes: _Shapes = {}
    n = len(buf)
    u32, i32 = _U32, _I32
    slot = first
    for _ in range(count):
        t = slot + u32(buf, slot)[0]
        slot += 4
        if t + 4 > n:
            raise DecodeError("table offset out of range")
        vt = t - i32(buf, t)[0]
        shape = shapes.get(vt)
        if shape is None:
            shape = shapes[vt] = _entry_shape(buf, vt)
        name_off, value_off, tsize = shape
        if t + tsize > n:
            raise DecodeError("bad vtable")
        start = t + name_off
        start += u32(buf, start)[0] + 4
        if start > n:
            raise DecodeError("string offset out of range")
        end = start + u32(buf, start - 4)[0]
        if end >= n or buf[end]:
            raise DecodeError("truncated string")
        yield t, value_off, start, end


def find_entry(buf: bytes, field: int, wanted: bytes) -> str | None:
    """Value of the first TextEntry whose name equals ``wanted`` (ASCII case-insensitive), or None.

    Reads only names until it finds a match, so one lookup costs much less than
    :func:`text_entries`; entries after the match are not validated.
    """
    size = len(wanted)
    for t, value_off, start, end in _names(buf, field):
        if end - start == size and buf[start:end].lower() == wanted:
            if not value_off:
                return None
            value_start, value_end = _span(buf, t + value_off)
            return buf[value_start:value_end].decode("utf-8", "surrogateescape")
    return None


def fold_header_name(name: bytes) -> bytes:
    """A header name as CGI-style upstreams read it: ASCII lower-case, ``_`` and ``-`` the same.

    WSGI, PHP, Rack and CGI turn ``X-Client-Subject`` and ``x_client_subject`` into the same
    ``HTTP_X_CLIENT_SUBJECT``; nginx (with APISIX's ``underscores_in_headers on``) passes both.
    """
    return name.lower().replace(b"_", b"-")


def names_folding_to(buf: bytes, field: int, folded: frozenset[bytes]) -> tuple[str, ...]:
    """Names, as sent, of the TextEntries whose :func:`fold_header_name` is in ``folded``.

    Reads names only (values are never decoded); a name that occurs several times is listed once.
    """
    found: list[str] = []
    budget = len(buf)  # entries sharing one huge name must not cost more than the frame (text_entries)
    for _, _, start, end in _names(buf, field):
        budget -= end - start
        if budget < 0:
            raise DecodeError("entries share strings: decoded text larger than the frame")
        raw = buf[start:end]
        if fold_header_name(raw) in folded:
            name = raw.decode("utf-8", "surrogateescape")
            if name not in found:
                found.append(name)
    return tuple(found)
