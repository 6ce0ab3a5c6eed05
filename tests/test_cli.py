"""The offline commands of `rxledger`, run as real subprocesses.

Proof bundles, checkpoints and consistency proofs come from a real log (built once per
module). Each case edits one thing and expects the command to exit non-zero and name the check
that failed, never with a Python traceback. The `verify`, `verify-consistency` and `--help`
invocations are independent of one another, so one module fixture runs them all concurrently
(each subprocess spends most of its ~0.5 s importing) and each test asserts on its own run.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient

from anchoring.anchorer import AnchorSettings
from anchoring.encoding import b64, unb64
from anchoring.log import LogSettings, TransparencyLog
from anchoring.note import Signer, load_private_key, parse_verifier_key, private_key_pem
from anchoring.sequencer import SequencerSettings
from anchoring.store import LogStore
from app.cli import main

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "cli.rxledger.example/log"
RXLEDGER = [sys.executable, "-m", "app.cli"]


def fixed_signer(name: str, seed: int) -> Signer:
    return Signer(name, Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


# Fixed keys keep every run the same: the log's key and the stranger's have no '+' in their
# base64 part, PLUS_SIGNER's has one (about half of all Ed25519 verifier keys do).
LOG_SIGNER = fixed_signer("cli.rxledger.example", 1)
STRANGER = fixed_signer("cli.rxledger.example", 2)
PLUS_SIGNER = fixed_signer("cli.rxledger.example", 8)

FAST = LogSettings(
    sequencer=SequencerSettings(poll_interval=0.02, lease_ttl=2.0, orphan_grace=1.0),
    anchor=AnchorSettings(interval=0.05, max_leaves=1000),
)


@dataclass(frozen=True)
class Artifacts:
    bundle: dict[str, Any]  # inclusion proof bundle of leaf 5 at the checkpoint of size 40
    old_note: str  # checkpoint of size 12
    new_note: str  # checkpoint of size 40
    proof: dict[str, Any]  # consistency proof 12 -> 40
    other_proof: dict[str, Any]  # consistency proof 7 -> 40


def proof_json(from_size: int, to_size: int, path: list[bytes]) -> dict[str, Any]:
    return {"fromSize": from_size, "toSize": to_size, "path": [b64(h) for h in path]}


@pytest.fixture(scope="module")
async def artifacts(mongo_uri: str) -> Any:
    client: AsyncMongoClient[dict] = AsyncMongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000, tz_aware=True
    )
    name = f"t_cli_{uuid.uuid4().hex[:10]}"
    log = TransparencyLog(LogStore(client[name], origin=ORIGIN), LOG_SIGNER, FAST)
    await log.start()
    try:
        for v in range(1, 13):
            await log.append("rx-1", v, {"v": 1, "subject": "rx-1", "version": v, "type": "T"})
        old = await log.wait_anchored(12)
        for v in range(1, 29):
            await log.append("rx-2", v, {"v": 1, "subject": "rx-2", "version": v, "type": "T"})
        new = await log.wait_anchored(40)
        assert (old.size, new.size) == (12, 40)
        bundle = (await log.inclusion_proof(5, tree_size=40)).bundle()
        proof = proof_json(*await log.consistency_proof(12, 40))
        other = proof_json(*await log.consistency_proof(7, 40))
    finally:
        await log.stop()
        await client.drop_database(name)
        await client.close()
    yield Artifacts(bundle, old.note, new.note, proof, other)


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


def rxledger(*args: str) -> subprocess.CompletedProcess[str]:
    result = run([*RXLEDGER, *args])
    assert "Traceback" not in result.stderr, result.stderr
    return result


def write(path: Path, content: Any) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def note_text(note: str) -> str:
    return note[: note.rfind("\n\n") + 1]


# --- keygen ----------------------------------------------------------------------------------


def test_keygen_writes_a_private_pem_and_prints_its_verifier_key(tmp_path):
    out = tmp_path / "keys" / "log.pem"
    result = rxledger("keygen", "--name", "rx.example.org", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    printed = result.stdout.strip()
    assert printed == Signer("rx.example.org", load_private_key(out.read_bytes())).verifier_key
    assert printed.startswith("rx.example.org+")


def test_keygen_always_prints_a_verifier_key_that_parses(tmp_path, capsys, monkeypatch):
    # In-process, many times: a random key's base64 part contains '+' about half the time.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # main() calls basicConfig
    monkeypatch.setattr(root, "level", root.level)
    for i in range(32):
        out = tmp_path / f"k{i}.pem"
        assert main(["keygen", "--name", "rx.example.org", "--out", str(out)]) == 0
        printed = capsys.readouterr().out.strip()
        verifier = parse_verifier_key(printed)
        signer = Signer("rx.example.org", load_private_key(out.read_bytes()))
        assert (verifier.name, verifier.key_id) == ("rx.example.org", signer.key_id)


def test_keygen_refuses_to_overwrite_a_key_unless_forced(tmp_path):
    out = tmp_path / "log.pem"
    first = rxledger("keygen", "--name", "rx.example.org", "--out", str(out))
    assert first.returncode == 0, first.stderr
    pem = out.read_bytes()

    refused = rxledger("keygen", "--name", "rx.example.org", "--out", str(out))
    assert refused.returncode == 2
    assert "--force" in refused.stderr
    assert refused.stdout == ""
    assert out.read_bytes() == pem

    forced = rxledger("keygen", "--name", "rx.example.org", "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert out.read_bytes() != pem
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    new_key = Signer("rx.example.org", load_private_key(out.read_bytes())).verifier_key
    assert forced.stdout.strip() == new_key != first.stdout.strip()


def test_keygen_with_an_invalid_key_name_exits_2_and_writes_no_key(tmp_path):
    out = tmp_path / "log.pem"
    result = rxledger("keygen", "--name", "bad name+x", "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "bad name+x" in result.stderr
    assert not out.exists()


# --- the concurrent runs of verify, verify-consistency and --help ----------------------------

Mutation = Callable[[dict[str, Any]], Any]


def _alter_checkpoint_root(b: dict[str, Any]) -> None:
    lines = b["checkpoint"].split("\n")
    lines[2] = b64(bytes(32))
    b["checkpoint"] = "\n".join(lines)


def _change_path_element(b: dict[str, Any]) -> None:
    first = unb64(b["inclusionPath"][0])
    b["inclusionPath"][0] = b64(bytes([first[0] ^ 1]) + first[1:])


# (case id, mutation of the bundle, the check `verify` must name)
BUNDLE_FAILURES: list[tuple[str, Mutation, str]] = [
    ("checkpoint-text-altered", _alter_checkpoint_root, "bad signature"),
    ("tree-size-changed", lambda b: b.update(treeSize=b["treeSize"] + 1), "size mismatch"),
    ("path-element-removed", lambda b: b["inclusionPath"].pop(), "wrong proof length"),
    (
        "path-element-added",
        lambda b: b["inclusionPath"].append(b64(bytes(32))),
        "wrong proof length",
    ),
    ("leaf-changed", lambda b: b.update(leaf=b64(b'{"forged":true}')), "root mismatch"),
    ("path-element-changed", _change_path_element, "root mismatch"),
    ("leaf-index-changed", lambda b: b.update(leafIndex=6), "root mismatch"),
    ("field-missing", lambda b: b.pop("treeSize"), "malformed input"),
    ("leaf-bad-base64", lambda b: b.update(leaf="not base64!"), "malformed input"),
    ("path-bad-base64", lambda b: b["inclusionPath"].__setitem__(0, "%%%"), "malformed input"),
    (
        "path-hash-too-short",
        lambda b: b.update(inclusionPath=[b64(b"short")] * len(b["inclusionPath"])),
        "malformed input",
    ),
    ("leaf-index-out-of-range", lambda b: b.update(leafIndex=40), "malformed input"),
    (
        "checkpoint-not-a-note",
        lambda b: b.update(checkpoint="not a signed note"),
        "malformed input",
    ),
]

NOT_A_BUNDLE = {
    "not-json": "{not json",
    "json-array": json.dumps(["a", "JSON", "array"]),
}

COMMANDS = [
    "keygen",
    "verify",
    "verify-consistency",
    "audit",
    "serve",
    "sequence",
    "verifier-key",
    "token",
    "schema",
    "export-proof",
    "witness",
]


@pytest.fixture(scope="module")
def runs(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("cli")
    key = LOG_SIGNER.verifier_key
    bundle = write(d / "bundle.json", artifacts.bundle)
    cmds: dict[str, list[str]] = {}

    def verify(case: str, bundle_path: str, *extra: str, key: str = key) -> None:
        cmds[case] = [*RXLEDGER, "verify", bundle_path, "--key", key, *extra]

    verify("ok-inline-key", bundle)
    verify("ok-key-file", bundle, "--origin", ORIGIN, key=write(d / "log.vkey", key + "\n"))
    text = note_text(artifacts.bundle["checkpoint"])
    cosigned = {**artifacts.bundle, "checkpoint": artifacts.bundle["checkpoint"]}
    cosigned["checkpoint"] += fixed_signer("witness.example", 3).signature_line(text)
    verify("ok-cosigned", write(d / "cosigned.json", cosigned))
    plus = {**artifacts.bundle, "checkpoint": PLUS_SIGNER.sign_note(text)}
    verify("ok-plus-key", write(d / "plus.json", plus), key=PLUS_SIGNER.verifier_key)
    for case, mutate, _ in BUNDLE_FAILURES:
        b = copy(artifacts.bundle)
        mutate(b)
        verify(case, write(d / f"{case}.json", b))
    for case, content in NOT_A_BUNDLE.items():
        verify(case, write(d / f"{case}.json", content))
    verify("unknown-key", bundle, key=STRANGER.verifier_key)
    verify("origin-mismatch", bundle, "--origin", "other.example/log")
    name, kid, raw = key.split("+")
    verify("malformed-key", bundle, key=f"{name}+{kid}+{raw[:-8]}")
    verify("missing-bundle", str(d / "nope.json"))
    verify("missing-key-file", bundle, key=str(d / "missing.vkey"))

    old, new = write(d / "old.note", artifacts.old_note), write(d / "new.note", artifacts.new_note)

    def consistency(case: str, old: str, new: str, proof: Any, key: str = key) -> None:
        proof_path = write(d / f"proof-{case}.json", proof)
        cmds[case] = [*RXLEDGER, "verify-consistency", old, new, "--proof", proof_path]
        cmds[case] += ["--key", key]

    consistency("cons-ok", old, new, artifacts.proof)
    consistency("cons-swapped-notes", new, old, artifacts.proof)
    tampered = copy(artifacts.proof)
    last = unb64(tampered["path"][-1])
    tampered["path"][-1] = b64(last[:-1] + bytes([last[-1] ^ 0x80]))
    consistency("cons-tampered-path", old, new, tampered)
    shortened = copy(artifacts.proof)
    shortened["path"].pop()
    consistency("cons-shortened-path", old, new, shortened)
    consistency("cons-other-sizes", old, new, artifacts.other_proof)
    consistency("cons-unknown-key", old, new, artifacts.proof, key=STRANGER.verifier_key)
    consistency("cons-proof-not-json", old, new, "[1, 2")

    # Auditor commands given bad arguments: exit 2, the flag named, no traceback.
    witness_pem = d / "witness.pem"
    witness_pem.write_bytes(private_key_pem(Ed25519PrivateKey.generate()))
    witness = [*RXLEDGER, "witness", "--key", str(witness_pem), "--name", "w.example/w"]
    for case, extra in USAGE_ERRORS.items():
        cmds[case] = [*(witness if case.startswith("witness") else RXLEDGER), *extra]
    cmds["witness-key-is-a-directory"] = [*RXLEDGER, "witness", "--key", str(d)]
    cmds["witness-key-is-a-directory"] += ["--name", "w.example/w", "--print-key"]

    cmds["help"] = [*RXLEDGER, "--help"]
    for command in COMMANDS:
        cmds[f"help-{command}"] = [*RXLEDGER, command, "--help"]
    cmds["script-help"] = [str(Path(sys.executable).parent / "rxledger"), "--help"]

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
        futures = {case: pool.submit(run, args) for case, args in cmds.items()}
        return {case: future.result() for case, future in futures.items()}


def result_of(runs: dict[str, Any], case: str) -> subprocess.CompletedProcess[str]:
    result = runs[case]
    assert "Traceback" not in result.stderr, result.stderr
    return result


def assert_failed(result: subprocess.CompletedProcess[str], check: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAILED: {check}:" in result.stderr, result.stderr
    assert "OK" not in result.stdout


# --- verify ----------------------------------------------------------------------------------


def test_verify_accepts_a_bundle_from_the_log_with_the_key_inline(runs):
    result = result_of(runs, "ok-inline-key")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK: leaf 5 is included in {ORIGIN} at tree size 40")


def test_verify_accepts_the_key_from_a_file(runs):
    result = result_of(runs, "ok-key-file")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: leaf 5")


def test_verify_ignores_a_cosignature_by_an_unknown_key(runs):
    result = result_of(runs, "ok-cosigned")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: leaf 5")


def test_verify_accepts_a_verifier_key_whose_base64_contains_a_plus(runs):
    assert "+" in PLUS_SIGNER.verifier_key.split("+", 2)[2]
    result = result_of(runs, "ok-plus-key")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: leaf 5")


@pytest.mark.parametrize(("case", "check"), [(case, check) for case, _, check in BUNDLE_FAILURES])
def test_verify_of_a_tampered_bundle_exits_1_and_names_the_failed_check(runs, case, check):
    assert_failed(result_of(runs, case), check)


@pytest.mark.parametrize("case", list(NOT_A_BUNDLE))
def test_verify_of_a_file_that_is_not_a_bundle_object_fails_as_malformed_input(runs, case):
    assert_failed(result_of(runs, case), "malformed input")


def test_verify_with_another_key_fails_as_unknown_key(runs):
    assert_failed(result_of(runs, "unknown-key"), "unknown key")


def test_verify_with_another_origin_fails_as_origin_mismatch(runs):
    assert_failed(result_of(runs, "origin-mismatch"), "origin mismatch")


def test_verify_with_a_malformed_key_fails_as_malformed_input(runs):
    assert_failed(result_of(runs, "malformed-key"), "malformed input")


@pytest.mark.parametrize("case", ["missing-bundle", "missing-key-file"])
def test_verify_with_a_missing_file_exits_2_and_says_so(runs, case):
    result = result_of(runs, case)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no such file" in result.stderr
    assert result.stdout == ""


# --- verify-consistency ----------------------------------------------------------------------


def test_verify_consistency_accepts_two_checkpoints_of_the_log(runs):
    result = result_of(runs, "cons-ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK: {ORIGIN} at size 12 is a prefix of size 40")


def test_verify_consistency_with_swapped_notes_fails_as_size_mismatch(runs):
    assert_failed(result_of(runs, "cons-swapped-notes"), "size mismatch")


def test_verify_consistency_with_a_tampered_path_fails_as_root_mismatch(runs):
    assert_failed(result_of(runs, "cons-tampered-path"), "root mismatch")


def test_verify_consistency_with_a_shortened_path_fails_as_wrong_proof_length(runs):
    assert_failed(result_of(runs, "cons-shortened-path"), "wrong proof length")


def test_verify_consistency_with_a_proof_for_other_sizes_fails_as_size_mismatch(runs):
    result = result_of(runs, "cons-other-sizes")
    assert_failed(result, "size mismatch")
    assert "7 -> 40" in result.stderr


def test_verify_consistency_with_another_key_fails_as_unknown_key(runs):
    assert_failed(result_of(runs, "cons-unknown-key"), "unknown key")


def test_verify_consistency_with_a_proof_that_is_not_json_fails_as_malformed_input(runs):
    assert_failed(result_of(runs, "cons-proof-not-json"), "malformed input")


# --- help -----------------------------------------------------------------------------------


def test_top_level_help_lists_every_command(runs):
    result = result_of(runs, "help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: rxledger")
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_has_help(runs, command):
    result = result_of(runs, f"help-{command}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: rxledger {command}")


USAGE_ERRORS = {
    "witness-bad-name": ["--name", "bad+name", "--print-key"],
    "witness-no-log": ["--log-key", "x"],
    "witness-bad-interval": ["--log", "http://127.0.0.1:9/log", "--log-key", "k", "--interval", "-1"],
    "audit-origin-without-tiles": ["audit", "--origin", "o.example/log"],
    "audit-tiles-without-key": ["audit", "--from-tiles", "http://127.0.0.1:9/log"],
    "audit-tiles-unreachable": [
        "audit", "--from-tiles", "http://127.0.0.1:9/log", "--key", LOG_SIGNER.verifier_key,
    ],
    "verify-quorum-without-witnesses": [
        "verify", "b.json", "--key", LOG_SIGNER.verifier_key, "--quorum", "1",
    ],
}  # fmt: skip

USAGE_MESSAGES = {
    "witness-bad-name": "--name: key name 'bad+name' must be non-empty printable text",
    "witness-no-log": "--log URL and --log-key VKEY are required",
    "witness-bad-interval": "--interval -1.0: want a positive number of seconds",
    "audit-origin-without-tiles": "--origin, --since and --save go with --from-tiles",
    "audit-tiles-without-key": "--from-tiles needs --key",
    "audit-tiles-unreachable": "cannot read the log: GET http://127.0.0.1:9/log/checkpoint",
    "verify-quorum-without-witnesses": "--quorum 1: want 0 to 0",
    "witness-key-is-a-directory": "--key ",
}


@pytest.mark.parametrize("case", sorted(USAGE_MESSAGES))
def test_auditor_commands_with_bad_arguments_exit_2_and_name_the_problem(runs, case):
    result = result_of(runs, case)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert USAGE_MESSAGES[case] in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_installed_rxledger_script_runs_the_cli(runs):
    result = result_of(runs, "script-help")
    assert result.returncode == 0, result.stderr
    assert result.stdout == runs["help"].stdout
