"""Run every fuzz target for a bounded time (CI), or replay inputs through the harness.

    python -m fuzz [SECONDS] [--targets codec,session,policy]   # default: $FUZZ_SECONDS or 20 per target
    python -m fuzz replay TARGET FILE...                        # re-run inputs, print the failure

Each target runs in its own libFuzzer process over a scratch copy of its seed corpus
(``fuzz/corpus/<target>``) plus the regression inputs (``tests/fuzz/crashes/<target>``); the committed
corpus is never modified. No network is used. The exit status is non-zero if any target found a crash,
a timeout or an out-of-memory input; the reproducer's path is printed, and it stays in the artifact
directory ($FUZZ_ARTIFACTS, default a fresh directory under the system temp dir).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
CRASHES = ROOT / "tests" / "fuzz" / "crashes"
TARGETS = ("codec", "session", "policy")
# libFuzzer's -max_len per target: long enough for multi-frame conversations, short enough to stay fast.
MAX_LEN = {"codec": 16384, "session": 16384, "policy": 8192}
DEFAULT_SECONDS = 20
_STATS = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+ .*?exec/s: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    target: str
    returncode: int
    seconds: float
    stats: str
    artifacts: list[Path]
    log: Path


def _fuzz_one(target: str, seconds: int, work: Path, artifacts: Path) -> Result:
    corpus = work / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = [str(d) for d in (CORPUS / target, CRASHES / target) if d.is_dir()]
    log = work / f"{target}.log"
    command = [
        sys.executable,
        "-m",
        f"fuzz.fuzz_{target}",
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN[target]}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/{target}-",
        str(corpus),
        *seeds,
    ]
    started = time.monotonic()
    with log.open("wb") as out:
        # A hard stop well past -max_total_time, in case libFuzzer itself wedges.
        try:
            completed = subprocess.run(  # noqa: S603 - our own interpreter and module, fixed arguments
                command, check=False, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 60
            )
            returncode = completed.returncode
        except subprocess.TimeoutExpired:
            returncode = -1
    text = log.read_text("utf-8", "replace")
    match = _STATS.findall(text)
    stats = "no stats"
    if match:
        runs, cov, ft, corp, rate = match[-1]
        stats = f"{int(runs):,} runs, {rate} exec/s, cov {cov}, ft {ft}, corpus {corp}"
    found = [Path(p) for p in _ARTIFACT.findall(text)]
    return Result(target, returncode, time.monotonic() - started, stats, found, log)


def run(seconds: int, targets: list[str]) -> int:
    work = Path(tempfile.mkdtemp(prefix="mtls-guard-fuzz-"))
    artifacts = Path(os.environ.get("FUZZ_ARTIFACTS") or work / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    failed = False
    for target in targets:
        result = _fuzz_one(target, seconds, work, artifacts)
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"fuzz {target}: {status} in {result.seconds:.0f}s: {result.stats}", flush=True)
        if result.returncode != 0:
            failed = True
            tail = result.log.read_text("utf-8", "replace").splitlines()
            start = next((i for i, line in enumerate(tail) if "Uncaught Python exception" in line), len(tail) - 30)
            print("\n".join(tail[max(start - 1, 0) : start + 40]), file=sys.stderr)
            for path in result.artifacts or [Path("<none written; see the log>")]:
                print(f"reproducer: {path}", file=sys.stderr)
                print(f"  replay:  python -m fuzz replay {target} {path}", file=sys.stderr)
                print(f"  keep it: cp {path} tests/fuzz/crashes/{target}/", file=sys.stderr)
            print(f"full log: {result.log}", file=sys.stderr)
    if not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def replay(target: str, files: list[str]) -> int:
    from fuzz import harness

    check = harness.TARGETS[target]
    status = 0
    for name in files:
        try:
            check(Path(name).read_bytes())
        except Exception:  # noqa: BLE001 - report any failure of the harness, like the fuzzer would
            status = 1
            print(f"{name}: FAILED", file=sys.stderr)
            traceback.print_exc()
        else:
            print(f"{name}: ok")
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["replay"]:
        parser = argparse.ArgumentParser(prog="python -m fuzz replay")
        parser.add_argument("target", choices=TARGETS)
        parser.add_argument("files", nargs="+")
        args = parser.parse_args(argv[1:])
        return replay(args.target, args.files)
    parser = argparse.ArgumentParser(prog="python -m fuzz", description="Run every fuzz target for a bounded time.")
    parser.add_argument(
        "seconds", nargs="?", type=int, default=int(os.environ.get("FUZZ_SECONDS", DEFAULT_SECONDS)), help="per target"
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown or args.seconds < 1:
        parser.error(f"unknown targets {sorted(unknown)}" if unknown else "seconds must be >= 1")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install atheris (CPython 3.11 x86_64 wheels exist)", file=sys.stderr)
        return 2
    return run(args.seconds, targets)


if __name__ == "__main__":
    sys.exit(main())
