"""Throughput and latency benchmarks of the runner against a minimal "floor" server.

Run everything with ``scripts/bench`` (or ``python -m bench --help`` for options). Modules:
``scenarios`` (what is measured), ``floor`` (pre-built-bytes server), ``servers`` (pinned server
processes), ``loadgen`` (APISIX-like load generator), ``run`` (driver and report).
``codec_bench`` and ``policy_bench`` are separate micro-benchmarks run as scripts.
"""
