"""Smoke tests for the benchmarks in bench/: each runs as a subprocess at tiny sizes against the
suite's server (MONGODB_URI), within a deadline, exits 0, prints its figures and ratios (parsed
here), and leaves no database of its own behind. The figures themselves are never asserted:
benchmarks are not pass/fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 240.0  # seconds a tiny run may take on a loaded 2-core machine
NUMBER = r"-?[\d,]+(?:\.\d+)?"


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.fixture
def server(mongo_uri: str) -> Iterator[MongoClient[dict[str, Any]]]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    yield client
    client.close()


def bench_databases(client: MongoClient[dict[str, Any]]) -> set[str]:
    return {name for name in client.list_database_names() if name.startswith("bench")}


def run_bench(
    script: str, args: list[str], mongo_uri: str, client: MongoClient[dict[str, Any]]
) -> str:
    """Run bench/SCRIPT with `args` against the suite's server; its stdout. Fails on a non-zero
    exit, on the deadline, or when it leaves a database behind."""
    before = bench_databases(client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RXLEDGER_")}
    env["MONGODB_URI"] = mongo_uri
    try:
        done = subprocess.run(
            [sys.executable, f"bench/{script}", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench/{script} ran past its {DEADLINE:g} s deadline:\n{exc.stderr}")
    assert done.returncode == 0, (
        f"bench/{script} exited {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
        f"stderr:\n{done.stderr[-3000:]}"
    )
    left = bench_databases(client) - before
    assert not left, f"bench/{script} left its databases behind: {sorted(left)}"
    return done.stdout


def parsed(pattern: str, out: str) -> list[tuple[str, ...]]:
    found = re.findall(pattern, out, re.MULTILINE)
    assert found, f"no line matching {pattern!r} in:\n{out}"
    return [f if isinstance(f, tuple) else (f,) for f in found]


def named(kind: str, out: str) -> dict[str, float]:
    """The `kind: NAME = VALUE` lines (figure, ratio) as a dict."""
    found = parsed(rf"^{kind}: (\S+) = ({NUMBER}|nan)", out)
    return {name: float("nan") if value == "nan" else number(value) for name, value in found}


def targets(out: str) -> dict[str, str]:
    return dict(parsed(r"^target: (.+): (met|NOT MET)", out))


def test_graphql_bench_prints_rates_and_ratios_at_tiny_size(mongo_uri, server):
    out = run_bench(
        "graphql.py",
        ["--issue-count", "4", "--duration", "0.5", "--warmup", "0", "--clients", "2"],
        mongo_uri,
        server,
    )
    rows = parsed(
        rf"^(issuePrescription|dispensePrescription|mutations, both kinds|prescription\(id\)) "
        rf".*?/s.*?\s({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+gw/bl >= [\d.]+\s+(met|NOT MET)$",
        out,
    )
    assert {r[0] for r in rows} == {
        "issuePrescription",
        "dispensePrescription",
        "mutations, both kinds",
        "prescription(id)",
    }
    for _, gateway, baseline, ratio, _ in rows:
        assert number(gateway) > 0 and number(baseline) > 0
        assert number(ratio) == pytest.approx(number(gateway) / number(baseline), rel=0.1, abs=0.02)
    assert "errors:   none" in out


def test_subscriptions_bench_prints_memory_latency_and_targets_at_tiny_size(mongo_uri, server):
    out = run_bench(
        "subscriptions.py",
        (
            "--subscribers 3 --clients 1 --writers 2 --events 3 --paced-seconds 1 --rate 2 "
            "--settle 0.2 --timeout 60"
        ).split(),
        mongo_uri,
        server,
    )
    parsed(rf"^\s+3 idle subscribers, the same sockets\s+{NUMBER}\s+{NUMBER}", out)
    ratios = parsed(rf"^\s+3:1\s+({NUMBER})x\s+({NUMBER})x", out)
    assert len(ratios) == 2  # closed loop and paced
    p99 = parsed(
        rf"delivery p99 at 3 subscribers, (closed loop|paced).*?: ({NUMBER}) ms; "
        r"target <= 500 ms: (met|NOT MET)",
        out,
    )
    assert {kind for kind, _, _ in p99} == {"closed loop", "paced"}
    assert out.count("exactly once, in leafIndex order") == 4
    assert "load average" in out


def test_tiles_bench_prints_serving_audit_and_proof_ratios_at_tiny_size(mongo_uri, server):
    out = run_bench(
        "tiles.py",
        (
            "--entries 256 --clients 2 --duration 0.5 --warmup 0 --repeat 1 --proofs 3 "
            "--appenders 4"
        ).split(),
        mongo_uri,
        server,
    )
    assert "rxledger auditor paths, N = 256 entries" in out
    summary = out[out.index("\nSummary\n") :]
    serving = parsed(rf"^\s+GET /log/\S+.*?\s({NUMBER}) req/s\s+({NUMBER})x hz$", summary)
    assert len(serving) >= 3 and all(number(rate) > 0 for rate, _ in serving)
    assert parsed(rf"^\s+audit .*?({NUMBER}) s, ({NUMBER})/s\s+({NUMBER})x db$", summary)
    assert parsed(rf"^\s+proof: .*?({NUMBER}) ms\s+({NUMBER})x gql$", summary)
    assert "load average" in out and "errors: none" in out


def test_ferretdb_index_bench_prints_lookup_ratios_at_tiny_size(mongo_uri, server):
    out = run_bench("ferretdb_index.py", ["--sizes", "50,100", "--lookups", "3"], mongo_uri, server)
    rows = parsed(
        rf"^(find_one str|find_one int|update_one int)\s+({NUMBER}) ms \(\s*({NUMBER})x\)"
        rf"\s+({NUMBER}) ms \(\s*({NUMBER})x\)$",
        out,
    )
    assert {r[0] for r in rows} == {"find_one str", "find_one int", "update_one int"}
    for _, small, one, large, ratio in rows:
        assert number(one) == 1.0
        assert number(ratio) == pytest.approx(number(large) / number(small), rel=0.1, abs=0.06)
    assert "load average" in out


def test_hospital_bench_prints_figures_ratios_and_targets_at_tiny_sizes(mongo_uri, server):
    out = run_bench(
        "hospital.py",
        (
            "--sizes 12,24 --duration 0.5 --warmup 0 --clients 2 --preload-concurrency 4 "
            "--timeout 60"
        ).split(),
        mongo_uri,
        server,
    )
    figures, ratios = named("figure", out), named("ratio", out)
    for size in (12, 24):
        assert figures[f"preload_rate_{size}"] > 0
        assert figures[f"read_rate_{size}"] > 0 and figures[f"baseline_read_rate_{size}"] > 0
        assert figures[f"read_p99_ms_{size}"] >= figures[f"read_p50_ms_{size}"] > 0
        assert figures[f"open_rate_{size}"] == pytest.approx(
            figures[f"baseline_read_rate_{size}"] / 2, rel=0.01
        )
        assert figures[f"open_p99_ms_{size}"] > 0
        assert ratios[f"read_vs_baseline_{size}"] == pytest.approx(
            figures[f"read_rate_{size}"] / figures[f"baseline_read_rate_{size}"], rel=0.01
        )
        assert ratios[f"mutations_vs_baseline_{size}"] > 0
        assert ratios[f"dispense_vs_baseline_{size}"] > 0
        assert ratios[f"issue_vs_baseline_{size}"] > 0
    assert ratios["read_p50_24_vs_12"] == pytest.approx(
        figures["read_p50_ms_24"] / figures["read_p50_ms_12"], rel=0.01
    )
    assert len(targets(out)) == 2 + 5 * 2
    assert figures["load_average"] >= 0
    assert "errors: none" in out


def test_proofs_bench_prints_rates_ratios_and_targets_at_tiny_sizes(mongo_uri, server):
    out = run_bench(
        "proofs.py",
        ["--sizes", "300,600", "--duration", "0.3", "--concurrency", "2"],
        mongo_uri,
        server,
    )
    figures, ratios = named("figure", out), named("ratio", out)
    for size in (300, 600):
        assert figures[f"proofs_per_s_{size}"] > 0
        assert figures[f"baseline_reads_per_s_{size}"] > 0
        assert ratios[f"proofs_vs_baseline_reads_{size}"] == pytest.approx(
            figures[f"proofs_per_s_{size}"] / figures[f"baseline_reads_per_s_{size}"], rel=0.01
        )
    assert ratios["proofs_300_vs_600"] == pytest.approx(
        figures["proofs_per_s_300"] / figures["proofs_per_s_600"], rel=0.01
    )
    assert set(targets(out)) == {
        "proofs/s >= 2,000 at 600 leaves",
        "proof rate at 600 within 1.5x of 300",
    }
    assert "errors: none" in out


def test_leaf_index_bench_prints_both_reads_and_their_ratio_at_tiny_size(mongo_uri, server):
    out = run_bench(
        "leaf_index.py", ["--size", "300", "--events", "5", "--rounds", "2"], mongo_uri, server
    )
    figures, ratios = named("figure", out), named("ratio", out)
    assert figures["baseline_ms"] > 0 and figures["positions_ms"] > 0
    assert ratios["baseline_vs_positions"] == pytest.approx(
        figures["baseline_ms"] / figures["positions_ms"], rel=0.01
    )
    assert figures["load_average"] >= 0
    assert "errors: none" in out


def test_subject_events_bench_prints_both_reads_and_their_ratio_at_tiny_sizes(mongo_uri, server):
    out = run_bench("subject_events.py", ["--sizes", "10,20", "--reads", "2"], mongo_uri, server)
    rows = parsed(
        rf"^\s+(\d+)\s+(\d+)\s+({NUMBER}) ms\s+({NUMBER}) ms\s+({NUMBER})x$",
        out,
    )
    assert [(r[0], r[1]) for r in rows] == [("10", "20"), ("20", "40")]
    for _, _, by_id, by_subject, ratio in rows:
        assert number(ratio) == pytest.approx(number(by_subject) / number(by_id), rel=0.1, abs=0.06)
    assert "load average" in out


def test_webhooks_bench_prints_latencies_against_the_subscription_at_tiny_size(mongo_uri, server):
    out = run_bench(
        "webhooks.py",
        "--endpoints 2 --events 4 --writers 2 --rate 20 --timeout 120".split(),
        mongo_uri,
        server,
    )
    figures = named("figure", out)
    ratios = named("ratio", out)
    for phase in ("closed", "paced"):
        assert figures[f"{phase}_webhook_deliveries_per_s"] > 0
        assert ratios[f"{phase}_webhook_p99/subscription_p99"] == pytest.approx(
            figures[f"{phase}_webhook_p99_ms"] / figures[f"{phase}_subscription_p99_ms"], rel=0.05
        )
    assert "webhook p99 within 2x of the subscription's (paced)" in targets(out)
    assert "violations: 0" in out
