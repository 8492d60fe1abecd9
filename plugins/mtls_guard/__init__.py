"""mtls-guard: per-route mutual-TLS exemption and certificate identity policy for APISIX."""

from .plugin import MtlsGuard

# Entry point of the "apisix_mtls_guard.plugins" group (see pyproject.toml).
plugin = MtlsGuard

__all__ = ["MtlsGuard", "plugin"]
