"""Two runners, one socket path: refused unless --replace (or APISIX spawned it), never taken back."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time

from runner.testing import FakeApisix, conf
from tests.integration.test_process import (
    EXIT_STARTUP_FAILURE,
    Runner,
    Spawn,
    apisix_env,
    make_stale_socket,
    one_line,
    wait_ready,
)
from tests.integration.test_process import spawn as spawn  # noqa: PLC0414 - the fixture, shared

# Longer than the runner's checks of its socket path (0.25 s single process, 0.1 s supervisor).
SEVERAL_CHECKS = 0.8


def by_hand() -> dict[str, str]:
    """An operator's shell: no APISIX_LISTEN_ADDRESS, the socket comes from --listen."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def wait_output(runner: Runner, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in runner.stdout + runner.stderr:
        assert time.monotonic() < deadline, f"{text!r} never logged: {runner.stdout}{runner.stderr}"
        time.sleep(0.02)


def serves(path: str) -> bool:
    async def main() -> bool:
        async with FakeApisix(path) as apisix:
            return (await apisix.request(conf())).kind == "pass"

    return asyncio.run(main())


def stop(runner: Runner) -> int:
    runner.proc.send_signal(signal.SIGTERM)
    return runner.wait(5)


class TestRefusal:
    def test_live_socket_is_refused_without_replace(self, spawn: Spawn, sock_path: str) -> None:
        """A second runner on a served path exits 3 with one stderr line naming the path and --replace."""
        first = spawn(by_hand(), "--listen", sock_path)
        wait_ready(first, sock_path)
        inode = os.stat(sock_path).st_ino

        second = spawn(by_hand(), "--listen", sock_path, "--workers", "2")

        assert second.wait() == EXIT_STARTUP_FAILURE
        line = one_line(second.stderr)
        assert line.startswith("mtls-guard: error:")
        assert sock_path in line
        assert "--replace" in line
        assert "stop" in line
        assert os.stat(sock_path).st_ino == inode
        assert serves(sock_path)
        assert stop(first) == 0

    def test_stale_socket_is_replaced_without_replace(self, spawn: Spawn, sock_path: str) -> None:
        """A socket file nobody listens on is replaced silently even when started by hand."""
        make_stale_socket(sock_path)
        runner = spawn(by_hand(), "--listen", sock_path)
        wait_ready(runner, sock_path)

        assert serves(sock_path)
        assert "socket_taken_over" not in runner.stdout
        assert stop(runner) == 0


class TestReplace:
    def test_replace_takes_over_and_the_old_runner_never_takes_it_back(self, spawn: Spawn, sock_path: str) -> None:
        """With --replace the new runner serves; once it exits the old one neither re-binds nor removes anything."""
        first = spawn(by_hand(), "--listen", sock_path, "--workers", "1")
        wait_ready(first, sock_path)
        old_inode = os.stat(sock_path).st_ino

        second = spawn(by_hand(), "--listen", sock_path, "--replace", "--workers", "1")
        wait_output(second, "event=serving")
        assert os.stat(sock_path).st_ino != old_inode
        assert serves(sock_path)
        wait_output(first, f"event=socket_replaced path={sock_path}")
        assert "event=socket_taken_over" in second.stdout

        assert stop(second) == 0
        assert not os.path.lexists(sock_path)
        time.sleep(SEVERAL_CHECKS)
        assert not os.path.lexists(sock_path), "the replaced runner took the socket back"
        assert first.proc.poll() is None  # it only exits when told to (APISIX would respawn it otherwise)
        assert stop(first) == 0
        assert not os.path.lexists(sock_path)

    def test_replaced_supervisor_never_takes_it_back(self, spawn: Spawn, sock_path: str) -> None:
        """A replaced --workers 2 supervisor neither re-binds the path nor removes its successor's socket."""
        first = spawn(by_hand(), "--listen", sock_path, "--workers", "2")
        wait_output(first, "event=serving")
        second = spawn(by_hand(), "--listen", sock_path, "--replace", "--workers", "1")
        wait_output(second, "event=serving")
        wait_output(first, f"event=socket_replaced path={sock_path}")
        inode = os.stat(sock_path).st_ino

        assert stop(first) == 0
        assert os.stat(sock_path).st_ino == inode  # the successor's socket is not the old runner's to remove
        assert serves(sock_path)
        assert stop(second) == 0
        time.sleep(SEVERAL_CHECKS)
        assert not os.path.lexists(sock_path)


class TestSpawnedByApisix:
    def test_apisix_reload_overlap_needs_no_flag(self, spawn: Spawn, sock_path: str) -> None:
        """With APISIX_LISTEN_ADDRESS a new runner takes over a live socket (reload: the old one still runs)."""
        old = spawn(apisix_env(sock_path))
        wait_ready(old, sock_path)
        old_inode = os.stat(sock_path).st_ino

        new = spawn(apisix_env(sock_path))
        wait_output(new, "event=serving")

        assert os.stat(sock_path).st_ino != old_inode
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        wait_output(old, "event=socket_replaced")
        assert stop(old) == 0  # what the old privileged agent's exit_worker does
        assert serves(sock_path)
        assert stop(new) == 0
        assert not os.path.lexists(sock_path)

    def test_listen_option_is_not_spawned_by_apisix(self, spawn: Spawn, sock_path: str) -> None:
        """--listen overrides APISIX_LISTEN_ADDRESS and with it the implied takeover."""
        first = spawn(by_hand(), "--listen", sock_path)
        wait_ready(first, sock_path)

        second = spawn(apisix_env(sock_path), "--listen", sock_path)

        assert second.wait() == EXIT_STARTUP_FAILURE
        assert "--replace" in one_line(second.stderr)
        assert stop(first) == 0
