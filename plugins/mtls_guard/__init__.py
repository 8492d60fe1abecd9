"""The mtls-guard plugin (placeholder until the adapter lands)."""
