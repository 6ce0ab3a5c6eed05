"""Smoke tests of bench/ledger.py at tiny sizes: it finishes within its deadline, exits 0 and
prints its figures, Tessera's and the ratio; it cannot hang (past its deadline it exits
non-zero, saying so) and a crash in a publish callback fails the run with the traceback instead
of leaving the sequencer to retry forever. It runs against this session's server (MONGODB_URI)
and builds the Tessera baseline (bench/tessera, through the Go module proxy the first time,
cached in var/bin)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from pymongo import AsyncMongoClient

from anchoring.note import Signer

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "ledger.py"


def run_bench(mongo_uri: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        env={**os.environ, "MONGODB_URI": mongo_uri},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ledger", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ledger_bench_finishes_and_prints_its_figures_against_tessera(mongo_uri: str) -> None:
    if shutil.which("go") is None:
        pytest.fail("the Go toolchain is not on PATH: bench/ledger.py builds bench/tessera")
    # fmt: off
    run = run_bench(
        mongo_uri,
        "--events", "64", "--appenders", "4,8", "--sizes", "40", "--proof-seconds", "0.2",
        "--deadline", "200",
        timeout=260,
    )
    # fmt: on
    out = run.stdout
    assert run.returncode == 0, f"exit {run.returncode}\n{out}\n{run.stderr}"
    for appenders in (4, 8):
        assert re.search(
            rf"rxledger: 64 events by {appenders} appenders: acknowledged [\d,]+/s, "
            r"sequenced [\d,]+/s",
            out,
        ), out
        assert re.search(
            rf"ceiling: 64 entries by {appenders} appenders, batched as Tessera batches, one "
            r"insert_many per batch: acknowledged [\d,]+/s, .*write commands per 1,000 entries \d+",
            out,
        ), out
        assert re.search(
            rf"tessera: 64 entries by {appenders} appenders: integrated [\d,]+/s, "
            r"latency p50 [\d.]+ ms, p99 [\d.]+ ms",
            out,
        ), out
    delays = r"merge delay \(ack -> published\): p50 [\d.]+ ms, p99 [\d.]+ ms"
    assert len(re.findall(delays, out)) == 2, out
    assert len(re.findall(r"ratio sequenced/tessera: [\d.]+x", out)) == 2, out
    assert len(re.findall(r"ratio sequenced/ceiling: [\d.]+x", out)) == 2, out
    assert len(re.findall(r"ratio ceiling/tessera: [\d.]+x", out)) == 2, out
    assert len(re.findall(r"write commands per 1,000 events \d+", out)) == 2, out
    assert re.search(r"proofs at 40 leaves: [\d,.]+/s from storage", out), out
    assert re.search(r"load average: [\d.]+ [\d.]+ [\d.]+", out), out


def test_ledger_bench_stops_at_its_deadline(mongo_uri: str) -> None:
    # fmt: off
    run = run_bench(
        mongo_uri,
        "--events", "100000", "--appenders", "64", "--sizes", "", "--no-tessera",
        "--deadline", "3",
        timeout=60,
    )
    # fmt: on
    assert run.returncode == 2, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert "deadline of 3 s passed" in run.stderr, run.stderr


async def test_a_crashing_publish_callback_fails_the_run_with_its_traceback(
    client: AsyncMongoClient[dict], signer: Signer
) -> None:
    bench = bench_module()

    def crash(size: int, root: bytes, entries: list[dict]) -> None:
        raise ZeroDivisionError("a callback bug")

    started = time.monotonic()
    with pytest.raises(bench.CallbackFailed) as failed:
        await asyncio.wait_for(
            bench.bench_append(client, signer, 16, 2, extra_callbacks=[crash]), 60
        )
    assert time.monotonic() - started < 30
    assert "ZeroDivisionError: a callback bug" in str(failed.value)
    assert "in crash" in str(failed.value)  # the traceback names the callback
