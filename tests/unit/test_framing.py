"""Unit tests for the frame layer of runner.protocol.codec: encode_frame and FrameDecoder."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.protocol.codec import DecodeError, FrameDecoder, FrameTooLarge, encode_frame
from runner.protocol.messages import MAX_PAYLOAD, Frame

frames = st.lists(
    st.builds(Frame, type=st.integers(0, 255), payload=st.binary(min_size=1, max_size=300)),
    min_size=1,
    max_size=12,
)


def _drain(decoder: FrameDecoder) -> list[Frame]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def _header(rpc_type: int, size: int) -> bytes:
    return bytes([rpc_type]) + size.to_bytes(3, "big")


class TestEncodeFrame:
    def test_layout(self) -> None:
        """A frame is the type byte, a 24-bit big-endian length and the payload."""
        assert encode_frame(2, b"abc") == b"\x02\x00\x00\x03abc"
        assert encode_frame(255, bytes(0x010203))[:4] == b"\xff\x01\x02\x03"

    def test_max_payload_accepted(self) -> None:
        """A payload of exactly 16 MiB - 1 bytes fits the length field."""
        frame = encode_frame(3, bytes(MAX_PAYLOAD))
        assert frame[:4] == b"\x03\xff\xff\xff"
        assert len(frame) == MAX_PAYLOAD + 4

    def test_oversized_payload_refused(self) -> None:
        """A 16 MiB payload does not fit 24 bits and raises FrameTooLarge."""
        with pytest.raises(FrameTooLarge):
            encode_frame(3, bytes(MAX_PAYLOAD + 1))

    @pytest.mark.parametrize("rpc_type", [-1, 256, 1 << 24])
    def test_type_out_of_range(self, rpc_type: int) -> None:
        """A type that is not one byte raises ValueError."""
        with pytest.raises(ValueError, match=r"outside 0\.\.255"):
            encode_frame(rpc_type, b"x")

    def test_empty_payload_refused(self) -> None:
        """An empty payload is refused because APISIX cannot decode it."""
        with pytest.raises(ValueError, match="empty"):
            encode_frame(1, b"")


class TestFrameDecoder:
    def test_round_trip(self) -> None:
        """An encoded frame decodes back to its type and payload."""
        decoder = FrameDecoder()
        decoder.feed(encode_frame(4, b"payload"))
        assert decoder.next_frame() == Frame(4, b"payload")
        assert decoder.next_frame() is None
        assert decoder.buffered == 0

    @given(frames=frames, data=st.data())
    def test_arbitrary_chunking(self, frames: list[Frame], data: st.DataObject) -> None:
        """Frames back to back, split at arbitrary points, come out whole and in order."""
        stream = b"".join(encode_frame(f.type, f.payload) for f in frames)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
        decoder = FrameDecoder()
        got: list[Frame] = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            decoder.feed(stream[start:end])
            got.extend(_drain(decoder))
        assert got == frames
        assert decoder.buffered == 0

    def test_max_payload_in_small_chunks(self) -> None:
        """A 16 MiB - 1 payload fed in 4 KiB chunks decodes once, exactly when complete."""
        payload = bytes(range(256)) * (MAX_PAYLOAD // 256) + b"\x01" * (MAX_PAYLOAD % 256)
        stream = encode_frame(3, payload) + encode_frame(0, b"next")
        decoder = FrameDecoder()
        got: list[Frame] = []
        for pos in range(0, len(stream), 4096):
            decoder.feed(stream[pos : pos + 4096])
            got.extend(_drain(decoder))
        assert [f.type for f in got] == [3, 0]
        assert got[0].payload == payload
        assert got[1].payload == b"next"

    def test_compaction_keeps_the_tail(self) -> None:
        """Consuming large frames from a long buffer keeps the unread tail intact."""
        stream = b"".join(encode_frame(i, bytes([i]) * 30_000) for i in range(1, 7))
        decoder = FrameDecoder()
        decoder.feed(stream[:-10_000])
        got = _drain(decoder)
        assert decoder.buffered == 30_004 - 10_000
        decoder.feed(stream[-10_000:])
        got += _drain(decoder)
        assert [f.payload for f in got] == [bytes([i]) * 30_000 for i in range(1, 7)]

    def test_truncated_input_needs_more(self) -> None:
        """A partial header or body yields None, not an error, and stays buffered."""
        frame = encode_frame(2, b"hello")
        decoder = FrameDecoder()
        decoder.feed(frame[:3])
        assert decoder.next_frame() is None
        decoder.feed(frame[3:7])
        assert decoder.next_frame() is None
        assert decoder.buffered == 7
        decoder.feed(frame[7:])
        assert decoder.next_frame() == Frame(2, b"hello")

    def test_oversized_header_raises_immediately(self) -> None:
        """A header announcing more than max_payload raises before any body arrives."""
        decoder = FrameDecoder(max_payload=1000)
        decoder.feed(_header(2, 1001))
        with pytest.raises(FrameTooLarge):
            decoder.next_frame()

    def test_limit_is_inclusive(self) -> None:
        """A header announcing exactly max_payload is accepted and waits for the body."""
        decoder = FrameDecoder(max_payload=1000)
        decoder.feed(_header(2, 1000))
        assert decoder.next_frame() is None
        decoder.feed(bytes(1000))
        assert decoder.next_frame() == Frame(2, bytes(1000))

    def test_zero_length_rejected(self) -> None:
        """A zero-length payload is a DecodeError (but not FrameTooLarge)."""
        decoder = FrameDecoder()
        decoder.feed(_header(1, 0) + b"more")
        with pytest.raises(DecodeError) as info:
            decoder.next_frame()
        assert type(info.value) is DecodeError

    def test_unusable_after_error(self) -> None:
        """After an error, both feed() and next_frame() raise again."""
        decoder = FrameDecoder(max_payload=10)
        decoder.feed(_header(1, 11))
        with pytest.raises(FrameTooLarge):
            decoder.next_frame()
        with pytest.raises(FrameTooLarge):
            decoder.next_frame()
        with pytest.raises(FrameTooLarge):
            decoder.feed(encode_frame(1, b"fine"))

    @pytest.mark.parametrize("limit", [0, -1, MAX_PAYLOAD + 1])
    def test_limit_validated(self, limit: int) -> None:
        """max_payload outside 1..MAX_PAYLOAD raises ValueError."""
        with pytest.raises(ValueError, match="max_payload"):
            FrameDecoder(max_payload=limit)


def _reference(decoder: FrameDecoder, chunk: bytes) -> tuple[list[tuple[int, bytes]], str | None]:
    """What feed() + next_frame() until None give for ``chunk``: the frames, then the error if any."""
    out: list[tuple[int, bytes]] = []
    try:
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            out.append((frame.type, frame.payload))
    except DecodeError as exc:
        return out, f"{type(exc).__name__}: {exc}"
    return out, None


def _fast(decoder: FrameDecoder, chunk: bytes) -> tuple[list[tuple[int, bytes]], str | None]:
    try:
        out = decoder.frames(chunk)
    except DecodeError as exc:
        return [], f"{type(exc).__name__}: {exc}"
    error = decoder.error
    return out, None if error is None else f"{type(error).__name__}: {error}"


class TestFrames:
    """frames(data) is feed(data) + next_frame() until None, without Frame objects."""

    @given(
        frames=frames,
        bad=st.sampled_from([None, 0, 11, 1 << 20]),
        data=st.data(),
        kind=st.sampled_from([bytes, bytearray, memoryview]),
    )
    def test_same_as_feed_and_next_frame(
        self, frames: list[Frame], bad: int | None, data: st.DataObject, kind: type
    ) -> None:
        """Any chunking, with or without a bad header at the end: the same frames, then the same error."""
        stream = b"".join(encode_frame(f.type, f.payload) for f in frames)
        if bad is not None:
            stream += _header(2, bad) + b"tail"
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
        reference, fast = FrameDecoder(max_payload=1000), FrameDecoder(max_payload=1000)
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            expected = _reference(reference, stream[start:end])
            got = _fast(fast, kind(stream[start:end]))
            assert got == expected
            assert all(type(payload) is bytes for _, payload in got[0])
            if expected[1] is not None:
                break
            assert fast.buffered == reference.buffered

    def test_whole_frames_come_from_the_chunk(self) -> None:
        """Nothing buffered and whole frames in the chunk: sliced from it, nothing left buffered."""
        decoder = FrameDecoder()
        assert decoder.frames(encode_frame(2, b"abc") + encode_frame(3, b"de")) == [(2, b"abc"), (3, b"de")]
        assert decoder.buffered == 0

    def test_error_after_frames_is_reported_after_them(self) -> None:
        """A bad header after a good frame: the frame is returned, error is set, later calls raise."""
        decoder = FrameDecoder(max_payload=10)
        assert decoder.frames(encode_frame(1, b"ok") + _header(1, 11)) == [(1, b"ok")]
        assert isinstance(decoder.error, FrameTooLarge)
        with pytest.raises(FrameTooLarge, match="unusable"):
            decoder.frames(b"")
        with pytest.raises(FrameTooLarge, match="unusable"):
            decoder.next_frame()
