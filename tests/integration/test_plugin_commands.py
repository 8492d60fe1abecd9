"""Plugins add `mtls-guard` commands through the entry-point group ``apisix_mtls_guard.commands``.

Each test installs a throw-away distribution on PYTHONPATH (a dist-info declaring entry points, next
to the modules they name) and runs the real console script, so the commands come from package metadata
exactly as after a ``pip install``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.integration.test_process import Spawn, apisix_env, one_line, one_request, wait_ready
from tests.integration.test_process import spawn as spawn  # noqa: PLC0414 - the fixture, shared

COMMANDS = "apisix_mtls_guard.commands"
BUNDLED = ("run", "check", "explain", "lint", "demo")

HELLO = """
def register(commands):
    hello = commands.add_parser("hello", help="say hello")
    hello.add_argument("--name", default="world")
    hello.set_defaults(command=lambda args: print(f"hello {args.name}") or 0)
"""
RAISES = """
def register(commands):
    commands.add_parser("half", help="added before register() fails")
    raise RuntimeError("boom")
"""


def install(
    directory: Path,
    entry_points: Mapping[str, Mapping[str, str]],
    modules: Mapping[str, str] | None = None,
    name: str = "commands-test-plugins",
) -> str:
    """A PYTHONPATH entry holding one distribution: these entry points, and these modules (name -> source)."""
    root = directory / "site"
    dist = root / f"{name.replace('-', '_')}-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "\n".join(
            f"[{group}]\n" + "".join(f"{ep} = {target}\n" for ep, target in eps.items())
            for group, eps in entry_points.items()
        )
    )
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return str(root)


def mtls_guard(pythonpath: str | None, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The console script with a minimal environment, plus PYTHONPATH when given."""
    binary = Path(sys.executable).parent / "mtls-guard"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    # check=False: the exit code is what the tests look at.
    return subprocess.run(
        [str(binary), *args], check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def listed(help_text: str) -> set[str]:
    """Command names in the top-level help's command list (argparse indents them by four spaces)."""
    return set(re.findall(r"^    (\S+)", help_text, re.MULTILINE))


class TestCommandsFromEntryPoints:
    def test_bundled_commands_come_from_the_entry_point(self, tmp_path: Path) -> None:
        """Without other plugins, --help lists run and the bundled plugin's check, explain, lint and demo."""
        done = mtls_guard(None, "--help", cwd=tmp_path)

        assert done.returncode == 0, done.stderr
        assert listed(done.stdout) == set(BUNDLED)

    def test_plugin_adds_a_command(self, tmp_path: Path) -> None:
        """A distribution's command entry point adds `hello`, listed in --help and run with its own options."""
        path = install(tmp_path, {COMMANDS: {"greeter": "hello_cmd:register"}}, {"hello_cmd": HELLO})

        helped = mtls_guard(path, "--help", cwd=tmp_path)
        done = mtls_guard(path, "hello", "--name", "apisix", cwd=tmp_path)

        assert listed(helped.stdout) == {*BUNDLED, "hello"}
        assert (done.returncode, done.stdout, done.stderr) == (0, "hello apisix\n", "")

    def test_bundled_command_still_works_next_to_a_plugin(self, tmp_path: Path) -> None:
        """With a plugin's commands installed, the bundled `check` still validates a policy."""
        path = install(tmp_path, {COMMANDS: {"greeter": "hello_cmd:register"}}, {"hello_cmd": HELLO})

        done = mtls_guard(path, "check", "{}", cwd=tmp_path)

        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("valid policy\n")


class TestBrokenCommands:
    @pytest.fixture
    def broken(self, tmp_path: Path) -> str:
        """A distribution whose command entry point names a module that is not installed."""
        return install(tmp_path, {COMMANDS: {"broken": "no_such_module_for_tests:register"}})

    @pytest.mark.parametrize("args", [("check", "{}"), ("hello",)], ids=["bundled-command", "unknown-command"])
    def test_other_commands_fail_naming_the_plugin(self, broken: str, tmp_path: Path, args: tuple[str, ...]) -> None:
        """Any command but run exits 3 with one stderr line naming the broken plugin, its target and why."""
        done = mtls_guard(broken, *args, cwd=tmp_path)

        assert done.returncode == 3
        assert done.stdout == ""
        line = one_line(done.stderr)
        assert line.startswith("mtls-guard: error: commands of plugin 'broken' (no_such_module_for_tests:register)")
        assert "ModuleNotFoundError" in line

    def test_help_names_the_broken_plugin(self, broken: str, tmp_path: Path) -> None:
        """--help still lists every working command and names the broken plugin."""
        done = mtls_guard(broken, "--help", cwd=tmp_path)

        assert done.returncode == 0
        assert listed(done.stdout) == set(BUNDLED)
        assert "commands of plugin 'broken'" in " ".join(done.stdout.split())

    def test_version_is_unaffected(self, broken: str, tmp_path: Path) -> None:
        """--version prints the version whatever the plugins' commands are."""
        done = mtls_guard(broken, "--version", cwd=tmp_path)

        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout.startswith("mtls-guard ")

    def test_run_is_unaffected(self, broken: str, spawn: Spawn, sock_path: str) -> None:
        """`mtls-guard run` never loads command entry points: with a broken one it serves APISIX."""
        runner = spawn(apisix_env(sock_path, PYTHONPATH=broken))
        wait_ready(runner, sock_path)

        passed, _ = asyncio.run(one_request(sock_path))

        assert passed.kind == "pass"
        assert "broken" not in runner.stdout + runner.stderr

    def test_register_that_raises(self, tmp_path: Path) -> None:
        """A register() that raises is reported with its exception, and its half-added command is dropped."""
        path = install(tmp_path, {COMMANDS: {"raiser": "raises_cmd:register"}}, {"raises_cmd": RAISES})

        done = mtls_guard(path, "half", cwd=tmp_path)
        helped = mtls_guard(path, "--help", cwd=tmp_path)

        assert done.returncode == 3
        assert "plugin 'raiser' (raises_cmd:register): register() failed: RuntimeError('boom')" in one_line(done.stderr)
        assert listed(helped.stdout) == set(BUNDLED)

    @pytest.mark.parametrize(
        ("name", "holder"), [("run", "the runner"), ("check", "plugin 'mtls-guard'")], ids=["run", "bundled"]
    )
    def test_taken_name_is_refused(self, tmp_path: Path, name: str, holder: str) -> None:
        """A plugin adding a command name already taken is refused, naming it and who holds the name."""
        source = f"def register(commands):\n    commands.add_parser({name!r})\n"
        path = install(tmp_path, {COMMANDS: {"zz-copycat": "copycat:register"}}, {"copycat": source})

        done = mtls_guard(path, "check", "{}", cwd=tmp_path)

        assert done.returncode == 3
        line = one_line(done.stderr)
        assert f"plugin 'zz-copycat' (copycat:register): command {name!r} is taken by {holder}" in line
