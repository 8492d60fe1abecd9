"""The ``mtls-guard`` command: ``run`` serves APISIX; the operator tools come from the plugin package.

Exit codes: 0 success, 1 a tool's negative verdict (invalid policy, lint errors, denied request),
2 usage error, 3 start-up failure (bad settings, missing extra, socket unusable or served by another
runner) — reported in one line first.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Final, NoReturn, cast

from .app import EXIT_STARTUP_FAILURE, exit_now, run
from .cpus import usable_cpus
from .logs import configure_logging
from .preflight import check_extras, check_socket_path
from .registry import PluginRegistry, RegistryError
from .reload import catch_early_hangups
from .server import StartupError
from .settings import SettingsError, SettingsSource

log = logging.getLogger("mtls_guard.runner")

__all__ = ["main"]

EXIT_USAGE: Final = 2

Command = Callable[[argparse.Namespace], int]


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="serve APISIX's ext-plugin socket",
        description=(
            "Serve APISIX on the Unix socket named by APISIX_LISTEN_ADDRESS (set by APISIX when it "
            "spawns the runner through ext-plugin.cmd) or --listen."
        ),
    )
    p.add_argument("--listen", help="socket path or unix:<path> (overrides APISIX_LISTEN_ADDRESS)")
    p.add_argument("--config", help="YAML file with runner settings (see conf/runner.yaml)")
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
        # More workers than CPUs would take turns on the same cores and serve less (runner/cpus.py).
        log.warning("event=workers_capped requested=%d usable_cpus=%d running=%d", settings.workers, usable, usable)
        settings = dataclasses.replace(settings, workers=usable)
    if settings.workers > 1:
        from .supervisor import Supervisor

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


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors (exit 2) as one line on stderr: the default prints the whole usage
    first, and scripts read the first line only. Used for the top level and every subcommand."""

    def error(self, message: str) -> NoReturn:
        # Option values can bring line breaks and control characters: keep the line one printable line.
        text = "".join(c if c.isprintable() else "?" for c in " ".join(message.split()))
        self.exit(EXIT_USAGE, f"{self.prog}: error: {text}; see {self.prog} --help\n")

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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mtls-guard",
        description="Fine-grained mutual-TLS policy for Apache APISIX (ext-plugin runner + tools).",
    )
    parser.add_argument("--version", action=_VersionAction)
    # Every subcommand parser is a OneLineParser; the registering functions only need an ArgumentParser.
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND", parser_class=OneLineParser),
    )
    _add_run(sub)
    try:
        from plugins.mtls_guard import commands
    except ImportError:  # the runner works without the bundled plugin's tools
        pass
    else:
        commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    return command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
