"""An APISIX-like load generator for the ext-plugin socket (run in its own process, on its own core).

Like an APISIX worker: PrepareConf once, then N pooled connections, each carrying one exchange at
a time: HTTPReqCall, answer every ExtraInfo query, read the final reply, send the next request.

It must cost less per request than any server it measures, so the hot path does almost nothing:
the request frame is built once (a ~1.6 KB, 20-header request), ExtraInfo answers are pre-built
frames looked up by the exact query bytes, and replies are checked by their header and compared
byte for byte with the reply of a fully decoded pre-flight exchange. Those checks are cheap but
enough that a broken server cannot look fast: an Err reply, a wrong type, a different reply, or a
missing/extra ExtraInfo query ends the run as failed.

Timing: perf_counter_ns from writing the HTTPReqCall to reading its reply. Requests completed in
the warm-up are not counted. CPU time of both processes and of the two cores as a whole is read at
the start and end of the measured window, so a saturated client or a noisy machine is visible in
the results (see bench/run.py).

Output: one JSON object on stdout (``python -m bench.loadgen --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from runner.protocol import codec
from runner.protocol.messages import ConfEntry, Frame, RPCType, Stop, VarQuery

from .floor import REQUEST_ID
from .scenarios import SRC_IP, Scenario

__all__ = ["LoadError", "Preflight", "cores_busy", "main", "preflight", "run_load"]

_HEAD = struct.Struct(">I").unpack_from
_now = time.perf_counter_ns
_TYPE_REQ_CALL, _TYPE_EXTRA_INFO = 2, 3
_DRAIN_TIMEOUT = 5.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_APISIX_KEY = "route#1#ext-plugin-pre-req#1"


class LoadError(RuntimeError):
    """The server under test answered something APISIX would not accept, or stopped answering."""


# --- pre-flight: one fully decoded exchange ----------------------------------------------------------


@dataclass
class Preflight:
    token: int
    request: bytes
    reply: bytes
    answers: dict[bytes, bytes]
    """ExtraInfo query payload -> pre-built answer frame."""
    trips: list[list[str]]


def _answer(scenario: Scenario, payload: bytes) -> tuple[str, bytes]:
    query = codec.decode_extra_info_query(payload)
    if not isinstance(query, VarQuery):
        raise LoadError(f"server asked for {type(query).__name__}; bench scenarios answer Var queries only")
    value = scenario.vars.get(query.name)
    return query.name, codec.extra_info_result_frame(None if value is None else value.encode())


def _frames(decoder: codec.FrameDecoder) -> list[Frame]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


async def preflight(scenario: Scenario, path: str) -> Preflight:
    """PrepareConf, then one HTTPReqCall decoded and checked in full; the hot loop compares against it."""
    reader, writer = await asyncio.open_unix_connection(path)
    decoder = codec.FrameDecoder()

    async def read_frames() -> list[Frame]:
        while True:
            data = await asyncio.wait_for(reader.read(1 << 16), 10.0)
            if not data:
                raise LoadError("server closed the connection during the pre-flight")
            decoder.feed(data)
            frames = _frames(decoder)
            if frames:
                return frames

    try:
        entries = tuple(ConfEntry(n, v) for n, v in scenario.conf)
        writer.write(codec.prepare_conf_request_frame(entries, _APISIX_KEY))
        (frame,) = await read_frames()
        if frame.type != RPCType.PREPARE_CONF:
            raise LoadError(f"PrepareConf answered with type {frame.type}{_err_detail(frame)}")
        token = codec.decode_prepare_conf_reply(frame.payload)
        if token == 0:
            raise LoadError("PrepareConf returned token 0")

        request = codec.http_req_call_frame(
            id=REQUEST_ID,
            conf_token=token,
            method=scenario.method,
            path=scenario.path,
            src_ip=bytes(int(x) for x in SRC_IP.split(".")),
            headers=scenario.headers,
            args=scenario.args,
        )
        writer.write(request)
        answers: dict[bytes, bytes] = {}
        trips: list[list[str]] = []
        while True:
            frames = await read_frames()
            queries = [f for f in frames if f.type == RPCType.EXTRA_INFO]
            if not queries:
                break
            if len(queries) != len(frames):
                raise LoadError("server mixed ExtraInfo queries with its final reply")
            trip = []
            for q in queries:
                name, answer = _answer(scenario, q.payload)
                answers[q.payload] = answer
                trip.append(name)
                writer.write(answer)
            trips.append(trip)
        if len(frames) != 1:
            raise LoadError(f"expected one final reply, got {len(frames)} frames")
        final = frames[0]
        if final.type != RPCType.HTTP_REQ_CALL:
            raise LoadError(f"HTTPReqCall answered with type {final.type}{_err_detail(final)}")
        reply = codec.decode_http_req_call_reply(final.payload)
        if reply.id != REQUEST_ID:
            raise LoadError(f"reply id {reply.id} != request id {REQUEST_ID}")
        action = "none" if reply.action is None else "stop" if isinstance(reply.action, Stop) else "rewrite"
        if action != scenario.expect_action:
            raise LoadError(f"expected action {scenario.expect_action}, got {action}: {reply.action!r}")
        expected = [list(t) for t in scenario.ei_trips]
        if trips != expected:
            raise LoadError(f"ExtraInfo round trips {trips} differ from the scenario's declared {expected}")
        return Preflight(token, request, _encode_frame(final), answers, trips)
    finally:
        writer.close()


def _encode_frame(frame: Frame) -> bytes:
    return codec.encode_frame(frame.type, frame.payload)


def _err_detail(frame: Frame) -> str:
    if frame.type != RPCType.ERR:
        return ""
    try:
        return f" (Err {codec.decode_error(frame.payload).name})"
    except codec.DecodeError:
        return " (malformed Err)"


# --- CPU accounting ----------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process ((0, 0) if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def cores_busy() -> dict[str, float]:
    """Busy seconds per CPU since boot (everything but idle and iowait)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                v = [int(x) for x in values[:8]]
                out[name] = (sum(v) - v[3] - v[4]) / _CLK_TCK
    return out


@dataclass
class _Snapshot:
    wall_ns: int
    client_cpu: tuple[float, float]
    server_cpu: dict[int, tuple[float, float]]
    """(user, system) CPU seconds per server process (a supervisor and its workers: several)."""
    cores: dict[str, float]

    @classmethod
    def take(cls, server_pids: list[int]) -> _Snapshot:
        t = os.times()
        return cls(_now(), (t.user, t.system), {pid: _proc_cpu(pid) for pid in server_pids}, cores_busy())


# --- the hot loop ------------------------------------------------------------------------------------


class _Run:
    """State shared by all connections of one run."""

    def __init__(self, scenario: Scenario, pre: Preflight, limit: int | None) -> None:
        self.scenario = scenario
        self.request = pre.request
        self.reply = pre.reply
        self.answers = pre.answers
        self.queries = scenario.queries_per_request
        self.exact = scenario.exact_reply
        self.limit = limit or 0
        self.latencies: list[int] = []
        self.recording = False
        self.running = True
        self.busy = 0
        self.error: str | None = None
        self.learned = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_limit: Callable[[], None] = lambda: None
        self.connections: list[_LoadConnection] = []

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        self.running = self.recording = False
        for conn in self.connections:
            conn.close()
        if not self.done.done():
            self.done.set_result(None)

    def idle(self) -> None:
        self.busy -= 1
        if not self.busy and not self.running and not self.done.done():
            self.done.set_result(None)


class _LoadConnection(asyncio.Protocol):
    __slots__ = ("_buf", "_queries", "_run", "_sent", "_transport", "_write")

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._buf = b""
        self._queries = 0
        self._sent = 0
        self._transport: asyncio.Transport | None = None
        self._write: Callable[[bytes], object] = lambda _data: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast("asyncio.Transport", transport)
        self._write = self._transport.write

    def connection_lost(self, exc: Exception | None) -> None:
        run = self._run
        if run.running and run.error is None:
            run.fail(f"server closed a connection ({exc or 'EOF'})")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def send(self) -> None:
        self._run.busy += 1
        self._sent = _now()
        self._write(self._run.request)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        run = self._run
        pos, n = 0, len(data)
        out: bytes | None = None
        while n - pos >= 4:
            head = _HEAD(data, pos)[0]
            end = pos + 4 + (head & 0xFFFFFF)
            if end > n:
                break
            kind = head >> 24
            if kind == _TYPE_EXTRA_INFO:
                payload = data[pos + 4 : end]
                answer = run.answers.get(payload)
                if answer is None:
                    answer = self._learn(payload)
                    if answer is None:
                        return
                self._queries += 1
                out = answer if out is None else out + answer
            elif kind == _TYPE_REQ_CALL:
                now = _now()
                if run.exact and (data if pos == 0 and end == n else data[pos:end]) != run.reply:
                    run.fail(f"reply differs from the pre-flight reply: {data[pos:end].hex()}")
                    return
                if self._queries != run.queries:
                    run.fail(f"{self._queries} ExtraInfo queries before the reply, expected {run.queries}")
                    return
                self._queries = 0
                if run.recording:
                    latencies = run.latencies
                    latencies.append(now - self._sent)
                    if len(latencies) == run.limit:
                        run.on_limit()
                if run.running:
                    self._sent = _now()
                    self._write(run.request)
                else:
                    run.idle()
            else:
                detail = _err_detail(Frame(kind, data[pos + 4 : end]))
                run.fail(f"got frame type {kind}{detail} during a call")
                return
            pos = end
        if out is not None:
            self._write(out)
        if pos < n:
            self._buf = data[pos:]

    def _learn(self, payload: bytes) -> bytes | None:
        """A query the pre-flight did not see: decode it once and remember the answer."""
        run = self._run
        try:
            _, answer = _answer(run.scenario, payload)
        except (codec.DecodeError, LoadError) as exc:
            run.fail(f"bad ExtraInfo query: {exc}")
            return None
        run.answers[payload] = answer
        run.learned += 1
        return answer


async def run_load(
    scenario: Scenario,
    path: str,
    *,
    connections: int,
    duration: float,
    warmup: float,
    requests: int | None = None,
    server_pids: list[int] | None = None,
) -> dict[str, Any]:
    """Drive ``connections`` connections for ``warmup + duration`` seconds; returns the measurements."""
    pre = await preflight(scenario, path)
    loop = asyncio.get_running_loop()
    run = _Run(scenario, pre, requests)
    results: dict[str, Any] = {"connections": connections, "preflight_trips": pre.trips}
    try:
        for _ in range(connections):
            _, proto = await loop.create_unix_connection(lambda: _LoadConnection(run), path)
            run.connections.append(proto)
        marks: dict[str, _Snapshot] = {}

        def start_window() -> None:
            marks["start"] = _Snapshot.take(server_pids or [])
            run.recording = True

        def end_window() -> None:
            if "end" in marks or "start" not in marks:
                return
            run.recording = False
            marks["end"] = _Snapshot.take(server_pids or [])
            run.running = False
            if not run.busy and not run.done.done():
                run.done.set_result(None)

        run.on_limit = end_window
        loop.call_later(warmup, start_window)
        loop.call_later(warmup + duration, end_window)
        for conn in run.connections:
            conn.send()
        try:
            await asyncio.wait_for(asyncio.shield(run.done), warmup + duration + _DRAIN_TIMEOUT)
        except TimeoutError:
            run.fail(f"the run did not end {_DRAIN_TIMEOUT:g}s after its planned end (server stuck?)")
        if run.error is None and run.busy:
            try:
                await asyncio.wait_for(asyncio.shield(run.done), _DRAIN_TIMEOUT)
            except TimeoutError:
                run.error = f"{run.busy} calls still unanswered {_DRAIN_TIMEOUT:g}s after the end"
    finally:
        run.running = False
        for conn in run.connections:
            conn.close()
    if run.error is not None:
        results.update(ok=False, error=run.error)
        return results
    start, end = marks["start"], marks["end"]
    seconds = (end.wall_ns - start.wall_ns) / 1e9
    lat = sorted(run.latencies)
    count = len(lat)
    if not count:
        results.update(ok=False, error="no request completed in the measured window")
        return results

    def pct(p: float) -> float:
        return lat[min(count - 1, int(p * count))] / 1000

    busy = {cpu: end.cores[cpu] - start.cores.get(cpu, 0.0) for cpu in end.cores}
    results.update(
        ok=True,
        error=None,
        requests=count,
        seconds=seconds,
        rps=count / seconds,
        mean_us=sum(lat) / count / 1000,
        p50_us=pct(0.50),
        p90_us=pct(0.90),
        p99_us=pct(0.99),
        p999_us=pct(0.999),
        max_us=lat[-1] / 1000,
        client_cpu_s=sum(end.client_cpu) - sum(start.client_cpu),
        client_sys_s=end.client_cpu[1] - start.client_cpu[1],
        server_cpu_s=sum(sum(end.server_cpu[p]) - sum(start.server_cpu[p]) for p in start.server_cpu),
        server_sys_s=sum(end.server_cpu[p][1] - start.server_cpu[p][1] for p in start.server_cpu),
        server_cpu_by_pid={str(p): sum(end.server_cpu[p]) - sum(start.server_cpu[p]) for p in start.server_cpu},
        cores_busy_s=busy,
        learned_queries=run.learned,
    )
    return results


def _new_loop(kind: str) -> tuple[asyncio.AbstractEventLoop, str]:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise SystemExit("uvloop requested but not installed") from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop, "uvloop"
    return asyncio.new_event_loop(), "asyncio"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--scenario", required=True, help="Scenario as JSON (bench.scenarios)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default 1)")
    parser.add_argument("--requests", type=int, help="stop the window after this many requests")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    parser.add_argument(
        "--server-pid", type=int, action="append", help="server process, for its CPU time (repeat for a process tree)"
    )
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    scenario = Scenario.from_json(args.scenario)
    loop, loop_name = _new_loop(args.loop)
    try:
        result = loop.run_until_complete(
            run_load(
                scenario,
                args.socket,
                connections=args.connections,
                duration=args.duration,
                warmup=args.warmup,
                requests=args.requests,
                server_pids=args.server_pid,
            )
        )
    except (LoadError, codec.DecodeError, OSError, TimeoutError) as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "connections": args.connections}
    finally:
        loop.close()
    result["client_loop"] = loop_name
    result["client_affinity"] = sorted(os.sched_getaffinity(0))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
