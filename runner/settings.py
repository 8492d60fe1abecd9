"""Runner settings: built from CLI options, APISIX's environment and an optional YAML file,
validated completely before anything binds (precedence: CLI > environment > file > defaults)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from .httpd import parse_host_port
from .process.cpus import usable_cpus
from .protocol.messages import MAX_PAYLOAD

__all__ = ["Settings", "SettingsError", "SettingsSource", "load_settings", "parse_listen_address", "path_options"]

LogLevel = Literal["debug", "info", "warning", "error"]
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOOPS = ("auto", "asyncio", "uvloop")
# APISIX keeps pooled runner connections for 180 s; closing earlier only costs reconnects.
_APISIX_KEEPALIVE = 180.0
# APISIX reads a reply for at most 60 s; a cut-off must reach it before that.
_APISIX_READ_TIMEOUT = 60.0
# APISIX sends SIGKILL 1 s after SIGTERM.
_APISIX_KILL_DELAY = 1.0


class SettingsError(ValueError):
    """A setting is missing or wrong; the message is one line an operator can act on."""


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str
    """Absolute path of the Unix socket to serve."""
    conf_expire_time: int = 3600
    token_ttl: float = 4320.0
    max_conf_entries: int = 50_000
    call_timeout: float = 10.0
    drain_timeout: float = 0.5
    idle_timeout: float = 600.0
    socket_mode: int = 0o766
    max_frame_bytes: int = MAX_PAYLOAD
    log_level: LogLevel = "warning"
    log_file: str | None = None
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    workers: int = field(default_factory=usable_cpus)
    """Worker processes sharing the socket (1 = no supervisor process); never more than usable CPUs."""
    metrics_addr: str | None = None
    """HOST:PORT serving /metrics, /healthz and /readyz (opt-in)."""
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per-plugin options; relative paths in ``*_file(s)``/``*_dir(s)`` options are already resolved."""
    reload_watch_seconds: float = 0.0
    """Poll the config file and path-valued plugin options this often and reload on a change (0 = off;
    SIGHUP always reloads)."""
    replace: bool = False
    """Take the socket over even while another runner serves it (``--replace``; implied when the socket
    comes from APISIX_LISTEN_ADDRESS, see ``load_settings``). Not a file key: it is a decision about
    this one start, not configuration."""

    def __post_init__(self) -> None:
        _check(os.path.isabs(self.listen), f"listen: socket path {self.listen!r} must be absolute")
        _check("\x00" not in self.listen, "listen: socket path contains NUL")
        _check(len(os.fsencode(self.listen)) < 108, f"listen: socket path too long for AF_UNIX ({self.listen!r})")
        _check(self.conf_expire_time > 0, "APISIX_CONF_EXPIRE_TIME must be a positive integer")
        _check(
            self.token_ttl >= 1.2 * self.conf_expire_time,
            f"token_ttl {self.token_ttl:g}s must be >= 1.2 x APISIX_CONF_EXPIRE_TIME "
            f"({1.2 * self.conf_expire_time:g}s), or APISIX would use tokens the runner forgot",
        )
        _check(self.max_conf_entries >= 1, "max_conf_entries must be >= 1")
        _check(
            0 < self.call_timeout < _APISIX_READ_TIMEOUT - 4,
            f"call_timeout must be in (0, {_APISIX_READ_TIMEOUT - 4:g}) seconds (APISIX gives up after 60 s)",
        )
        _check(
            0 <= self.drain_timeout <= _APISIX_KILL_DELAY - 0.2,
            "drain_timeout must be in [0, 0.8] seconds (APISIX kills the runner 1 s after SIGTERM)",
        )
        _check(
            self.idle_timeout == 0 or self.idle_timeout >= _APISIX_KEEPALIVE,
            "idle_timeout must be 0 (never) or >= 180 s (APISIX keeps pooled connections 180 s)",
        )
        _check(0 <= self.socket_mode <= 0o777, "socket_mode must be an octal mode such as 0o766 or 0o760")
        _check(1024 <= self.max_frame_bytes <= MAX_PAYLOAD, f"max_frame_bytes must be in [1024, {MAX_PAYLOAD}]")
        _check(self.log_level in _LOG_LEVELS, f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        _check(self.event_loop in _LOOPS, f"event_loop must be one of {', '.join(_LOOPS)}")
        _check(1 <= self.workers <= 64, "workers must be in [1, 64]")
        _check(isinstance(self.replace, bool), "replace must be true or false")
        _check(
            self.reload_watch_seconds == 0 or 0.1 <= self.reload_watch_seconds <= 3600,
            "reload_watch_seconds must be 0 (off) or in [0.1, 3600]",
        )
        if self.metrics_addr is not None:
            try:
                parse_host_port(self.metrics_addr)
            except ValueError as exc:
                raise SettingsError(f"metrics_addr: {exc}") from None
        for name, options in self.plugins.items():
            _check(isinstance(options, Mapping), f"plugins.{name} must be a mapping")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SettingsError(message)


def parse_listen_address(value: str) -> str:
    """``unix:/path`` (APISIX_LISTEN_ADDRESS form) or a bare path -> absolute path."""
    path = value.removeprefix("unix:")
    if not path:
        raise SettingsError(f"listen address {value!r} has no path")
    if ":" in value and not value.startswith("unix:") and not value.startswith("/"):
        raise SettingsError(f"listen address {value!r}: only unix:<path> is supported")
    return os.path.abspath(path)


_FILE_KEYS = {f.name for f in fields(Settings)} - {"replace"}
# Plugin options whose relative values are paths (see Plugin.setup): the plural forms hold lists.
_PATH_SUFFIXES = ("_file", "_dir")
_PATHS_SUFFIXES = ("_files", "_dirs")


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise SettingsError(f"config file {path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: top level must be a mapping")
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise SettingsError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    return _resolve_paths(data, os.path.dirname(os.path.abspath(path)))


def _resolve_paths(data: dict[str, Any], base: str) -> dict[str, Any]:
    """Relative paths written in the file mean "next to this file", not "wherever the runner was
    started": a runner spawned by APISIX inherits nginx's working directory, a sidecar its image's.
    Applies to ``listen`` and ``log_file`` and to plugin options named ``*_file(s)``/``*_dir(s)``;
    values of the wrong type are left for validation to report."""

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value and not os.path.isabs(value):
            return os.path.join(base, value)
        return value

    out = dict(data)
    listen = out.get("listen")
    if isinstance(listen, str) and (listen.startswith("unix:") or ":" not in listen):  # not "tcp:…": refused later
        scheme = "unix:" if listen.startswith("unix:") else ""
        out["listen"] = scheme + resolve(listen.removeprefix("unix:"))
    if "log_file" in out:
        out["log_file"] = resolve(out["log_file"])
    plugins = out.get("plugins")
    if isinstance(plugins, Mapping):
        out["plugins"] = {
            name: _resolve_plugin_paths(options, resolve) if isinstance(options, Mapping) else options
            for name, options in plugins.items()
        }
    return out


def path_options(plugins: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every path a plugin option names (``*_file(s)``/``*_dir(s)``, as resolved above), in order."""
    paths: list[str] = []
    for options in plugins.values():
        for key, value in options.items():
            if not isinstance(key, str):
                continue
            if key.endswith(_PATH_SUFFIXES) and isinstance(value, str) and value:
                paths.append(value)
            elif key.endswith(_PATHS_SUFFIXES) and isinstance(value, list):
                paths.extend(item for item in value if isinstance(item, str) and item)
    return paths


def _resolve_plugin_paths(options: Mapping[str, Any], resolve: Callable[[Any], Any]) -> dict[str, Any]:
    out = dict(options)
    for key, value in options.items():
        if not isinstance(key, str):
            continue
        if key.endswith(_PATH_SUFFIXES):
            out[key] = resolve(value)
        elif key.endswith(_PATHS_SUFFIXES) and isinstance(value, list):
            out[key] = [resolve(item) for item in value]
    return out


_NUMBER_TYPES: dict[str, type] = {
    "workers": int,
    "conf_expire_time": int,
    "max_conf_entries": int,
    "max_frame_bytes": int,
    "socket_mode": int,
    "token_ttl": float,
    "call_timeout": float,
    "drain_timeout": float,
    "idle_timeout": float,
    "reload_watch_seconds": float,
}


def _coerce(name: str, value: Any) -> Any:
    kind = _NUMBER_TYPES.get(name)
    if kind is None:
        if name in ("listen", "log_level", "event_loop", "metrics_addr") and not isinstance(value, str):
            raise SettingsError(f"{name} must be a string")
        if name == "log_file" and value is not None and not isinstance(value, str):
            raise SettingsError("log_file must be a path")
        if name == "plugins" and not isinstance(value, Mapping):
            raise SettingsError("plugins must map plugin names to their options")
        return value
    if isinstance(value, bool):
        raise SettingsError(f"{name} must be a number")
    if name == "socket_mode" and isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise SettingsError(f"socket_mode {value!r} is not an octal mode") from None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise SettingsError(f"{name} must be finite")
    if kind is int and isinstance(value, float) and value != number:
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    return number


def load_settings(
    *,
    environ: Mapping[str, str],
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge file < environment < CLI overrides and validate; raises SettingsError.

    A socket named by APISIX_LISTEN_ADDRESS (and not overridden by ``--listen``) implies
    ``replace``: that variable is how APISIX hands the runner its socket, and on ``apisix reload``
    (nginx HUP) APISIX's new privileged agent spawns the new runner for the same path
    (``conf/apisix-<master pid>.sock``: the master keeps its pid) while the old agent is still
    shutting down and has not yet sent its runner SIGTERM (``exit_worker``). Refusing there would
    leave the socket to a runner about to exit. (apache/apisix ``apisix/plugins/ext-plugin/init.lua``
    ``init_worker``/``exit_worker``/``spawn_proc``, ``helper.lua`` ``get_path``.)"""
    values: dict[str, Any] = _read_file(config_file) if config_file else {}
    overrides = overrides or {}
    if "APISIX_LISTEN_ADDRESS" in environ:
        values["listen"] = environ["APISIX_LISTEN_ADDRESS"]
        if overrides.get("listen") is None:
            values["replace"] = True
    if "APISIX_CONF_EXPIRE_TIME" in environ:
        raw = environ["APISIX_CONF_EXPIRE_TIME"].strip()
        if not (raw.isascii() and raw.isdigit()):  # str.isdigit() also accepts "²", which int() refuses
            raise SettingsError(f"APISIX_CONF_EXPIRE_TIME={raw!r} is not a positive integer")
        values["conf_expire_time"] = int(raw)
    values.update({key: value for key, value in overrides.items() if value is not None})
    if "listen" not in values:
        raise SettingsError("no socket to listen on: set APISIX_LISTEN_ADDRESS=unix:/path or pass --listen")
    values = {k: _coerce(k, v) for k, v in values.items()}
    values["listen"] = parse_listen_address(values["listen"])
    directory = os.path.dirname(values["listen"])
    if not os.path.isdir(directory):  # caught here, with the other settings, not later at bind()
        raise SettingsError(f"listen: socket directory {directory} does not exist")
    if "token_ttl" not in values:
        values["token_ttl"] = 1.2 * values.get("conf_expire_time", 3600)
    try:
        return Settings(**values)
    except TypeError as exc:  # a wrong type slipped through: still one clear line
        raise SettingsError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class SettingsSource:
    """Where the settings came from at start-up, so that a reload (runner.reload) reads them the same
    way: the config file again, under the same environment and command-line overrides, which keep
    their precedence over the file."""

    environ: Mapping[str, str]
    config_file: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Settings:
        return load_settings(environ=self.environ, config_file=self.config_file, overrides=self.overrides)


def with_listen(settings: Settings, path: str) -> Settings:
    return replace(settings, listen=path)
