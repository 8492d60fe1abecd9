"""The real runner as APISIX spawns it: ``mtls-guard run`` with only PATH and the two APISIX variables."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["RunnerProcess", "runner_executable"]


def runner_executable() -> str:
    """Absolute path of the venv's ``mtls-guard`` console script (the one ext-plugin.cmd would name)."""
    found = shutil.which("mtls-guard", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError(f"mtls-guard is not installed next to {sys.executable}")
    return os.path.abspath(found)


class RunnerProcess:
    """Start, kill, terminate and restart one runner; its stdout+stderr go to ``log_path``.

    The socket lives in a short directory (AF_UNIX paths are limited to 108 bytes); the log in the
    test's own temporary directory. ``extra_args`` are passed after ``run`` (e.g. ``--config``).
    """

    def __init__(self, socket_path: str, log_path: Path, *extra_args: str, log_level: str = "info") -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.argv = [runner_executable(), "run", "--log-level", log_level, *extra_args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._groups: list[int] = []  # process groups of every start (a runner may have worker children)

    @property
    def environment(self) -> dict[str, str]:
        # apisix/plugins/ext-plugin/helper.lua + ngx_tpl.lua "env PATH": nothing else reaches the runner.
        return {
            "PATH": os.environ.get("PATH", os.defpath),
            "APISIX_LISTEN_ADDRESS": f"unix:{self.socket_path}",
            "APISIX_CONF_EXPIRE_TIME": "3600",
            # Under coverage (scripts/test) the runner is measured too; APISIX never passes these.
            **{k: v for k, v in os.environ.items() if k.startswith("COVERAGE_PROCESS_")},
        }

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> RunnerProcess:
        assert self.proc is None or self.proc.poll() is not None, "runner already running"
        # A SIGKILLed runner leaves its socket file behind, and its workers may accept on it for a few
        # more milliseconds while they exit: wait for the new process's own socket, not that one.
        try:
            stale_inode: int | None = os.lstat(self.socket_path).st_ino
        except FileNotFoundError:
            stale_inode = None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )
        self.starts += 1
        self._groups.append(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"runner exited with {self.proc.returncode} at start-up:\n{self.log()}")
            if self._inode() != stale_inode and self._accepts():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"runner did not listen on {self.socket_path} within {timeout}s:\n{self.log()}")

    def _inode(self) -> int | None:
        try:
            return os.lstat(self.socket_path).st_ino
        except FileNotFoundError:
            return None

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(self.socket_path)
            except OSError:
                return False
        return True

    def kill(self) -> None:
        """SIGKILL: the runner gets no chance to close anything; its socket file stays behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def terminate(self, timeout: float = 5.0) -> tuple[int | None, float]:
        """SIGTERM as APISIX's exit_worker sends it; returns (exit code or None if still alive, seconds)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def stop(self) -> None:
        """Terminate the runner, then SIGKILL whatever is left in the process groups this object started."""
        if self.proc is not None and self.proc.poll() is None:
            code, _ = self.terminate(5.0)
            if code is None:
                self.kill()
        for group in self._groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        self._groups.clear()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RunnerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
