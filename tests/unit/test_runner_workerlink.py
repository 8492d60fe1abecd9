"""runner.process.workerlink: the supervisor asks each worker for its counters at scrape time."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

from runner.process.workerlink import WorkerLink, answer_scrapes, gather_views


class TestLink:
    def test_each_fetch_sees_the_current_counters(self) -> None:
        """A fetch returns the worker's snapshot as of that moment, not as of some earlier write."""

        async def main() -> list[dict[str, Any] | None]:
            ours, theirs = socket.socketpair()
            counter = {"n": 0}
            worker = asyncio.ensure_future(answer_scrapes(theirs, lambda: dict(counter)))
            link = WorkerLink(ours)
            try:
                first = await link.fetch(1.0)
                counter["n"] = 41
                second = await link.fetch(1.0)
                counter["n"] = 42
                together = await asyncio.gather(link.fetch(1.0), link.fetch(1.0))
                return [first, second, *together]
            finally:
                link.close()
                await asyncio.wait_for(worker, 1.0)

        assert asyncio.run(main()) == [{"n": 0}, {"n": 41}, {"n": 42}, {"n": 42}]

    def test_a_late_answer_is_not_taken_for_the_next_one(self) -> None:
        """After a timeout the stale answer is dropped by its sequence number; the next fetch gets its own."""

        async def main() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            ours, theirs = socket.socketpair()
            theirs.setblocking(False)
            loop = asyncio.get_running_loop()
            link = WorkerLink(ours)
            try:
                late = await link.fetch(0.05)  # nobody answers in time
                requests = await loop.sock_recv(theirs, 4)
                seq = struct.unpack(">I", requests[:4])[0]
                fetch = asyncio.ensure_future(link.fetch(1.0))
                await asyncio.sleep(0.01)
                request = await loop.sock_recv(theirs, 4)
                for number, body in ((seq, b'{"stale": 1}'), (struct.unpack(">I", request)[0], b'{"fresh": 1}')):
                    await loop.sock_sendall(theirs, struct.pack(">II", number, len(body)) + body)
                return late, await fetch
            finally:
                link.close()
                theirs.close()

        assert asyncio.run(main()) == (None, {"fresh": 1})

    def test_gone_worker_answers_none_at_once(self) -> None:
        """A worker that exited (its end closed) makes fetch return None without waiting for the timeout."""

        async def main() -> tuple[dict[str, Any] | None, float]:
            ours, theirs = socket.socketpair()
            theirs.close()
            link = WorkerLink(ours)
            started = time.monotonic()
            try:
                return await link.fetch(5.0), time.monotonic() - started
            finally:
                link.close()

        answer, elapsed = asyncio.run(main())
        assert answer is None
        assert elapsed < 1.0


class TestGather:
    def test_silent_workers_are_counted_from_their_file(self, tmp_path: Path) -> None:
        """Live answers win; a silent or missing link falls back to its file; no answer and no file means left out."""
        fallback = tmp_path / "metrics-1.json"
        fallback.write_text(json.dumps({"from": "file"}))

        async def main() -> list[dict[str, Any]]:
            live_ours, live_theirs = socket.socketpair()
            silent_ours, silent_theirs = socket.socketpair()
            worker = asyncio.ensure_future(answer_scrapes(live_theirs, lambda: {"from": "live"}))
            live, silent = WorkerLink(live_ours), WorkerLink(silent_ours)
            try:
                return await gather_views(
                    [live, silent, None, None],
                    [str(tmp_path / "metrics-0.json"), str(fallback), str(fallback), str(tmp_path / "missing")],
                    timeout=0.1,
                )
            finally:
                live.close()
                silent.close()
                silent_theirs.close()
                await asyncio.wait_for(worker, 1.0)

        assert asyncio.run(main()) == [{"from": "live"}, {"from": "file"}, {"from": "file"}]
