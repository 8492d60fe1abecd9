"""Operator tools of mtls-guard, outside the request path: the ``check``/``explain``/``lint``/``demo``
commands and what they are built from (lint checks, inputs and findings, explain, development certificates).
"""
