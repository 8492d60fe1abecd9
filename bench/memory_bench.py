"""Resident memory of a runner worker under many distinct routes and client certificates.

Starts `mtls-guard run` (one worker, or --workers N) as APISIX would, then in rounds: PrepareConf for
10 000 new routes (each its own mtls-guard policy: distinct exemption regex and SPIFFE rule), one
request per route, then 10 000 requests with 10 000 new client certificates. After each round it
reads VmRSS of every worker from /proc. With the token table and the certificate cache bounded
(``max_conf_entries``, ``cert_cache_size``), later rounds must not grow memory much: old tokens and
certificates are evicted.

    .venv/bin/python -m bench.memory_bench [--routes 10000] [--certs 10000] [--rounds 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plugins.mtls_guard.tools.devcerts import CertFactory, escaped
from runner.testing import FakeApisix, conf

HOST = "api.example.test"
BASE_VARS = {"ssl_server_name": HOST}
# mtls-guard compares the SNI with the Host header the call carries (APISIX sends $upstream_host).
HOST_HEADER = (("host", HOST),)


def _policy(i: int) -> str:
    return json.dumps(
        {
            "exempt": [{"id": f"health-{i}", "path": f"/r{i}/health(z)?", "methods": ["GET"]}],
            "require": {"san": {"uri": [f"spiffe://example.test/ns/n{i}/sa/*"]}},
        }
    )


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _workers(supervisor: int, count: int) -> list[int]:
    if count == 1:
        return [supervisor]
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(supervisor)], capture_output=True, text=True, check=True)
    return [int(p) for p in out.stdout.split()]


async def _round(path: str, start: int, routes: int, certs: list[str], connections: int) -> tuple[int, int]:
    """Routes [start, start+routes) prepared and used once; then one request per certificate."""
    fakes = [FakeApisix(path, vars=BASE_VARS, timeout=30) for _ in range(connections)]

    async def routes_part(k: int) -> int:
        denied = 0
        for i in range(start + k, start + routes, connections):
            outcome = await fakes[k].request(
                conf(("mtls-guard", _policy(i))),
                key=f"route#{i}#ext-plugin-pre-req#1",
                path="/api",
                headers=HOST_HEADER,
                vars={"ssl_client_verify": "NONE"},
            )
            denied += outcome.client_status == 403
        return denied

    async def certs_part(k: int) -> int:
        allowed = 0
        route = start  # one route; the certificate is what varies
        for j in range(k, len(certs), connections):
            outcome = await fakes[k].request(
                conf(("mtls-guard", _policy(route))),
                key=f"route#{route}#ext-plugin-pre-req#1",
                path="/api",
                headers=HOST_HEADER,
                vars={"ssl_client_verify": "SUCCESS", "ssl_client_escaped_cert": certs[j]},
            )
            allowed += outcome.kind in ("pass", "rewrite")
        return allowed

    try:
        denied = sum(await asyncio.gather(*(routes_part(k) for k in range(connections))))
        allowed = sum(await asyncio.gather(*(certs_part(k) for k in range(connections))))
    finally:
        for fake in fakes:
            await fake.close()
    return denied, allowed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--certs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--max-conf-entries", type=int, default=10_000)
    parser.add_argument("--cert-cache-size", type=int, default=4096)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="mg-mem-", dir="/tmp")
    sock = os.path.join(workdir, "runner.sock")
    settings = Path(workdir, "runner.yaml")
    settings.write_text(
        f"workers: {args.workers}\nmax_conf_entries: {args.max_conf_entries}\n"
        f"plugins:\n  mtls-guard:\n    cert_cache_size: {args.cert_cache_size}\n"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "APISIX_LISTEN_ADDRESS": f"unix:{sock}"}
    binary = str(Path(sys.executable).parent / "mtls-guard")
    proc = subprocess.Popen([binary, "run", "--config", str(settings)], env=env)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("runner did not start")
            time.sleep(0.05)
        time.sleep(0.5)
        pids = _workers(proc.pid, args.workers)
        print(
            f"runner pid {proc.pid}, workers {pids}; max_conf_entries={args.max_conf_entries}, "
            f"cert_cache_size={args.cert_cache_size}, {args.connections} connections"
        )
        print(f"{'after':<32} {'RSS per worker (MiB)':<28} {'denied':>7} {'allowed':>8} {'seconds':>8}")
        print(f"{'start':<32} {', '.join(f'{_rss_kib(p) / 1024:.1f}' for p in pids):<28}")
        factory = CertFactory()
        ca = factory.ca("Bench CA")
        for r in range(args.rounds):
            started = time.monotonic()
            first = r * args.routes
            certs = [
                escaped(factory.leaf(ca, cn=f"c{first + j}", uris=[f"spiffe://example.test/ns/n{first}/sa/s{j}"]).pem)
                for j in range(args.certs)
            ]
            denied, allowed = asyncio.run(_round(sock, first, args.routes, certs, args.connections))
            label = f"round {r + 1}: +{args.routes} routes, +{args.certs} certs"
            rss = ", ".join(f"{_rss_kib(p) / 1024:.1f}" for p in pids)
            print(f"{label:<32} {rss:<28} {denied:>7} {allowed:>8} {time.monotonic() - started:>8.1f}")
            if (denied, allowed) != (args.routes, args.certs):
                # Memory of a runner that answers wrongly measures nothing: stop loudly.
                raise SystemExit(f"expected {args.routes} denied and {args.certs} allowed requests")
    finally:
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        print(f"SIGTERM -> exit {code} in {time.monotonic() - stopping:.2f}s (APISIX kills after 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
