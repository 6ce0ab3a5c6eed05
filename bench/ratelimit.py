"""Rate limiter benchmark: what a request pays for one budget across `rxledger serve` workers.

Measures `check(key)` per call, over KEYS distinct keys taken in turn, for:
  in-process  app.limits.RateLimiter, the buckets in this process's memory (the baseline:
              what one worker, or `--workers 1`, pays)
  shared      app.limits.SharedRateLimiter, the buckets in a server state file under /dev/shm
              (what each of N workers pays: a hash, a record lock and unlock, one bucket read
              and written)
  contended   the shared limiter in PROCESSES processes at once on the same keys (each
              figure is per call in one process, while the others run)
ROUNDS rounds of CHECKS calls each, alternating in-process and shared; prints the median of
the rounds per variant, the ratios to the in-process median and the load average. Not a
test: slow figures never fail the run.

    .venv/bin/python bench/ratelimit.py [--checks 200000] [--rounds 5] [--keys 1000] [--processes 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Not bench/ first on the path: bench/graphql.py would hide the graphql package.
sys.path[0] = str(ROOT)

from app.limits import RateLimiter, SharedRateLimiter  # noqa: E402
from app.workers import ServerState  # noqa: E402


def per_call_us(limiter: RateLimiter, keys: list[str], checks: int) -> float:
    """Microseconds per check() over `checks` calls cycling through `keys`."""
    count = len(keys)
    start = time.perf_counter()
    for i in range(checks):
        limiter.check(keys[i % count])
    return (time.perf_counter() - start) / checks * 1e6


def limiter_args(checks: int) -> tuple[float, int]:
    """A rate and burst that never refuse within the run: every call does the full work."""
    return 1e9, 2 * checks


def contended(state: Path, keys: int, checks: int, processes: int) -> list[float]:
    """Per-call microseconds in each of `processes` processes hammering one state file."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from app.limits import SharedRateLimiter\n"
        "from app.workers import ServerState\n"
        "checks, count = int(sys.argv[2]), int(sys.argv[3])\n"
        "lim = SharedRateLimiter(ServerState.attach(Path(sys.argv[1])), 1e9, 2 * checks)\n"
        "keys = [f'PARTNER:partner-{i}' for i in range(count)]\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "start = time.perf_counter()\n"
        "for i in range(checks): lim.check(keys[i % count])\n"
        "print((time.perf_counter() - start) / checks * 1e6, flush=True)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(state), str(checks), str(keys)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return [float(proc.communicate(timeout=600)[0]) for proc in procs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="rxledger-bench-", dir=base) as directory:
        state = ServerState.create(Path(directory) / "state", worker_slots=4)
        keys = [f"PARTNER:partner-{i}" for i in range(args.keys)]
        local: list[float] = []
        shared: list[float] = []
        for _ in range(args.rounds):
            local.append(per_call_us(RateLimiter(*limiter_args(args.checks)), keys, args.checks))
            limiter = SharedRateLimiter(state, *limiter_args(args.checks))
            shared.append(per_call_us(limiter, keys, args.checks))
        crowd = contended(state.path, args.keys, args.checks, args.processes)
        state.close()
    base_us = statistics.median(local)
    print(f"in-process  {base_us:8.2f} µs per check (median of {args.rounds})")
    print(
        f"shared      {statistics.median(shared):8.2f} µs  ratio {statistics.median(shared) / base_us:.2f}"
    )
    print(
        f"contended   {statistics.median(crowd):8.2f} µs  ratio "
        f"{statistics.median(crowd) / base_us:.2f}  ({args.processes} processes at once)"
    )
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
