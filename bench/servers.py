"""Server processes under test: the floor or our runner.

Parent side: :class:`ServerProcess` starts ``python -m bench.servers`` on a socket in a temp dir,
waits until the child reports it is listening (a ready file), and stops it with SIGTERM. With
``workers=N`` it starts the production command instead, ``mtls-guard run --workers N`` (plugins
from the installed entry points, the scenario's plugin options in a settings file), waits until the
socket accepts connections, and reports the CPU time of the whole process tree (supervisor and
workers) through :attr:`ServerProcess.pids`.

Pinning: the floor and the in-process runner pin themselves to ``--cpu``; ``--workers 1`` is pinned
to that CPU too (affinity set right after the start, so it holds for the whole process).
``--workers N > 1`` gets ``tree_cpus``: the cores other than the load generator's when there are at
least N of them (a 3+ core machine), else no pinning at all (2 cores: the workers need both, so they
share the load generator's core and the kernel places them). Workers inherit the supervisor's
affinity.

Child side (``main``): pins itself to ``--cpu``, builds the event loop, and serves either
``bench.floor`` or ``runner.app.run`` — the production entry point, with the plugins named by the
scenario registered in-process, production settings defaults and no metrics observers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .scenarios import Scenario

__all__ = ["ServerProcess", "main"]

_ROOT = Path(__file__).resolve().parent.parent
_READY_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0


class ServerProcess:
    """One server subprocess (``with ServerProcess(...) as server: ... server.path``)."""

    def __init__(
        self,
        scenario: Scenario,
        loop: str,
        cpu: int | None,
        profile: str | None = None,
        workers: int | None = None,
        tree_cpus: set[int] | None = None,
    ) -> None:
        if workers is not None and profile is not None:
            raise ValueError("--profile covers the in-process servers only")
        self.scenario = scenario
        self.loop = loop
        self.cpu = cpu if workers is None or workers == 1 else None
        self.tree_cpus = tree_cpus if workers is not None and workers > 1 else None
        self.profile = profile
        self.workers = workers
        self._tmp = tempfile.TemporaryDirectory(prefix="mtls-bench-")
        self.path = os.path.join(self._tmp.name, "runner.sock")
        self.log_path = os.path.join(self._tmp.name, "server.log")
        self._ready = os.path.join(self._tmp.name, "ready")
        self._proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.log_text = ""

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def label(self) -> str:
        """How the server runs, for reports: in-process, or the production command's worker count."""
        return "in-process" if self.workers is None else f"--workers {self.workers}"

    @property
    def pids(self) -> list[int]:
        """Every process serving: the server itself and, under a supervisor, its workers."""
        return [self.pid, *_children(self.pid)]

    def start(self) -> None:
        if self.workers is not None:
            self._start_command(self.workers)
            return
        cmd = [sys.executable, "-m", "bench.servers", "--socket", self.path, "--ready-file", self._ready]
        cmd += ["--loop", self.loop, "--scenario", self.scenario.to_json()]
        if self.cpu is not None:
            cmd += ["--cpu", str(self.cpu)]
        if self.profile is not None:
            cmd += ["--profile", self.profile]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _READY_TIMEOUT
        while not os.path.exists(self._ready):
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited with {self._proc.returncode} before listening:\n{self._log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after {_READY_TIMEOUT:g}s:\n{self._log()}")
            time.sleep(0.01)

    def _start_command(self, workers: int) -> None:
        """``mtls-guard run --workers N`` exactly as an operator starts it (APISIX sets the socket)."""
        settings = os.path.join(self._tmp.name, "runner.yaml")
        # JSON is YAML: the scenario's plugin options become the settings file's plugins section.
        Path(settings).write_text(json.dumps({"plugins": self.scenario.plugin_options}))
        binary = str(Path(sys.executable).parent / "mtls-guard")
        cmd = [binary, "run", "--config", settings, "--workers", str(workers), "--event-loop", self.loop]
        cmd += ["--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("APISIX_")}
        env["APISIX_LISTEN_ADDRESS"] = f"unix:{self.path}"
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if self.cpu is not None:
            os.sched_setaffinity(self._proc.pid, {self.cpu})
        elif self.tree_cpus is not None:
            os.sched_setaffinity(self._proc.pid, self.tree_cpus)  # before it spawns its workers
        deadline = time.monotonic() + _READY_TIMEOUT
        while not _accepts(self.path):
            if self._proc.poll() is not None:
                raise RuntimeError(f"mtls-guard exited with {self._proc.returncode} before serving:\n{self._log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mtls-guard not serving after {_READY_TIMEOUT:g}s:\n{self._log()}")
            time.sleep(0.02)
        # The supervisor publishes the socket once every worker serves; give stragglers a moment.
        deadline = time.monotonic() + _READY_TIMEOUT
        while workers > 1 and len(_children(self.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        proc = self._proc
        if proc is None or self.exit_code is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.exit_code = proc.wait()
        self.log_text = self._log()

    def _log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._tmp.cleanup()


def _accepts(path: str) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)
        return True
    return False


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (the supervisor's workers), from /proc."""
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            found += [int(x) for x in Path(path).read_text().split()]
    return sorted(set(found))


# --- child side ----------------------------------------------------------------------------------


def _touch(path: str) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, path)


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def _run_floor(scenario: Scenario, path: str, ready: str, loop_kind: str) -> int:
    from .floor import serve_floor

    loop = _new_loop(loop_kind)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(serve_floor(scenario, path, lambda: _touch(ready), stop))
    finally:
        loop.close()
        if os.path.exists(path):
            os.unlink(path)
    return 0


def _run_runner(scenario: Scenario, path: str, ready: str, loop_kind: str) -> int:
    from runner.app import run
    from runner.logs import configure_logging
    from runner.server import RunnerServer
    from runner.settings import Settings

    from .plugins import build_registry

    registry = build_registry(scenario)
    settings = Settings(listen=path, event_loop=loop_kind, log_level="warning", plugins=scenario.plugin_options)  # type: ignore[arg-type]
    configure_logging(settings.log_level)

    async def announce(_server: RunnerServer) -> None:
        _touch(ready)

    return run(settings, registry, extra=announce)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers", description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--scenario", required=True, help="Scenario as JSON")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    parser.add_argument("--profile", help="write cProfile stats of the whole serving run to this file")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    scenario = Scenario.from_json(args.scenario)
    serve = _run_floor if scenario.server == "floor" else _run_runner
    if not args.profile:
        return serve(scenario, args.socket, args.ready_file, args.loop)
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(serve, scenario, args.socket, args.ready_file, args.loop)
    finally:
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    sys.exit(main())
