"""runner.cli loads plugin commands from their entry-point group, only when a command other than run needs them.

Entry points are faked here (the subprocess tests in tests/integration/test_plugin_commands.py use real
package metadata); the bundled plugin's real entry point is among them unless a test leaves it out.
"""

from __future__ import annotations

import argparse
from importlib.metadata import EntryPoint

import pytest

import runner.cli
from runner.cli import main
from runner.registry import COMMANDS_ENTRY_POINT_GROUP

BUNDLED = EntryPoint("mtls-guard", "plugins.mtls_guard.tools.commands:register", COMMANDS_ENTRY_POINT_GROUP)


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *targets: tuple[str, str]) -> list[str]:
    """Installs the bundled entry point and ``(name, function in this module)`` ones; returns the groups asked."""
    asked: list[str] = []
    eps = (BUNDLED, *(EntryPoint(name, f"{__name__}:{target}", COMMANDS_ENTRY_POINT_GROUP) for name, target in targets))

    def entry_points(*, group: str) -> tuple[EntryPoint, ...]:
        asked.append(group)
        return tuple(ep for ep in eps if ep.group == group)

    monkeypatch.setattr(runner.cli, "entry_points", entry_points)
    return asked


# Targets for the fake entry points.
def add_hello(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hello = commands.add_parser("hello", help="say hello")
    hello.set_defaults(command=lambda args: 7)


def add_one_then_fail(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commands.add_parser("one", help="added before the failure")
    raise ValueError("line one\nline two")


def add_alias_of_check(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commands.add_parser("verify", aliases=["check"])


not_callable = "register"


class TestLoading:
    def test_command_from_entry_point_runs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A command a plugin's register() adds runs, and its function's result is the exit code."""
        fake_entry_points(monkeypatch, ("greeter", "add_hello"))

        assert main(["hello"]) == 7

    @pytest.mark.parametrize("argv", [["--version"], ["run", "--help"], ["--version", "run"]])
    def test_run_and_version_never_load_commands(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
    ) -> None:
        """`run` and `--version` do not even look up the commands entry-point group."""
        asked = fake_entry_points(monkeypatch, ("broken", "not_callable"))

        with pytest.raises(SystemExit) as exited:
            main(argv)

        assert exited.value.code == 0
        assert asked == []
        assert capsys.readouterr().err == ""

    def test_help_loads_commands(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """The top-level help lists the bundled commands and a plugin's."""
        fake_entry_points(monkeypatch, ("greeter", "add_hello"))

        with pytest.raises(SystemExit):
            main(["--help"])

        out = capsys.readouterr().out
        for name in ("run", "check", "explain", "lint", "demo", "hello"):
            assert f"\n    {name} " in out


class TestBroken:
    def test_not_callable(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """An entry point naming something that is not a function is reported, exit 3."""
        fake_entry_points(monkeypatch, ("odd", "not_callable"))

        assert main(["check", "{}"]) == 3
        err = capsys.readouterr().err
        assert f"commands of plugin 'odd' ({__name__}:not_callable): is not a register(subparsers) function" in err

    def test_failed_register_is_one_line_and_rolled_back(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A register() raising a multi-line message: one stderr line, and the command it added is gone."""
        fake_entry_points(monkeypatch, ("failing", "add_one_then_fail"))

        assert main(["one"]) == 3
        err = capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out

        assert err.count("\n") == 1
        assert "plugin 'failing'" in err
        assert "\n    one " not in out
        assert "\n    check " in out

    def test_alias_clash(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """An alias is a name too: a plugin aliasing `check` is refused, naming the bundled plugin."""
        fake_entry_points(monkeypatch, ("verifier", "add_alias_of_check"))

        assert main(["verify"]) == 3
        assert "command 'check' is taken by plugin 'mtls-guard'" in capsys.readouterr().err

    def test_same_name_twice_refuses_the_later_plugin(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Two plugins adding one name: the later in name order is refused, whatever the install order."""
        fake_entry_points(monkeypatch, ("second", "add_hello"), ("first", "add_hello"))

        assert main(["hello"]) == 3
        err = capsys.readouterr().err
        assert "commands of plugin 'second'" in err
        assert "command 'hello' is taken by plugin 'first'" in err
