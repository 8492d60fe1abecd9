"""Exceptions of the runner and the single table that maps them to A6 error codes.

Every failure the runner reports to APISIX goes out as an RPC_ERROR (type 0) frame carrying one of
these codes; replying "no action" instead would let the request through unfiltered.
"""

from __future__ import annotations

from .protocol.codec import DecodeError
from .protocol.messages import ErrCode

__all__ = [
    "ConfTokenNotFound",
    "InvalidPluginConfig",
    "PluginFailure",
    "ProtocolViolation",
    "RunnerError",
    "StaleConf",
    "UnknownPlugin",
    "error_code_for",
]


class RunnerError(Exception):
    """Base class of the errors the runner turns into an Err reply."""

    code: ErrCode = ErrCode.SERVICE_UNAVAILABLE


class ConfTokenNotFound(RunnerError):
    """The token is unknown or expired: APISIX flushes its cache and re-sends PrepareConf."""

    code = ErrCode.CONF_TOKEN_NOT_FOUND

    def __init__(self, token: int) -> None:
        super().__init__(f"conf token {token} not found")
        self.token = token


class InvalidPluginConfig(RunnerError):
    """A plugin rejected its route config at PrepareConf; the route answers 503 until fixed."""

    code = ErrCode.BAD_REQUEST

    def __init__(self, plugin: str, index: int, reason: str) -> None:
        super().__init__(f"invalid config for plugin {plugin!r} (conf[{index}]): {reason}")
        self.plugin = plugin
        self.index = index
        self.reason = reason


class UnknownPlugin(InvalidPluginConfig):
    """PrepareConf named a plugin this runner does not have; skipping it would fail open."""

    def __init__(self, plugin: str, index: int, known: tuple[str, ...]) -> None:
        listed = ", ".join(known) or "none"
        super().__init__(plugin, index, f"no such plugin (registered: {listed})")


class StaleConf(RunnerError):
    """A conf token compiled before a reload no longer compiles against the reloaded plugin state.

    Not CONF_TOKEN_NOT_FOUND: APISIX would re-prepare the same conf on every call, to the same end.
    The token fails closed until APISIX prepares a changed conf, or a later reload makes it compile."""

    code = ErrCode.SERVICE_UNAVAILABLE

    def __init__(self, token: int, reason: InvalidPluginConfig) -> None:
        super().__init__(f"conf token {token} no longer compiles after a reload: {reason}")
        self.token = token


class PluginFailure(RunnerError):
    """A plugin raised, timed out or misbehaved while handling a call."""

    code = ErrCode.SERVICE_UNAVAILABLE


class ProtocolViolation(RunnerError):
    """The peer sent something the protocol does not allow at this point."""

    code = ErrCode.BAD_REQUEST


def error_code_for(exc: BaseException) -> ErrCode:
    """The A6 error code for any exception; unexpected ones are SERVICE_UNAVAILABLE (fail closed)."""
    if isinstance(exc, RunnerError):
        return exc.code
    if isinstance(exc, DecodeError):
        return ErrCode.BAD_REQUEST
    return ErrCode.SERVICE_UNAVAILABLE
