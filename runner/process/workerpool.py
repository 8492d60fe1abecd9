"""The supervisor's worker processes (``--workers N``): start each one on the listening socket,
replace one that dies (backing off while it keeps dying), retire a whole generation when the socket
is re-bound, and stop them all within APISIX's deadline.

The supervisor (runner.process.supervisor) decides when; this module knows the processes, their links
(runner.process.workerlink) and their files in the run directory (runner.process.rundir).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from ..balance import ConnectionBalance
from .rundir import BALANCE_FILE, metrics_file, ready_file
from .workerlink import WorkerLink

__all__ = ["WorkerPool"]

log = logging.getLogger("mtls_guard.runner")

# APISIX sends SIGKILL 1 s after SIGTERM: workers get SIGTERM at once and are killed at this mark.
_STOP_DEADLINE = 0.85
_MAX_BACKOFF = 5.0
_HEALTHY_AFTER = 2.0


class _Worker:
    __slots__ = ("failures", "index", "link", "process", "restart_at", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.link: WorkerLink | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = 0.0


class WorkerPool:
    """N worker slots, each running ``python -m runner.process.worker`` or waiting to be restarted.

    ``listening_fd`` gives the socket to serve when a worker starts: asked each time, since a re-bind
    replaces it. ``rundir`` must be set before the first start.
    """

    def __init__(self, size: int, listening_fd: Callable[[], int]) -> None:
        self.rundir = ""
        self._listening_fd = listening_fd
        self._workers = [_Worker(i) for i in range(size)]
        # Workers serving only the connections they had when the socket was re-bound.
        self._retiring: list[tuple[subprocess.Popen[bytes], WorkerLink | None]] = []

    @property
    def size(self) -> int:
        return len(self._workers)

    def start_all(self) -> None:
        for worker in self._workers:
            self._start(worker)

    def _start(self, worker: _Worker) -> None:
        fd = self._listening_fd()
        ours, theirs = socket.socketpair()  # the worker's metrics link (runner.process.workerlink)
        try:
            argv = [self.rundir, str(worker.index), str(fd), str(os.getpid()), str(theirs.fileno())]
            worker.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "runner.process.worker", *argv], pass_fds=(fd, theirs.fileno())
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if worker.link is not None:
            worker.link.close()
        worker.link = WorkerLink(ours)
        worker.started = time.monotonic()

    # -- state ----------------------------------------------------------------------------------
    def ready_count(self) -> int:
        """Workers that said they serve (their ready file exists)."""
        return sum(os.path.exists(ready_file(self.rundir, w.index)) for w in self._workers)

    def all_exited(self) -> bool:
        """Every worker was started and has exited since (start-up cannot succeed any more)."""
        return all(w.process is not None and w.process.poll() is not None for w in self._workers)

    def any_alive(self) -> bool:
        return any(w.process is not None and w.process.poll() is None for w in self._workers)

    def control_links(self) -> list[tuple[str, WorkerLink]]:
        """Every worker a reload must reach: the serving ones, and retiring ones still holding connections."""
        links = [(f"worker={w.index}", w.link) for w in self._workers if w.link is not None]
        return links + [(f"retiring_pid={p.pid}", link) for p, link in self._retiring if link is not None]

    def scrape_links(self) -> list[WorkerLink | None]:
        """Every worker's link for a metrics scrape (retiring ones too: they still serve connections),
        in the order of :meth:`metrics_files`, which stand in for the serving workers' silent links."""
        return [w.link for w in self._workers] + [link for _, link in self._retiring]

    def metrics_files(self) -> list[str]:
        return [metrics_file(self.rundir, w.index) for w in self._workers]

    # -- supervision ----------------------------------------------------------------------------
    def forget_retired(self) -> None:
        """Drop retiring workers that have exited (their connections are all closed)."""
        still = []
        for retiring, link in self._retiring:
            if retiring.poll() is None:
                still.append((retiring, link))
            elif link is not None:
                link.close()
        self._retiring = still

    def restart_exited(self, now: float, *, may_start: bool) -> None:
        """Notice workers that exited and start them again once their back-off is over.

        A worker that dies within ``_HEALTHY_AFTER`` of starting doubles its back-off, up to
        ``_MAX_BACKOFF``; one that ran longer restarts at once. ``may_start`` False (a reload is
        under way) only records the exits.
        """
        for worker in self._workers:
            process = worker.process
            if process is not None:
                code = process.poll()
                if code is None:
                    continue
                worker.process = None
                if worker.link is not None:
                    worker.link.close()
                    worker.link = None
                ConnectionBalance.mark_absent(os.path.join(self.rundir, BALANCE_FILE), worker.index)
                quick = now - worker.started < _HEALTHY_AFTER
                worker.failures = worker.failures + 1 if quick else 0
                delay = min(_MAX_BACKOFF, 0.1 * 2**worker.failures) if worker.failures else 0.0
                worker.restart_at = now + delay
                log.error("event=worker_exited worker=%d code=%s restart_in=%.1fs", worker.index, code, delay)
            if worker.process is None and now >= worker.restart_at and may_start:
                self._start(worker)

    def retire_and_restart(self) -> None:
        """Replace every worker by a fresh one on the current socket (after a re-bind).

        The old ones retire (SIGUSR1): they stop accepting on the old, now unreachable socket but keep
        serving the APISIX connections they hold until APISIX closes them.
        """
        for worker in self._workers:
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGUSR1)
                self._retiring.append((worker.process, worker.link))
                worker.link = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ready_file(self.rundir, worker.index))
            worker.failures = 0
            self._start(worker)

    async def stop(self, since: float) -> None:
        """SIGTERM every worker, retiring ones included; kill those still running ``_STOP_DEADLINE``
        after ``since`` (when the supervisor began to stop)."""
        running = [w.process for w in self._workers if w.process is not None and w.process.poll() is None]
        running += [p for p, _ in self._retiring if p.poll() is None]
        for link in [w.link for w in self._workers] + [link for _, link in self._retiring]:
            if link is not None:
                link.close()
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        while running and time.monotonic() - since < _STOP_DEADLINE:
            await asyncio.sleep(0.01)
            running = [p for p in running if p.poll() is None]
        for process in running:
            log.error("event=worker_killed pid=%d reason='no exit within %.2fs'", process.pid, _STOP_DEADLINE)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
