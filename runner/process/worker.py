"""One worker process of runner.process.supervisor:
``python -m runner.process.worker RUNDIR INDEX FD SUPERVISOR_PID LINK_FD``.

It serves the listening socket it inherited (FD) with the settings the supervisor wrote into its
private run directory, shares conf tokens through the table there, answers the supervisor's
scrape-time requests for its metrics and its reload requests (runner.process.workerreload) on LINK_FD
(runner.process.workerlink), keeps a copy of its metrics in the run directory as the fallback, and exits
when the supervisor is gone (so a SIGKILLed supervisor leaves no orphans serving a socket nobody
manages).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from ..app import EXIT_STARTUP_FAILURE, exit_now, run, server_gauges
from ..balance import ConnectionBalance
from ..logs import configure_logging
from ..metrics import MetricsSource, RPCStats, live_view, to_json
from ..registry import PluginRegistry, RegistryError
from ..server import RunnerServer
from ..settings import SettingsError
from ..sharedconf import SharedConfs, SharedConfsError
from .rundir import BALANCE_FILE, CONFS_FILE, metrics_file, read_settings, ready_file
from .workerlink import answer_scrapes
from .workerreload import WorkerReloads

# How stale the fallback file may get: it only counts when this worker does not answer a scrape.
_FALLBACK_INTERVAL = 1.0
_PARENT_CHECK = 0.25


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the supervisor dies (prctl PR_SET_PDEATHSIG), so a killed
    supervisor's workers stop accepting at once; elsewhere the periodic parent check does it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    rundir, index, fd, parent, link_fd = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    _die_with_parent()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the server can retire (see beside())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the supervisor (runner.process.workerreload)
    if os.getppid() != parent:  # the supervisor died while this worker was starting
        shutil.rmtree(rundir, ignore_errors=True)
        return EXIT_STARTUP_FAILURE
    try:
        settings = read_settings(rundir)
        configure_logging(settings.log_level, settings.log_file)
        registry = PluginRegistry.discover()
        shared = SharedConfs(
            os.path.join(rundir, CONFS_FILE), max_entries=settings.max_conf_entries, clock=time.monotonic
        )
    except (OSError, ValueError, SettingsError, RegistryError, SharedConfsError) as exc:
        print(f"mtls-guard: worker {index}: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILURE
    stats = RPCStats()
    sources = [p for p in registry if isinstance(p, MetricsSource)]

    async def beside(server: RunnerServer) -> None:
        # SIGUSR1 from the supervisor: the socket was re-bound and new workers took over.
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, server.retire)
        Path(ready_file(rundir, index)).touch()  # the server is accepting: the supervisor may publish
        view = live_view(stats, server_gauges(server), sources)
        reloads = WorkerReloads(rundir, registry, server)
        link = asyncio.ensure_future(
            answer_scrapes(socket.socket(fileno=link_fd), lambda: to_json(view()), reloads.handle)
        )
        target = metrics_file(rundir, index)
        last = 0.0
        try:
            while True:
                await asyncio.sleep(_PARENT_CHECK)
                if os.getppid() != parent:
                    server.stop()  # the supervisor was killed: nobody manages the socket any more
                    return
                now = time.monotonic()
                if not server.retiring and now - last >= _FALLBACK_INTERVAL:  # the successor owns the file now
                    last = now
                    with contextlib.suppress(OSError):
                        _write_atomically(target, json.dumps(to_json(view())))
        finally:
            # Awaited, not only cancelled: the loop closes right after, and a task still pending then
            # would close its transport on a closed loop (a traceback on stderr at every exit).
            link.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link

    sock = socket.socket(fileno=fd)
    balance = ConnectionBalance(os.path.join(rundir, BALANCE_FILE), index, settings.workers)
    try:
        return run(
            settings, registry, observers=[stats], extra=beside, listen_socket=sock, shared=shared, balance=balance
        )
    finally:
        shared.close()
        if os.getppid() != parent:  # the supervisor was killed and cannot clean up after itself
            shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
