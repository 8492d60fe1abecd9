"""FlatBuffers writer for the A6 schema (private to runner.protocol; use it through ``_flat``).

Messages are written front to back into one ``bytearray``; layout is
``[frame header][root uoffset][vtable][table][children...]``. Children always come after the
field that points to them, so every uoffset is positive; the vtable precedes its table, so its
(signed) soffset is positive too. Tables, strings and vectors start 4-aligned and fields are
placed largest first, so every scalar is aligned to its size.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Final, NamedTuple, TypeAlias

from ._flat_read import FrameTooLarge
from .messages import MAX_PAYLOAD, Pairs

_ENTRY_HEAD: Final = struct.Struct("<iII").pack
_ENTRY_HEAD_V: Final = struct.Struct("<iIII").pack
_PACK_U32: Final = struct.Struct("<I").pack
_PACK_I32: Final = struct.Struct("<i").pack
_ZEROS: Final = tuple(bytes(k) for k in range(8))


class Layout(NamedTuple):
    """Precomputed shape of a table: vtable bytes (4-padded), inline offset per slot, padded size."""

    vtable: bytes
    offsets: dict[int, int]
    size: int


@cache
def layout(fields: tuple[tuple[int, int], ...]) -> Layout:
    """Layout for a table whose present fields are ``(slot, inline_size)`` pairs."""
    offsets: dict[int, int] = {}
    pos = 4  # the soffset to the vtable comes first
    for slot, size in sorted(fields, key=lambda f: -f[1]):
        offsets[slot] = pos
        pos += size
    nslots = max(offsets, default=-1) + 1
    vt = [4 + 2 * nslots, pos, *(offsets.get(s, 0) for s in range(nslots))]
    raw = struct.pack(f"<{len(vt)}H", *vt)
    return Layout(raw + _ZEROS[-len(raw) & 3], offsets, (pos + 3) & ~3)


def new_frame() -> bytearray:
    """A buffer holding room for the frame header and the root uoffset."""
    return bytearray(8)


def finish(out: bytearray, rpc_type: int, root_pos: int) -> bytes:
    """Fill in the root uoffset and frame header; return the whole frame."""
    n = len(out) - 4
    if n > MAX_PAYLOAD:
        raise FrameTooLarge(f"payload of {n} bytes exceeds {MAX_PAYLOAD}")
    struct.pack_into("<I", out, 4, root_pos - 4)
    struct.pack_into(">I", out, 0, rpc_type << 24 | n)
    return bytes(out)


def put_table(out: bytearray, lay: Layout) -> int:
    """Append a zeroed table (vtable first); return its position. ``len(out)`` must be 4-aligned."""
    out += lay.vtable
    t = len(out)
    out += _PACK_I32(len(lay.vtable))
    out += _ZEROS[4] * ((lay.size - 4) >> 2)
    return t


def put_string(out: bytearray, data: bytes) -> int:
    """Append a NUL-terminated string; return its position. Keeps ``len(out)`` 4-aligned."""
    pos = len(out)
    size = len(data)
    out += _PACK_U32(size)
    out += data
    out += _ZEROS[((size + 8) & ~3) - 4 - size]
    return pos


def put_bytes(out: bytearray, data: bytes | bytearray | memoryview) -> int:
    """Append a ``[ubyte]`` vector; return its position. Keeps ``len(out)`` 4-aligned."""
    pos = len(out)
    size = len(data)
    out += _PACK_U32(size)
    out += data
    out += _ZEROS[-size & 3]
    return pos


# Shared TextEntry vtables: with and without a value (slot 1 offset 0 = absent).
_VT_VALUE: Final = struct.pack("<4H", 8, 12, 4, 8)
_VT_FLAG: Final = struct.pack("<4H", 8, 8, 4, 0)


def put_entries(out: bytearray, pairs: Iterable[tuple[str, str | None]]) -> int:
    """Append a ``[TextEntry]`` vector; return its position. Strings are surrogateescape-encoded."""
    items = [
        (k.encode("utf-8", "surrogateescape"), None if v is None else v.encode("utf-8", "surrogateescape"))
        for k, v in pairs
    ]
    vt_value = len(out)
    out += _VT_VALUE
    vt_flag = len(out)
    out += _VT_FLAG
    vec = len(out)
    count = len(items)
    out += _PACK_U32(count)
    out += bytes(4 * count)
    rels = []
    slot = vec + 4
    for name, value in items:
        t = len(out)
        nlen = len(name)
        if value is None:
            out += _ENTRY_HEAD(t - vt_flag, 4, nlen)
            out += name
            out += _ZEROS[((nlen + 8) & ~3) - 4 - nlen]
        else:
            padded = (nlen + 8) & ~3
            vlen = len(value)
            out += _ENTRY_HEAD_V(t - vt_value, 8, 4 + padded, nlen)
            out += name
            out += _ZEROS[padded - 4 - nlen]
            out += _PACK_U32(vlen)
            out += value
            out += _ZEROS[((vlen + 8) & ~3) - 4 - vlen]
        rels.append(t - slot)
        slot += 4
    if count:
        struct.pack_into(f"<{count}I", out, vec + 4, *rels)
    return vec


Child: TypeAlias = str | bytes | bytearray | memoryview | Pairs | Callable[[bytearray], int]
"""What a uoffset field points to: a string, a ``[ubyte]``, a ``[TextEntry]``, or a writer
callback that appends a table (for union members) and returns its position."""

_PUT_U32: Final = struct.Struct("<I").pack_into
_PUT_SCALAR: Final = {4: _PUT_U32, 2: struct.Struct("<H").pack_into}


def put_object(out: bytearray, scalars: Sequence[tuple[int, int, int]], refs: Sequence[tuple[int, Child]]) -> int:
    """Append a table with ``scalars`` as ``(slot, size, value)`` and ``refs`` as ``(slot, child)``.

    Children are appended after the table in the order given. Returns the table's position.
    Range checks on scalar values are the caller's job.
    """
    key = [(slot, size) for slot, size, _ in scalars]
    key += [(slot, 4) for slot, _ in refs]
    lay = layout(tuple(key))
    t = put_table(out, lay)
    offsets = lay.offsets
    for slot, size, value in scalars:
        if size == 1:
            out[t + offsets[slot]] = value
        else:
            _PUT_SCALAR[size](out, t + offsets[slot], value)
    for slot, child in refs:
        kind = type(child)
        if kind is str:
            pos = put_string(out, child.encode("utf-8", "surrogateescape"))  # type: ignore[union-attr]
        elif kind is bytes or isinstance(child, (bytearray, memoryview)):
            pos = put_bytes(out, child)  # type: ignore[arg-type]
        elif isinstance(child, (tuple, list)):
            pos = put_entries(out, child)
        else:
            pos = child(out)  # type: ignore[operator]
        field = t + offsets[slot]
        _PUT_U32(out, field, pos - field)
    return t
