"""What `mtls-guard` says when it starts: the serving line, missing extras, --version, the config's relative paths."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner import cli
from tests.integration.test_process import (
    EXIT_STARTUP_FAILURE,
    Runner,
    Spawn,
    _binary,
    apisix_env,
    one_line,
    wait_ready,
)
from tests.integration.test_process import spawn as spawn  # noqa: PLC0414 - the fixture, shared

ROOT = Path(__file__).resolve().parents[2]
SERVING = re.compile(r"^mtls-guard NOTICE event=serving socket=(\S+) workers=(\d+) metrics=(\S+) pid=(\d+)$", re.M)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serving_lines(runner: Runner, timeout: float = 15.0) -> list[tuple[str, ...]]:
    deadline = time.monotonic() + timeout
    while not SERVING.search(runner.stdout):
        assert runner.proc.poll() is None, runner.stdout + runner.stderr
        assert time.monotonic() < deadline, f"no serving line: {runner.stdout}"
        time.sleep(0.02)
    time.sleep(0.3)  # a second line, if any, would come right after
    return SERVING.findall(runner.stdout)


class TestServingLine:
    def test_single_process_says_once_where_it_serves(self, spawn: Spawn, sock_path: str) -> None:
        """At the default log level a single process logs one line: socket, workers=1, metrics address, pid."""
        port = free_port()
        runner = spawn(apisix_env(sock_path), "--workers", "1", "--metrics-addr", f":{port}")

        lines = serving_lines(runner)

        assert lines == [(sock_path, "1", f"127.0.0.1:{port}", str(runner.proc.pid))]
        assert "INFO" not in runner.stdout  # the default level stays quiet otherwise

    def test_supervisor_says_it_once_for_all_workers(self, spawn: Spawn, sock_path: str) -> None:
        """With --workers 2 only the supervisor logs the line (workers=2), and metrics=off without an address."""
        if len(os.sched_getaffinity(0)) < 2:
            pytest.skip("needs two usable CPUs for two workers")
        runner = spawn(apisix_env(sock_path), "--workers", "2")

        assert serving_lines(runner) == [(sock_path, "2", "off", str(runner.proc.pid))]


def blocked_modules_env(sock_path: str, tmp_path: Path, *modules: str) -> dict[str, str]:
    """APISIX's environment plus a sitecustomize that makes ``modules`` fail to import, as if not installed."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return apisix_env(sock_path, PYTHONPATH=str(site))


class TestMissingExtras:
    @pytest.mark.parametrize(
        ("args", "module", "extra"),
        [
            (("--event-loop", "uvloop"), "uvloop", "uvloop"),
            (("--metrics-addr", "127.0.0.1:9"), "prometheus_client", "metrics"),
        ],
        ids=["uvloop", "metrics"],
    )
    def test_one_line_with_the_install_hint_before_anything_binds(
        self, spawn: Spawn, sock_path: str, tmp_path: Path, args: tuple[str, ...], module: str, extra: str
    ) -> None:
        """A missing optional extra stops the runner with exit 3 and one stderr line saying what to pip install."""
        env = blocked_modules_env(sock_path, tmp_path, module)
        runner = spawn(env, "--workers", "2", *args)

        assert runner.wait() == EXIT_STARTUP_FAILURE
        line = one_line(runner.stderr)
        assert line.startswith("mtls-guard: error:")
        assert module in line
        assert f"pip install '.[{extra}]'" in line
        assert runner.stdout == ""
        assert not os.path.lexists(sock_path)

    def test_event_loop_uvloop_also_in_the_config_file(self, spawn: Spawn, sock_path: str, tmp_path: Path) -> None:
        """event_loop: uvloop from the file is checked the same way."""
        config = tmp_path / "runner.yaml"
        config.write_text("event_loop: uvloop\n")
        runner = spawn(blocked_modules_env(sock_path, tmp_path, "uvloop"), "--config", str(config))

        assert runner.wait() == EXIT_STARTUP_FAILURE
        assert "pip install '.[uvloop]'" in one_line(runner.stderr)


class TestVersion:
    def test_version_option(self) -> None:
        """`mtls-guard --version` prints the installed package's version and exits 0."""
        from importlib import metadata

        result = subprocess.run([_binary(), "--version"], capture_output=True, text=True, check=False)

        assert result.returncode == 0
        assert result.stdout == f"mtls-guard {metadata.version('apisix-mtls-guard')}\n"

    def test_source_checkout_falls_back_to_pyproject(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without installed metadata (a plain checkout on PYTHONPATH) the version comes from pyproject.toml."""
        import tomllib
        from importlib import metadata

        def missing(name: str) -> str:
            raise metadata.PackageNotFoundError(name)

        monkeypatch.setattr(metadata, "version", missing)
        expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

        assert cli.package_version() == expected


class TestRelativePolicyFile:
    def test_policy_file_next_to_the_config_is_found_from_another_directory(
        self, spawn: Spawn, sock_path: str, tmp_path: Path
    ) -> None:
        """policy_file: policies.yaml is read from the config's directory although the runner runs elsewhere."""
        config_dir = tmp_path / "conf"
        config_dir.mkdir()
        shutil.copy(ROOT / "conf" / "policies.yaml", config_dir / "policies.yaml")
        config = config_dir / "runner.yaml"
        config.write_text("plugins:\n  mtls-guard:\n    policy_file: policies.yaml\n")
        assert Path.cwd() != config_dir

        runner = spawn(apisix_env(sock_path), "--config", str(config), "--workers", "1")

        wait_ready(runner, sock_path)  # a policy file resolved against the cwd would not exist: exit 3
        assert "startup_failed" not in runner.stdout + runner.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
