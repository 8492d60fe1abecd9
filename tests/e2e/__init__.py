"""End-to-end tests: a real nginx terminates TLS, a bridge plays APISIX's ext-plugin, a real runner decides."""
