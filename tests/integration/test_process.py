"""`mtls-guard run` as APISIX spawns it: a subprocess with only PATH and APISIX's two variables."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from runner.protocol.messages import ErrCode
from runner.testing import ApisixOutcome, FakeApisix, conf

EXIT_STARTUP_FAILURE = 3
READY_TIMEOUT = 15.0


def _binary() -> str:
    path = Path(sys.executable).parent / "mtls-guard"
    assert path.is_file(), f"console script not installed next to {sys.executable}"
    return str(path)


def coverage_env() -> dict[str, str]:
    """What starts coverage in a subprocess when the suite runs under it (scripts/test), else nothing:
    the runner is measured too, though APISIX would pass it no such variable."""
    return {k: v for k, v in os.environ.items() if k.startswith("COVERAGE_PROCESS_")}


def apisix_env(listen: str, **extra: str) -> dict[str, str]:
    """What APISIX's privileged agent passes: PATH, APISIX_LISTEN_ADDRESS, APISIX_CONF_EXPIRE_TIME."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "APISIX_LISTEN_ADDRESS": f"unix:{listen}",
        "APISIX_CONF_EXPIRE_TIME": "3600",
        **coverage_env(),
        **extra,
    }


class Runner:
    """One runner process; output goes to files so a chatty runner can never block on a pipe."""

    def __init__(self, env: dict[str, str], args: Sequence[str], cwd: Path) -> None:
        self.stdout_path = cwd / f"stdout-{time.monotonic_ns()}"
        self.stderr_path = cwd / f"stderr-{time.monotonic_ns()}"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen([_binary(), "run", *args], env=env, cwd=cwd, stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = READY_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


Spawn = Callable[..., Runner]


@pytest.fixture
def spawn(sock_dir: Path) -> Iterator[Spawn]:
    runners: list[Runner] = []

    def start(env: dict[str, str], *args: str) -> Runner:
        runner = Runner(env, args, sock_dir)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.kill()


def socket_inode(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def wait_ready(runner: Runner, path: str, replacing: int | None = None) -> None:
    """Poll until the socket accepts connections (APISIX itself does not wait; tests must).

    ``replacing``: the inode of a socket file a SIGKILLed runner left behind. Its workers get
    SIGTERM from the kernel but may still accept on that file for a few milliseconds, so a probe
    (and a request after it) could reach them and be reset: wait for the new runner's own file."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        assert runner.proc.poll() is None, f"runner exited {runner.proc.returncode}: {runner.stdout}{runner.stderr}"
        if replacing is not None and socket_inode(path) in (replacing, None):
            time.sleep(0.02)
            continue
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
            return
        time.sleep(0.02)
    raise AssertionError(f"runner not ready after {READY_TIMEOUT}s")


async def one_request(path: str) -> tuple[ApisixOutcome, ApisixOutcome]:
    async with FakeApisix(path) as apisix:
        passed = await apisix.request(conf())
        unknown = await apisix.request(conf(("no-such-plugin", "{}")), key="route#2")
        return passed, unknown


def make_stale_socket(path: str) -> None:
    """A socket file whose process is gone, as a SIGKILLed runner leaves behind."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line, got {lines!r}"
    return lines[0]


class TestServing:
    def test_ready_mode_and_serves(self, spawn: Spawn, sock_path: str) -> None:
        """The runner listens on APISIX_LISTEN_ADDRESS with mode 0766 and answers like APISIX expects."""
        runner = spawn(apisix_env(sock_path))
        wait_ready(runner, sock_path)

        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o766
        passed, unknown = asyncio.run(one_request(sock_path))
        assert passed.kind == "pass"
        assert passed.error is None
        assert unknown.client_status == 503
        assert unknown.error == ErrCode.BAD_REQUEST

    def test_sigterm_under_load(self, spawn: Spawn, sock_path: str) -> None:
        """SIGTERM while 32 connections send requests: exit code 0 in under 1 s, socket file removed."""
        runner = spawn(apisix_env(sock_path))
        wait_ready(runner, sock_path)

        async def client(stop: asyncio.Event, done: list[int]) -> None:
            apisix = FakeApisix(sock_path, timeout=5)
            try:
                while not stop.is_set():
                    outcome = await apisix.request(conf())
                    assert outcome.kind == "pass", outcome
                    done.append(1)
            except (OSError, asyncio.IncompleteReadError):
                pass  # the runner went away mid-request: APISIX would answer 503
            finally:
                await apisix.close()

        async def main() -> tuple[int, float, int]:
            stop = asyncio.Event()
            done: list[int] = []
            clients = [asyncio.ensure_future(client(stop, done)) for _ in range(32)]
            while len(done) < 500:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            runner.proc.send_signal(signal.SIGTERM)
            while runner.proc.poll() is None and time.monotonic() - started < 5:
                await asyncio.sleep(0.005)
            elapsed = time.monotonic() - started
            stop.set()
            await asyncio.gather(*clients)
            return runner.proc.wait(5), elapsed, len(done)

        code, elapsed, served = asyncio.run(main())
        assert code == 0, runner.stdout + runner.stderr
        assert elapsed < 1.0
        assert served >= 500
        assert not os.path.exists(sock_path)
        assert "Traceback" not in runner.stdout + runner.stderr
        assert "destroyed" not in runner.stdout + runner.stderr

    def test_sigterm_right_after_bind(self, spawn: Spawn, sock_path: str) -> None:
        """Once the socket file exists, SIGTERM always ends in exit 0 and the file being removed."""
        for _ in range(3):
            runner = spawn(apisix_env(sock_path))
            deadline = time.monotonic() + READY_TIMEOUT
            while not os.path.lexists(sock_path):
                assert time.monotonic() < deadline, "socket never appeared"
                assert runner.proc.poll() is None, runner.stdout + runner.stderr
            runner.proc.send_signal(signal.SIGTERM)

            assert runner.wait(5) == 0
            assert not os.path.lexists(sock_path)

    def test_stale_socket_is_replaced(self, spawn: Spawn, sock_path: str) -> None:
        """A socket file left by a dead runner is removed and the new runner serves."""
        make_stale_socket(sock_path)
        runner = spawn(apisix_env(sock_path))
        wait_ready(runner, sock_path)

        passed, _ = asyncio.run(one_request(sock_path))
        assert passed.kind == "pass"

    def test_sigkill_then_restart(self, spawn: Spawn, sock_path: str) -> None:
        """SIGKILL leaves the socket file behind; the next start (APISIX respawns) replaces it."""
        first = spawn(apisix_env(sock_path))
        wait_ready(first, sock_path)
        first.proc.kill()
        first.wait(5)
        left_behind = os.lstat(sock_path)
        assert stat.S_ISSOCK(left_behind.st_mode)

        second = spawn(apisix_env(sock_path))
        wait_ready(second, sock_path, replacing=left_behind.st_ino)
        passed, _ = asyncio.run(one_request(sock_path))
        assert passed.kind == "pass"
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait(5) == 0
        assert not os.path.exists(sock_path)

    def test_regular_file_is_not_deleted(self, spawn: Spawn, sock_path: str) -> None:
        """A regular file at the socket path is left alone; start fails with exit code 3 and one line."""
        Path(sock_path).write_text("precious\n")
        runner = spawn(apisix_env(sock_path))

        assert runner.wait() == EXIT_STARTUP_FAILURE
        assert Path(sock_path).read_text() == "precious\n"
        line = one_line(runner.stdout + runner.stderr)
        assert "not a socket" in line
        assert sock_path in line

    def test_busy_metrics_port_leaves_no_socket(self, spawn: Spawn, sock_path: str) -> None:
        """If the opt-in metrics port is taken, start fails with exit 3 and no APISIX socket is left."""
        with socket.socket(socket.AF_INET) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            runner = spawn(apisix_env(sock_path), "--metrics-addr", f"127.0.0.1:{port}")

            assert runner.wait() == EXIT_STARTUP_FAILURE
        assert "startup_failed" in one_line(runner.stdout + runner.stderr)
        assert not os.path.lexists(sock_path)


class TestBadSettings:
    @pytest.mark.parametrize(
        ("env", "args", "fragment"),
        [
            ({"APISIX_CONF_EXPIRE_TIME": "abc"}, (), "APISIX_CONF_EXPIRE_TIME='abc'"),
            ({"APISIX_LISTEN_ADDRESS": "unix:no/such/dir/r.sock"}, (), "does not exist"),
            ({}, ("--call-timeout", "100"), "call_timeout"),
        ],
        ids=["expire-time-abc", "relative-missing-dir", "call-timeout-100"],
    )
    def test_exits_3_with_one_line_before_binding(
        self, spawn: Spawn, sock_dir: Path, sock_path: str, env: dict[str, str], args: tuple[str, ...], fragment: str
    ) -> None:
        """A bad setting stops the runner with exit 3 and one stderr line, before any socket exists."""
        runner = spawn({**apisix_env(sock_path), **env}, *args)

        assert runner.wait() == EXIT_STARTUP_FAILURE
        line = one_line(runner.stderr)
        assert line.startswith("mtls-guard: error:")
        assert fragment in line
        assert runner.stdout == ""
        assert not os.path.exists(sock_path)
        assert not (sock_dir / "no").exists()
