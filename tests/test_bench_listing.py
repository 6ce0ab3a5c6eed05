"""bench/listing.py runs end to end at a tiny size against the suite's server and prints its
table (its figures are not asserted: benchmarks never fail on speed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_listing_prints_every_operation_and_its_ratio(mongo_uri: str) -> None:
    run = subprocess.run(
        [sys.executable, "bench/listing.py", "--sizes", "60", "--repeats", "1"],
        cwd=ROOT,
        env={**os.environ, "MONGODB_URI": mongo_uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("server: MONGODB_URI"), run.stdout
    for operation in (
        "plain find",
        "scan",
        "page, whole docs",
        "page, projected",
        "filtered, projected",
        "20 by id: equalities",
        "20 by id: dialect",
    ):
        row = next((line for line in lines if line.startswith(operation)), None)
        assert row is not None and " ms (" in row and "x)" in row, run.stdout
    assert any(line.startswith("at 60: projected page / whole-document page") for line in lines)
    assert lines[-1].startswith("load average:"), run.stdout
