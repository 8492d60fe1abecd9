"""A fail-closed Python plugin runner for Apache APISIX's ext-plugin protocol."""

from .errors import ConfTokenNotFound, InvalidPluginConfig, PluginFailure, RunnerError
from .plugin import BasePlugin, Headers, HTTPRequest, HTTPResponse, Plugin, Reconfigurable
from .protocol.messages import Rewrite, Stop
from .registry import ENTRY_POINT_GROUP, PluginRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "BasePlugin",
    "ConfTokenNotFound",
    "HTTPRequest",
    "HTTPResponse",
    "Headers",
    "InvalidPluginConfig",
    "Plugin",
    "PluginFailure",
    "PluginRegistry",
    "Reconfigurable",
    "Rewrite",
    "RunnerError",
    "Stop",
]
