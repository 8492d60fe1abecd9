"""The ``mtls-guard`` command: ``run`` serves APISIX; every other command comes from a plugin.

Plugins add commands through the entry-point group ``apisix_mtls_guard.commands``: each entry point
names a ``register(subparsers)`` function that adds its commands to argparse's subparsers action (the
bundled ``mtls-guard`` plugin adds check, explain, demo and lint that way). They are loaded only for a
command other than ``run`` and for the top-level help: the runner APISIX spawns never depends on them.
A command entry point that cannot be imported, whose register() raises, or that adds a name already
taken makes every command but ``run`` fail (exit 3) naming the plugin; the top-level help lists it.

Exit codes: 0 success, 1 a tool's negative verdict (invalid policy, lint errors, denied request),
2 usage error, 3 start-up failure (bad settings, missing extra, socket unusable or served by another
runner, a broken plugin or plugin-command entry point) — reported in one line first.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Final, NoReturn, cast

from .app import EXIT_STARTUP_FAILURE, exit_now, run
from .logs import configure_logging
from .preflight import check_extras, check_socket_path
from .process.cpus import usable_cpus
from .registry import COMMANDS_ENTRY_POINT_GROUP, PluginRegistry, RegistryError
from .reload import catch_early_hangups
from .server import StartupError
from .settings import SettingsError, SettingsSource

log = logging.getLogger("mtls_guard.runner")

__all__ = ["main"]

EXIT_USAGE: Final = 2

Command = Callable[[argparse.Namespace], int]
RUN: Final = "run"


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        RUN,
        help="serve APISIX's ext-plugin socket",
        description=(
            "Serve APISIX on the Unix socket named by APISIX_LISTEN_ADDRESS (set by APISIX when it "
            "spawns the runner through ext-plugin.cmd) or --listen."
        ),
    )
    p.add_argument("--listen", help="socket path or unix:<path> (overrides APISIX_LISTEN_ADDRESS)")
    p.add_argument("--config", help="YAML file with runner settings (see conf/mtls-guard.yaml)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-file", help="also write log lines to this file")
    p.add_argument("--call-timeout", type=float, help="seconds a plugin chain may take (default 10)")
    p.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"))
    p.add_argument("--workers", type=int, help="worker processes (default and ceiling: the CPUs this process may use)")
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="serve /metrics, /healthz, /readyz (opt-in)")
    p.add_argument(
        "--replace",
        action="store_true",
        default=None,
        help="take the socket over even if another runner serves it (implied for APISIX_LISTEN_ADDRESS)",
    )
    p.set_defaults(command=_run)


def _run(args: argparse.Namespace) -> int:
    catch_early_hangups()  # first: until serving, a SIGHUP is noted (it reloads then), not fatal
    overrides = {
        "listen": args.listen,
        "log_level": args.log_level,
        "log_file": args.log_file,
        "call_timeout": args.call_timeout,
        "event_loop": args.event_loop,
        "metrics_addr": args.metrics_addr,
        "workers": args.workers,
        "replace": args.replace,
    }
    # What a reload reads again: the file, under the environment and options of this start.
    source = SettingsSource(environ=dict(os.environ), config_file=args.config, overrides=overrides)
    try:
        settings = source.load()
        configure_logging(settings.log_level, settings.log_file)
        check_extras(settings)
        check_socket_path(settings)
        registry = PluginRegistry.discover()
    except (SettingsError, StartupError, RegistryError, OSError) as exc:
        print(f"mtls-guard: error: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILURE
    usable = usable_cpus()
    if settings.workers > usable:
        # More workers than CPUs would take turns on the same cores and serve less (runner/process/cpus.py).
        log.warning("event=workers_capped requested=%d usable_cpus=%d running=%d", settings.workers, usable, usable)
        settings = dataclasses.replace(settings, workers=usable)
    if settings.workers > 1:
        from .process.supervisor import Supervisor

        code = Supervisor(settings, registry, source).run()
    else:
        code = run(settings, registry, source=source)
    return exit_now(code)  # the process ends here, without the interpreter's slow teardown


def package_version() -> str:
    """The installed distribution's version; in a source checkout that was never installed, the
    one pyproject.toml declares."""
    from importlib import metadata

    try:
        return metadata.version("apisix-mtls-guard")
    except metadata.PackageNotFoundError:
        pass
    import tomllib
    from pathlib import Path

    try:
        with (Path(__file__).resolve().parent.parent / "pyproject.toml").open("rb") as f:
            project = tomllib.load(f)["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"
    # Only ours: a wheel installed without metadata could sit next to someone else's pyproject.toml.
    return str(project.get("version", "unknown")) if project.get("name") == "apisix-mtls-guard" else "unknown"


def _one_line(message: str) -> str:
    # Option values and exception texts can bring line breaks and control characters: scripts read
    # the first line only, so it must be the whole message, printable.
    return "".join(c if c.isprintable() else "?" for c in " ".join(message.split()))


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors (exit 2) as one line on stderr: the default prints the whole usage
    first, and scripts read the first line only. Used for the top level and every subcommand."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)}; see {self.prog} --help\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # As a subcommand, arguments it does not know would go back to the top-level parser, whose
        # error names the wrong command: they are this command's usage error.
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


class _VersionAction(argparse.Action):
    """Like argparse's "version" action, but looks the version up only when asked (start-up stays cheap)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(f"mtls-guard {package_version()}")
        parser.exit(0)


@dataclasses.dataclass(frozen=True)
class BrokenCommands:
    """A command entry point that contributed nothing: why, and which plugin to fix or uninstall."""

    plugin: str  # the entry point's name
    target: str  # its value, module:function
    reason: str

    def __str__(self) -> str:
        return f"commands of plugin {self.plugin!r} ({self.target}): {self.reason}"


class _CommandConflict(Exception):
    """A plugin adds a command name (or alias) that is already taken."""


if TYPE_CHECKING:  # argparse's class is generic only in typeshed, not at run time
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsers = argparse._SubParsersAction


class _Commands(_SubParsers):
    """The subcommands: ``run``, and on first need those of every plugin's command entry point."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._adding = "the runner"
        self._owners: dict[str, str] = {}
        self._broken: tuple[BrokenCommands, ...] | None = None

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        # argparse refuses a taken name too, but without saying who holds it.
        names = (name, *kwargs.get("aliases", ()))
        for command in names:
            if command in self._owners:
                raise _CommandConflict(f"command {command!r} is taken by {self._owners[command]}")
        parser = super().add_parser(name, **kwargs)
        self._owners.update(dict.fromkeys(names, self._adding))
        return parser

    def load_plugin_commands(self) -> tuple[BrokenCommands, ...]:
        """Add every plugin's commands (once); the entry points that failed, in name order."""
        if self._broken is None:
            self._broken = tuple(self._load())
        return self._broken

    def _load(self) -> Iterator[BrokenCommands]:
        # Name order: which of two plugins claiming one name is refused must not depend on install order.
        for ep in sorted(entry_points(group=COMMANDS_ENTRY_POINT_GROUP), key=lambda e: e.name):
            try:
                register = ep.load()
            except Exception as exc:  # noqa: BLE001 - an import can fail any way; each is reported
                yield BrokenCommands(ep.name, ep.value, f"cannot be imported: {type(exc).__name__}: {exc}")
                continue
            if not callable(register):
                yield BrokenCommands(ep.name, ep.value, "is not a register(subparsers) function")
                continue
            parsers, helps, owners = dict(self._name_parser_map), len(self._choices_actions), dict(self._owners)
            self._adding = f"plugin {ep.name!r}"
            try:
                register(self)
            except Exception as exc:  # noqa: BLE001 - reported, naming the plugin
                # None of a half-registered plugin's commands stay: the help lists only what works.
                self._name_parser_map.clear()  # it is also self.choices: change it in place
                self._name_parser_map.update(parsers)
                del self._choices_actions[helps:]
                self._owners = owners
                reason = str(exc) if isinstance(exc, _CommandConflict) else f"register() failed: {exc!r}"
                yield BrokenCommands(ep.name, ep.value, reason)


class _MainParser(OneLineParser):
    """The top-level parser: its help loads the plugins' commands to list them, and names broken ones."""

    commands: _Commands | None = None

    def format_help(self) -> str:
        if self.commands is not None:
            broken = self.commands.load_plugin_commands()
            if broken:
                self.epilog = "Unavailable (fix or uninstall the plugin): " + "; ".join(map(str, broken))
        return super().format_help()


def build_parser() -> tuple[argparse.ArgumentParser, _Commands]:
    """The parser with ``run`` only, and its subcommands (``load_plugin_commands()`` adds the rest)."""
    parser = _MainParser(
        prog="mtls-guard",
        description="Fine-grained mutual-TLS policy for Apache APISIX (ext-plugin runner + tools).",
    )
    parser.add_argument("--version", action=_VersionAction)
    # Every subcommand parser is a OneLineParser; the registering functions only need an ArgumentParser.
    commands = cast(
        "_Commands",
        parser.add_subparsers(
            action=_Commands, dest="subcommand", required=True, metavar="COMMAND", parser_class=OneLineParser
        ),
    )
    parser.commands = commands
    _add_run(commands)
    return parser, commands


def _asked_command(argv: Sequence[str]) -> str | None:
    """The subcommand argparse will pick: the first argument that is not an option, as no top-level
    option takes a value."""
    return next((arg for arg in argv if arg == "-" or not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser, commands = build_parser()
    asked = _asked_command(arguments)
    # `run` (and --version) never import the plugins' tools: a broken tools entry point must not keep
    # the runner APISIX spawns from starting, nor slow its start.
    if asked is not None and asked != RUN:
        broken = commands.load_plugin_commands()
        if broken:
            # Refused even for another plugin's command: a broken plugin may be the one that owns the
            # name asked for, or would have claimed it, and silently partial tools are what this avoids.
            details = _one_line("; ".join(map(str, broken)))
            print(f"mtls-guard: error: {details}; fix or uninstall the plugin", file=sys.stderr)
            return EXIT_STARTUP_FAILURE
    args = parser.parse_args(arguments)
    command: Command = args.command
    return command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
