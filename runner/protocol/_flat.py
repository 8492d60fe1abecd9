"""Minimal FlatBuffers reader and writer for the A6 schema (private to runner.protocol).

The generated ``A6`` accessors cost ~0.5 ms per request (runner.md §1.4), so messages are read
with ``struct`` straight from the payload (``_flat_read``) and written front to back into one
``bytearray`` (``_flat_write``). This module is the one namespace both sides of the codec use:
it re-exports the reader and writer, and holds the A6 conventions that the runner side
(``_decode``, ``_encode``) and ``_peer`` (APISIX side) share, so neither has to import the other's
private helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._flat_read import (
    DecodeError,
    FrameTooLarge,
    Shape,
    byte_vector,
    find_entry,
    fold_header_name,
    names_folding_to,
    root,
    root_byte_vector,
    root_offsets,
    string,
    sub_table,
    table,
    text_entries,
)
from ._flat_write import (
    Child,
    Layout,
    finish,
    layout,
    new_frame,
    put_bytes,
    put_entries,
    put_object,
    put_string,
    put_table,
)
from .messages import Pairs

__all__ = [
    "ACTION_NONE",
    "ACTION_REWRITE",
    "ACTION_STOP",
    "INFO_REQ_BODY",
    "INFO_RESP_BODY",
    "INFO_VAR",
    "Child",
    "DecodeError",
    "FrameTooLarge",
    "Layout",
    "Shape",
    "build_frame",
    "byte_vector",
    "check_uint",
    "entries_or_empty",
    "find_entry",
    "finish",
    "fold_header_name",
    "layout",
    "names_folding_to",
    "new_frame",
    "put_bytes",
    "put_entries",
    "put_object",
    "put_string",
    "put_table",
    "root",
    "root_byte_vector",
    "root_offsets",
    "string",
    "sub_table",
    "table",
    "text_entries",
    "valued",
]

# Union type tags: HTTPReqCall.Resp.action (Action) and ExtraInfo.Req.info (Info); 0 is NONE.
ACTION_NONE, ACTION_STOP, ACTION_REWRITE = range(3)
INFO_VAR, INFO_REQ_BODY, INFO_RESP_BODY = 1, 2, 3


def check_uint(value: int, bits: int, what: str) -> int:
    """``value`` if it fits in an unsigned ``bits``-bit field (put_object leaves range checks to callers)."""
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value} does not fit in uint{bits}")
    return value


def valued(pairs: Pairs, what: str) -> tuple[tuple[str, str], ...]:
    """``pairs`` once every entry is known to carry a value (else :class:`DecodeError`)."""
    for _, value in pairs:
        if value is None:
            raise DecodeError(f"{what} entry without a value")
    return pairs  # type: ignore[return-value]  # checked above: no None values


def entries_or_empty(buf: bytes, field: int, errors: str = "surrogateescape") -> Pairs:
    """The ``[TextEntry]`` at ``field``, or ``()`` when the field is absent (0)."""
    return text_entries(buf, field, errors) if field else ()


def build_frame(rpc_type: int, scalars: Sequence[tuple[int, int, int]], refs: Sequence[tuple[int, Child]]) -> bytes:
    """A whole frame whose root table is ``put_object(scalars, refs)``."""
    out = new_frame()
    return finish(out, rpc_type, put_object(out, scalars, refs))
