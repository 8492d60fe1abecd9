"""Fuzz regressions: every saved crash input and every seed replays cleanly through the fuzz harness.

Inputs live in ``tests/fuzz/crashes/<target>/`` (copied there from a fuzzing run) and
``fuzz/corpus/<target>/`` (written by ``python -m fuzz.make_corpus``), through the same harness as
``python -m fuzz replay``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fuzz import harness, make_corpus
from plugins.mtls_guard.policy import compile_policy
from plugins.mtls_guard.schema_readers import PolicyError
from runner.protocol import codec
from runner.protocol.messages import HTTPReqCallReply

ROOT = Path(__file__).resolve().parents[2]
CRASHES = Path(__file__).resolve().parent / "crashes"
CORPUS = ROOT / "fuzz" / "corpus"


def inputs(base: Path) -> list[object]:
    return [
        pytest.param(target, path, id=f"{target}/{path.name}")
        for target in harness.TARGETS
        if (base / target).is_dir()
        for path in sorted((base / target).iterdir())
    ]


class TestReplay:
    @pytest.mark.parametrize(("target", "path"), inputs(CRASHES))
    def test_crash_input_replays_cleanly(self, target: str, path: Path) -> None:
        """A saved crash input no longer crashes."""
        harness.TARGETS[target](path.read_bytes())

    @pytest.mark.parametrize(("target", "path"), inputs(CORPUS))
    def test_seed_replays_cleanly(self, target: str, path: Path) -> None:
        """Every seed passes the harness, so a fuzzing run starts from a clean corpus."""
        harness.TARGETS[target](path.read_bytes())

    def test_seed_corpus_is_current(self) -> None:
        """The committed seeds are exactly what fuzz/make_corpus.py generates today."""
        built = make_corpus.build()
        on_disk = {t: {p.name: p.read_bytes() for p in (CORPUS / t).iterdir()} for t in harness.TARGETS}
        assert {t: sorted(f) for t, f in built.items()} == {t: sorted(f) for t, f in on_disk.items()}
        assert built == on_disk
        assert sum(len(d) for files in built.values() for d in files.values()) < 200_000


class TestHarness:
    def test_split_input_round_trips(self) -> None:
        """make_input/split_input agree on the stream and cut it where asked."""
        stream = bytes(range(50))
        got, chunks = harness.split_input(harness.make_input(stream, [10, 3, 10, 70]))
        assert got == stream
        assert b"".join(chunks) == stream
        assert [len(c) for c in chunks] == [3, 7, 9, 31]  # 70 % 51 == 19; the repeated 10 counts once
        assert harness.split_input(harness.make_input(b"abc", bytewise=True))[1] == [b"a", b"b", b"c"]
        assert harness.split_input(b"") == (b"", [])

    def test_oracle_catches_a_fail_open_session(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A session that answered failures with an action-less reply (fail open) is caught by the harness."""
        action_less = codec.http_req_call_reply_frame(HTTPReqCallReply(7))
        monkeypatch.setattr(codec, "error_frame", lambda code: action_less)
        seed = next(p for p in (CORPUS / "session").iterdir() if p.name.startswith("raise-"))
        with pytest.raises(harness.OracleViolation):
            harness.check_session(seed.read_bytes())


# --- fixed bugs, as minimal direct reproducers -------------------------------------------------------


class TestFixedBugs:
    def test_lone_surrogate_in_reject_body_is_a_policy_error(self) -> None:
        """compile_policy documents PolicyError for a bad policy; a \\udcXX escape in reject.body is one."""
        with pytest.raises(PolicyError):
            compile_policy('{"reject": {"body": "\\udcde"}}')

    def test_aliased_header_entries_do_not_amplify(self) -> None:
        """A 1.3 MB HTTPReqCall whose 65,536 header entries share one 1 MiB name must not decode into 64 GiB.

        Run in a child limited to 512 MiB of address space: before the fix the decode died with MemoryError
        (without the limit the kernel's OOM killer ended the runner). Now it is a DecodeError, or a result
        no larger than the payload, well inside the limit.
        """
        assert _child(_AMPLIFY_CODEC) == "bounded"

    def test_session_survives_aliased_headers(self) -> None:
        """Through a Session and mtls-guard the same frame gets one answer at modest memory cost: the
        ExtraInfo query of a protected request, since the guard's spelling scan finds none of its
        headers in the frame and so never decodes the aliased names."""
        assert _child(_AMPLIFY_SESSION) == "type 3 small"

    def test_spelling_scan_of_aliased_identity_headers_is_bounded(self) -> None:
        """When the aliased name is one the guard strips, the spelling scan stops at the frame's size."""
        assert _child(_AMPLIFY_SPELLINGS) == "bounded"


_ALIASED = """
import resource, struct
resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))

def aliased(n, name_len, token):
    # HTTPReqCall with only headers (slot 5) and conf_token (slot 6); the header vector holds n
    # offsets that all point to one TextEntry whose name is name_len bytes long.
    out = bytearray(struct.pack("<I", 24))
    out += struct.pack("<9H", 18, 12, 0, 0, 0, 0, 0, 4, 8) + bytes(2)
    out += struct.pack("<iIII", 20, 8, token, n)
    entry = 40 + 4 * n + 8
    out += b"".join(struct.pack("<I", entry - (40 + 4 * i)) for i in range(n))
    out += struct.pack("<3H", 6, 8, 4) + bytes(2) + struct.pack("<iII", 8, 4, name_len)
    return bytes(out + b"a" * name_len + b"\\0")

PAYLOAD = aliased(65536, 1 << 20, 1)
"""
_AMPLIFY_CODEC = (
    _ALIASED
    + """
from runner.protocol import codec
view = codec.decode_http_req_call(PAYLOAD)
assert view.conf_token == 1
try:
    headers = view.headers
except codec.DecodeError:
    print("bounded")
else:
    print("bounded" if sum(len(n) for n, _ in headers) <= len(PAYLOAD) else "amplified")
"""
)
_AMPLIFY_SESSION = (
    _ALIASED
    + """
from runner.protocol import codec
from runner.session import Session, SessionConfig
from fuzz import harness
store = harness._new_store()  # token 2: mtls-guard forwarding identity, so it reads every request header
writes = []
session = Session(SessionConfig(store=store), writes.append, lambda: writes.append(b"closed"), lambda cb: None)
session.data_received(codec.encode_frame(2, aliased(65536, 1 << 20, 2)))
frame = harness._output_frames(writes)[0]  # a protected request's (pipelined) ExtraInfo queries
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
code = codec.decode_error(frame.payload).name if frame.type == 0 else f"type {frame.type}"
print(code, "small" if peak_mib < 256 else f"{peak_mib} MiB")
"""
)


_AMPLIFY_SPELLINGS = (
    _ALIASED.replace('b"a" * name_len', 'b"x-client-fp" + b"a" * (name_len - 11)')
    + """
from runner.protocol import codec
view = codec.decode_http_req_call(PAYLOAD)
try:
    view.header_spellings(frozenset({b"x-client-fp" + b"a" * ((1 << 20) - 11)}))
except codec.DecodeError:
    print("bounded")
else:
    print("amplified")
"""
)


def _child(script: str) -> str:
    """Run ``script`` in a fresh interpreter; its last output line, or why it died."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        return f"died ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "no output"
