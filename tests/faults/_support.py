"""Shared machinery of the fault-injection tests: the enforcing policy and its probes, a healthy
APISIX connection that keeps checking answers beside a fault, raw sockets for half-finished
conversations, leak accounting (fds, tasks, connections, memory) and a runner subprocess.

Every fault test ends with the same three questions: was a protected request ever let through
without a valid certificate, did the healthy connection keep getting right answers, and did the
fault leave anything behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from plugins.mtls_guard.plugin import MtlsGuard
from runner import PluginRegistry
from runner.protocol import codec
from runner.protocol.messages import ConfEntry, ErrCode, Frame, ReqBodyQuery, Rewrite, RPCType, Stop, VarQuery
from runner.server import RunnerServer
from runner.settings import Settings
from runner.testing import ApisixOutcome, FakeApisix, conf, http_req_call_frame, prepare_conf_frame
from tests.certs import CertFactory, escaped
from tests.plugins_for_tests import make_registry

HOST = "api.example.com"
HOST_HEADER = (("host", HOST),)
POLICY = json.dumps({"exempt": [{"path": "/health"}]})
GUARD = conf(("mtls-guard", POLICY))
GUARD_KEY = "route#1#ext-plugin-pre-req#1"

_FACTORY = CertFactory()
_ROOT = _FACTORY.ca("Faults Root")
CLIENT = _FACTORY.leaf(_ROOT, cn="client")

VarTable = Mapping[str, str | None]
VALID: VarTable = {
    "ssl_client_verify": "SUCCESS",
    "ssl_client_escaped_cert": escaped(CLIENT.pem),
    "ssl_server_name": HOST,
    "host": HOST,
    "scheme": "https",
}
NO_CERT: VarTable = {"ssl_client_verify": "NONE", "ssl_server_name": HOST, "host": HOST, "scheme": "https"}
FAILED_VERIFY: VarTable = {**VALID, "ssl_client_verify": "FAILED:certificate has expired"}


@dataclass(frozen=True, slots=True)
class Probe:
    """One kind of client request against the enforcing route and what APISIX must do with it."""

    name: str
    path: str
    vars: VarTable
    allowed: bool  # True: goes upstream (pass); False: must be stopped (or fail with 503)


PROBES = (
    Probe("valid-cert", "/x", VALID, allowed=True),
    Probe("no-cert", "/x", NO_CERT, allowed=False),
    Probe("failed-verify", "/api", FAILED_VERIFY, allowed=False),
    Probe("exempt", "/health", NO_CERT, allowed=True),
)
PROTECTED = PROBES[1]


def let_through(outcome: ApisixOutcome) -> bool:
    return outcome.kind in ("pass", "rewrite")


def correct(probe: Probe, outcome: ApisixOutcome) -> bool:
    """The exact answer a healthy runner gives (no retry, no error)."""
    if outcome.tries != 1:
        return False
    if probe.allowed:
        # mtls-guard delivers the path it judged: every request it lets through is a Rewrite of it.
        return outcome.kind == "rewrite" and outcome.rewrite is not None and outcome.rewrite.path == probe.path
    return outcome.kind == "stop" and outcome.client_status == 403


class Ledger:
    """Every decision seen for a protected request (fault or not), to prove the runner failed closed."""

    def __init__(self) -> None:
        self.protected = 0
        self.breaches: list[tuple[str, ApisixOutcome]] = []

    def record(self, probe: Probe, outcome: ApisixOutcome) -> None:
        if probe.allowed:
            return
        self.protected += 1
        if let_through(outcome):
            self.breaches.append((probe.name, outcome))

    def assert_fail_closed(self, minimum: int = 1) -> None:
        assert not self.breaches, f"protected requests let through without a valid certificate: {self.breaches[:5]}"
        assert self.protected >= minimum, f"only {self.protected} protected requests were checked"


# --- outcomes of raw conversations ---------------------------------------------------------------


def outcome_of(frame: Frame) -> ApisixOutcome:
    """What APISIX does with a final HTTPReqCall answer frame (error when it is not one)."""
    if frame.type == RPCType.ERR:
        return ApisixOutcome("error", error=codec.decode_error(frame.payload))
    if frame.type != RPCType.HTTP_REQ_CALL:
        return ApisixOutcome("error", error=ErrCode.BAD_REQUEST)
    action = codec.decode_http_req_call_reply(frame.payload).action
    if isinstance(action, Stop):
        return ApisixOutcome("stop", stop=action)
    if isinstance(action, Rewrite) and not action.is_empty():
        return ApisixOutcome("rewrite", rewrite=action)
    return ApisixOutcome("pass")


LOST = ApisixOutcome("error")
"""The runner connection broke mid-exchange: APISIX answers the client 503."""


async def request(
    apisix: FakeApisix, probe: Probe, entries: tuple[ConfEntry, ...] = GUARD, key: str = GUARD_KEY
) -> ApisixOutcome:
    """FakeApisix.request, with a broken connection turned into the 503 APISIX would give."""
    try:
        return await apisix.request(entries, key=key, path=probe.path, headers=HOST_HEADER, vars=probe.vars)
    except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError):
        return LOST


class RawConn:
    """One runner connection driven frame by frame (for conversations APISIX would not finish)."""

    live: ClassVar[set[RawConn]] = set()
    """Connections not closed yet: ``serving()`` closes what a failing test left open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = codec.FrameDecoder()
        RawConn.live.add(self)

    @classmethod
    async def open(cls, path: str) -> RawConn:
        """Connect the way nginx does: EAGAIN from connect() on a Unix socket means the listen queue
        is full and is a refusal (ngx_event_connect_peer), not "in progress" as asyncio assumes."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                sock.connect(path)
            except BlockingIOError:
                raise ConnectionRefusedError(errno.EAGAIN, f"listen queue of {path} is full") from None
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame, or None at end of stream."""
        frame = self.decoder.next_frame()
        while frame is None:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            if not data:
                return None
            self.decoder.feed(data)
            frame = self.decoder.next_frame()
        return frame

    async def frames_until_eof(self, timeout: float = 2.0) -> list[Frame]:
        """Everything the runner still sends before it closes; fails if it does not close in time."""
        frames: list[Frame] = []
        async with asyncio.timeout(timeout):
            while (frame := await self.frame(timeout)) is not None:
                frames.append(frame)
        return frames

    async def prepare(self, entries: tuple[ConfEntry, ...] = GUARD, key: str = GUARD_KEY) -> int:
        await self.send(prepare_conf_frame(entries, key))
        reply = await self.frame()
        assert reply is not None
        assert reply.type == RPCType.PREPARE_CONF, reply
        return codec.decode_prepare_conf_reply(reply.payload)

    @staticmethod
    def answer(query: Frame, table: VarTable) -> bytes:
        decoded = codec.decode_extra_info_query(query.payload)
        if isinstance(decoded, VarQuery):
            value = table.get(decoded.name)
            return codec.extra_info_result_frame(None if value is None else value.encode())
        assert isinstance(decoded, ReqBodyQuery)
        return codec.extra_info_result_frame(None)

    async def call(self, frame: bytes, table: VarTable) -> Frame:
        """Send an RPC and answer ExtraInfo from ``table`` until the final reply, as APISIX does."""
        await self.send(frame)
        while True:
            reply = await self.frame()
            if reply is None:
                raise ConnectionError("runner closed the connection")
            if reply.type != RPCType.EXTRA_INFO:
                return reply
            await self.send(self.answer(reply, table))

    async def decide(self, token: int, probe: Probe, call_id: int = 1) -> ApisixOutcome:
        frame = http_req_call_frame(id=call_id, conf_token=token, path=probe.path, headers=HOST_HEADER)
        return outcome_of(await self.call(frame, probe.vars))

    def close(self) -> None:
        RawConn.live.discard(self)
        self.writer.close()


async def open_many(server: RunnerServer, count: int, batch: int = 50) -> list[RawConn]:
    """``count`` connections, opened in batches the listen queue holds, each accepted before the next batch."""
    conns: list[RawConn] = []
    try:
        while len(conns) < count:
            size = min(batch, count - len(conns))
            target = len(server.connections) + size
            conns += await asyncio.gather(*(RawConn.open(server.settings.listen) for _ in range(size)))
            await until(functools.partial(_at_least, server, target), what="accepts")
    except BaseException:
        close_all(conns)
        raise
    return conns


def _at_least(server: RunnerServer, target: int) -> bool:
    return len(server.connections) >= target


def close_all(conns: list[RawConn]) -> None:
    for conn in conns:
        conn.close()


async def prepared(server: RunnerServer, entries: tuple[ConfEntry, ...] = GUARD, key: str = GUARD_KEY) -> int:
    """A conf token prepared on a connection of its own, closed (and noticed by the server) afterwards."""
    count = len(server.connections)
    conn = await RawConn.open(server.settings.listen)
    try:
        return await conn.prepare(entries, key)
    finally:
        conn.close()
        await conn.writer.wait_closed()
        await until(lambda: len(server.connections) <= count, what="the set-up connection to close")


def guarded_call(token: int, probe: Probe = PROTECTED, call_id: int = 1) -> bytes:
    return http_req_call_frame(id=call_id, conf_token=token, path=probe.path, headers=HOST_HEADER)


# --- the healthy connection ------------------------------------------------------------------------


@dataclass
class Healthy:
    """A pooled FakeApisix (one connection) cycling through the probes beside a fault; every answer
    must be exactly right and is timed. ``async with`` connects it, starts the background requests
    (unless ``background`` is false) and always closes it, whatever happens in the block."""

    path: str
    ledger: Ledger
    interval: float = 0.002
    background: bool = True
    apisix: FakeApisix = field(init=False)
    latencies: list[float] = field(default_factory=list)
    wrong: list[tuple[str, ApisixOutcome]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.apisix = FakeApisix(self.path, pool_size=1, timeout=5)

    async def __aenter__(self) -> Healthy:
        try:
            await self.one(PROBES[0])  # connect and prepare: the connection then stays open
        except BaseException:
            await self.apisix.close()
            raise
        self.latencies.clear()
        if self.background:
            self._task = asyncio.ensure_future(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def one(self, probe: Probe) -> None:
        started = time.perf_counter()
        outcome = await request(self.apisix, probe)
        self.latencies.append(time.perf_counter() - started)
        self.ledger.record(probe, outcome)
        if not correct(probe, outcome):
            self.wrong.append((probe.name, outcome))

    async def _loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            await self.one(PROBES[i % len(PROBES)])
            i += 1
            await asyncio.sleep(self.interval)

    async def stop(self, at_least: int = 0) -> None:
        """Stop once ``at_least`` requests were made in all (a loaded machine may need a moment)."""
        deadline = time.monotonic() + 10
        while self._task is not None and len(self.latencies) < at_least and time.monotonic() < deadline:
            if self.wrong:
                break
            await asyncio.sleep(0.01)
        self._stop.set()
        try:
            if self._task is not None:
                await self._task
        finally:
            await self.apisix.close()

    def assert_served(self, minimum: int = 20, max_latency: float | None = None) -> None:
        assert not self.wrong, f"healthy connection got wrong answers: {self.wrong[:5]}"
        assert len(self.latencies) >= minimum, f"healthy connection made only {len(self.latencies)} requests"
        if max_latency is not None:
            assert max(self.latencies) < max_latency, f"healthy request took {max(self.latencies) * 1000:.1f} ms"


# --- leak accounting -------------------------------------------------------------------------------


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass(frozen=True)
class Usage:
    fds: int
    tasks: int
    connections: int


def usage(server: RunnerServer) -> Usage:
    return Usage(open_fds(), len(asyncio.all_tasks()), len(server.connections))


async def assert_released(server: RunnerServer, before: Usage, *, fd_slack: int = 2, timeout: float = 3.0) -> None:
    """Wait (briefly) for closes to land, then require fds/tasks/connections back at ``before``."""
    deadline = time.monotonic() + timeout
    while True:
        now = usage(server)
        done = now.fds <= before.fds + fd_slack and now.tasks <= before.tasks and now.connections <= before.connections
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert now.connections <= before.connections, f"connections leaked: {before} -> {now}"
    assert now.tasks <= before.tasks, f"tasks leaked: {before} -> {now}: {asyncio.all_tasks()}"
    assert now.fds <= before.fds + fd_slack, f"file descriptors leaked: {before} -> {now}"


async def until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The runner logs one line per fault; pytest keeps captured lines in memory, which is not ours."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


MEMORY_BOUND = 2 * 1024 * 1024
"""Allowed traced-memory growth over a 1 000-iteration fault loop (a leak of > 2 KB per fault trips it)."""


async def memory_growth(fault: Callable[[int], Awaitable[None]], iterations: int = 1000, warmup: int = 100) -> int:
    """Bytes of Python memory still allocated after ``iterations`` more faults than a warm-up run."""
    with quiet_logs():
        for i in range(warmup):
            await fault(i)
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(iterations):
                await fault(warmup + i)
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()


def raise_fd_limit(needed: int) -> None:
    """Lift the soft RLIMIT_NOFILE up to ``needed`` (never above the hard limit); skip if impossible."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# --- an in-process runner --------------------------------------------------------------------------


def fault_registry() -> PluginRegistry:
    """The test plugins (hang, raise, ...) plus the real mtls-guard."""
    registry = make_registry()
    guard = MtlsGuard()
    guard.setup({})
    registry.register(guard)
    return registry


@contextlib.asynccontextmanager
async def serving(path: str, registry: PluginRegistry | None = None, **settings: object) -> AsyncIterator[RunnerServer]:
    """A RunnerServer on ``path`` in the running loop, stopped and awaited at the end of the block."""
    server = RunnerServer(Settings(listen=path, **settings), registry or fault_registry())  # type: ignore[arg-type]
    await server.start()
    task = asyncio.ensure_future(server.serve())
    try:
        yield server
    finally:
        close_all(list(RawConn.live))
        server.stop()
        await task


# --- a runner process, as APISIX spawns it ---------------------------------------------------------


def binary() -> str:
    path = Path(sys.executable).parent / "mtls-guard"
    assert path.is_file(), f"console script not installed next to {sys.executable}"
    return str(path.absolute())


def apisix_env(listen: str) -> dict[str, str]:
    """Only what APISIX's privileged agent passes: PATH and its two variables."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "APISIX_LISTEN_ADDRESS": f"unix:{listen}",
        "APISIX_CONF_EXPIRE_TIME": "3600",
        # Under coverage (scripts/test) the runner is measured too; APISIX never passes these.
        **{k: v for k, v in os.environ.items() if k.startswith("COVERAGE_PROCESS_")},
    }


def children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (the supervisor's workers)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def socket_inodes(pid: int) -> set[str]:
    """The sockets a process holds (``socket:[inode]``), to tell which worker accepted a connection."""
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:"):
                links.add(link)
    return links


class RunnerProcess:
    """``mtls-guard run`` as a subprocess (output to files: a chatty runner never blocks on a pipe)."""

    def __init__(self, path: str, directory: Path, *args: str) -> None:
        self.path = path
        self.log = directory / f"runner-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [binary(), "run", *args], env=apisix_env(path), cwd=directory, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> set[int]:
        return children(self.pid)

    def rundir(self) -> Path:
        """The supervisor's private run directory (``python -m runner.process.worker RUNDIR ...``)."""
        for worker in self.workers():
            with contextlib.suppress(OSError, ValueError, IndexError):
                argv = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
                return Path(os.fsdecode(argv[argv.index(b"runner.process.worker") + 1]))
        raise AssertionError("no worker is running")

    def wait_ready(self, workers: int, timeout: float = 15.0) -> set[int]:
        """Until the socket is published and ``workers`` workers accept (0: a single-process runner
        accepts); returns the worker pids."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"runner exited {self.proc.returncode}: {self.output}"
            with contextlib.suppress(AssertionError, OSError):
                pids = self.workers()
                if workers == 0:
                    with socket.socket(socket.AF_UNIX) as probe:
                        probe.connect(self.path)
                        return pids
                # each worker touches its ready file once its server accepts
                if os.path.exists(self.path) and len(pids) == workers == len(list(self.rundir().glob("ready-*"))):
                    return pids
            assert time.monotonic() < deadline, f"runner not ready after {timeout}s: {self.output}"
            time.sleep(0.02)

    def terminate(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def settled_fds(pid: int, samples: int = 3) -> int:
    """A process's fd count, ignoring a file it opens for a moment (workers write metrics every second)."""
    counts = []
    for _ in range(samples):
        counts.append(open_fds(pid))
        time.sleep(0.01)
    return min(counts)


async def wait_fds(pid: int, limit: int, timeout: float = 3.0) -> int:
    """Wait until ``pid`` holds at most ``limit`` fds; returns the last count."""
    deadline = time.monotonic() + timeout
    while (count := open_fds(pid)) > limit and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return count


async def pin(path: str, by_worker: Callable[[], Mapping[int, set[str]]]) -> tuple[FakeApisix, int]:
    """A one-connection FakeApisix that has prepared and made one request, and the worker that took it."""
    before = by_worker()
    apisix = FakeApisix(path, pool_size=1, timeout=5)
    try:
        outcome = await request(apisix, PROTECTED)
        assert correct(PROTECTED, outcome), outcome
        after = by_worker()
        owners = [pid for pid in after if after[pid] - before.get(pid, set())]
        assert len(owners) == 1, f"cannot tell which worker took the connection: {owners}"
    except BaseException:
        await apisix.close()
        raise
    return apisix, owners[0]


async def warm_up(proc: RunnerProcess, workers: set[int]) -> None:
    """Serve one connection on every worker, then close them all: a worker's event loop keeps a spare
    descriptor from its first accept on (libuv's EMFILE reserve, /dev/null), which is no leak."""
    sockets = worker_sockets(proc)
    clients: list[FakeApisix] = []
    try:
        seen: set[int] = set()
        for _ in range(40):
            client, owner = await pin(proc.path, sockets)
            clients.append(client)
            seen.add(owner)
            if seen >= workers:
                return
        raise AssertionError(f"connections never reached every worker: {seen} of {workers}")
    finally:
        for client in clients:
            await client.close()


def worker_sockets(proc: RunnerProcess) -> Callable[[], dict[int, set[str]]]:
    def snapshot() -> dict[int, set[str]]:
        out = {}
        for pid in proc.workers():
            with contextlib.suppress(OSError):
                out[pid] = socket_inodes(pid)
        return out

    return snapshot


async def http_get(port: int, target: str) -> int:
    """Status of a one-shot HTTP GET on 127.0.0.1 (the runner's /readyz)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 5)
        return int(line.split()[1])
    finally:
        writer.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
