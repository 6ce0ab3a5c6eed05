"""rxledger: the command line of the prescription ledger.

Exit codes: 0 success; 1 a verification or audit failed a check (including "malformed input"
for a bundle, note or proof that does not parse); 2 bad usage: arguments, missing files,
configuration, or an unreachable database; 130 a one-shot `mirror` stopped by SIGINT or SIGTERM
before it finished.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from pymongo.errors import ConnectionFailure, PyMongoError

from anchoring.errors import database_error
from anchoring.keys import KeySet, parse_key_set
from anchoring.log import InclusionProof
from anchoring.note import Verifier, check_key_name, parse_verifier_key
from anchoring.verify import (
    MALFORMED,
    VerificationError,
    parse_consistency_proof,
    parse_inclusion_bundle,
    verify_bundle_inclusion,
    verify_consistency,
)
from app.limits import LimitSettings
from app.settings import ConfigError, Settings, announce_mode, env_number, write_new_key

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _database_failure(exc: PyMongoError) -> str:
    """What to print of a database error: where a connection failed (addresses, no data), or
    only the class and code of any other (its text may quote documents)."""
    if isinstance(exc, ConnectionFailure):
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return database_error(exc)


class UsageError(Exception):
    pass


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what}: cannot read {path}: {exc}") from None


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as exc:
        raise VerificationError(MALFORMED, f"{what} {path} is not JSON: {exc}") from None


def _key_text(key: str, what: str) -> str:
    """A key given inline, or the text of the file holding it."""
    if "+" in key and not Path(key).is_file():
        return key
    return _read_text(key, what).strip()


def _verifier(key: str) -> Verifier:
    """A verifier key given inline or as a file holding it."""
    return parse_verifier_key(_key_text(key, "verifier key"))


def _key_set(key: str) -> KeySet:
    """The log's keys: a verifier key given inline, or a key set file (one verifier key a line,
    each optionally with the checkpoint sizes it signs: anchoring.keys)."""
    return parse_key_set(_key_text(key, "verifier key"))


def cmd_keygen(args: argparse.Namespace) -> int:
    from anchoring.note import Signer, load_private_key

    out = Path(args.out)
    try:
        check_key_name(args.name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if out.exists() and not args.force:
        raise UsageError(
            f"{out} exists; pass --force to replace it (the old key's checkpoints stay verifiable only with the old verifier key)"
        )
    write_new_key(out, force=args.force)
    signer = Signer(args.name, load_private_key(out.read_bytes()))
    print(f"wrote Ed25519 signing key to {out} (mode 0600)", file=sys.stderr)
    print(
        "its verifier key as a log key follows; for a witness key, print its witness verifier "
        f"key with: rxledger witness --key {out} --name {args.name} --print-key",
        file=sys.stderr,
    )
    print(signer.verifier_key)
    return EXIT_OK


def _witness_keys(given: list[str]) -> list[Verifier]:
    """Witness verifier keys given inline or as files holding them, each named once."""
    from anchoring.cosignature import parse_witness_keys

    return parse_witness_keys(" ".join(_key_text(item, "witness key") for item in given))


def cmd_verify(args: argparse.Namespace) -> int:
    keys = _key_set(args.key)
    witnesses = _witness_keys(args.witness)
    quorum = len(witnesses) if args.quorum is None else args.quorum
    if not 0 <= quorum <= len(witnesses):
        raise UsageError(
            f"--quorum {quorum}: want 0 to {len(witnesses)} (the --witness keys given)"
        )
    bundle = parse_inclusion_bundle(_read_json(args.bundle, "bundle"))
    signed = keys.open_checkpoint(bundle.checkpoint, args.origin)
    cp = signed.checkpoint
    verify_bundle_inclusion(bundle, cp.size, cp.root_hash)
    witnessed = ""
    if witnesses:
        from anchoring.cosignature import cosignatures
        from anchoring.verify import NO_QUORUM

        _, found = cosignatures(bundle.checkpoint, witnesses)
        cosigned = {c.key_id for c in found}
        if len(found) < quorum:
            missing = ", ".join(w.name for w in witnesses if w.key_id not in cosigned)
            raise VerificationError(
                NO_QUORUM,
                f"{len(found)} of the {len(witnesses)} witnesses cosigned the checkpoint, "
                f"{quorum} required (missing: {missing})",
            )
        witnessed = f"; cosigned by {len(found)} of {len(witnesses)} witnesses ({', '.join(c.name for c in found) or 'none'})"
    print(
        f"OK: leaf {bundle.leaf_index} is included in {cp.origin} at tree size {cp.size}; "
        f"checkpoint signed by {signed.labels}; root {cp.root_hash.hex()}" + witnessed
    )
    return EXIT_OK


def cmd_verify_consistency(args: argparse.Namespace) -> int:
    keys = _key_set(args.key)
    old_signed = keys.open_checkpoint(_read_text(args.old_note, "old checkpoint"), args.origin)
    old = old_signed.checkpoint
    new_signed = keys.open_checkpoint(_read_text(args.new_note, "new checkpoint"), old.origin)
    new = new_signed.checkpoint
    proof = parse_consistency_proof(_read_json(args.proof, "proof"))
    from anchoring.verify import SIZE_MISMATCH

    if (proof.from_size, proof.to_size) != (old.size, new.size):
        raise VerificationError(
            SIZE_MISMATCH,
            f"proof is for sizes {proof.from_size} -> {proof.to_size}, checkpoints are {old.size} -> {new.size}",
        )
    verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof.path)
    print(
        f"OK: {old.origin} at size {old.size} is a prefix of size {new.size}; "
        + (
            f"both checkpoints signed by {old_signed.labels}"
            if old_signed.labels == new_signed.labels
            else f"size {old.size} signed by {old_signed.labels}, size {new.size} by {new_signed.labels}"
        )
    )
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from anchoring.audit import AuditReport, audit_log, audit_remote
    from anchoring.remote import RemoteError, RemoteLog
    from app.db import make_client, make_store

    if (args.origin or args.since or args.save) and not args.from_tiles:
        raise UsageError(
            "--origin, --since and --save go with --from-tiles (the database audit reads every "
            "checkpoint the log stored)"
        )
    if args.from_tiles and not args.key:
        raise UsageError(
            "--from-tiles needs --key: the log's verifier key, which you must get from the log's "
            "operator, not from the log itself"
        )

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(
                f"\raudit: {done}/{total} entries ({100 * done // max(total, 1)}%)",
                end="",
                file=sys.stderr,
                flush=True,
            )

    since = _read_text(args.since, "--since") if args.since else None

    async def from_tiles() -> AuditReport:
        async with RemoteLog(args.from_tiles) as remote:
            return await audit_remote(
                remote, _key_set(args.key), progress, origin=args.origin, since=since
            )

    async def from_database(settings: Settings) -> AuditReport:
        keys = _key_set(args.key) if args.key else configured_keys(settings)
        client = make_client(settings)
        try:
            return await audit_log(make_store(settings, client), keys, progress)
        finally:
            await client.close()

    if args.from_tiles:
        source = args.from_tiles
        try:
            report = asyncio.run(from_tiles())
        except RemoteError as exc:
            raise UsageError(f"cannot read the log: {exc}") from None
    else:
        settings = Settings.from_env()
        source = settings.origin
        report = asyncio.run(from_database(settings))
    if not args.quiet:
        print(file=sys.stderr)
    if report.ok:
        print(
            f"OK: {report.entries} entries, {report.tiles} tiles and {report.checkpoints} checkpoints of {source} verified"
            + (f"; signed by {report.keys_text}" if report.signed_by else "")
        )
        if args.save and report.note is not None:
            try:
                Path(args.save).write_text(report.note, encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"--save {args.save}: {exc}") from None
            print(f"saved the audited checkpoint to {args.save}; next time: --since {args.save}")
        return EXIT_OK
    print(f"FAILED: first divergence: {report.problems[0]}")
    for extra in report.problems[1:]:
        print(f"  also: {extra}")
    return EXIT_FAILED


EXIT_STOPPED = 130  # a one-shot mirror stopped by SIGINT or SIGTERM before it finished


def cmd_mirror(args: argparse.Namespace) -> int:
    import contextlib
    import signal
    from collections.abc import AsyncIterator

    from anchoring.mirror import (
        DatabaseSource,
        Mirror,
        MirrorBusy,
        MirrorRefused,
        MirrorSource,
        RemoteSource,
        Round,
    )
    from anchoring.remote import RemoteError, RemoteLog
    from anchoring.tiles import TileCorrupt, TileNotFound
    from app.db import make_client, make_store

    if not args.interval > 0:
        raise UsageError(f"--interval {args.interval}: want a positive number of seconds")
    if args.from_url and not args.key:
        raise UsageError(
            "--from needs --key: the log's verifier key, which you must get from the log's "
            "operator, not from the log itself"
        )
    settings = None if args.from_url else Settings.from_env()
    if args.key:
        keys = _key_set(args.key)
    else:
        assert settings is not None
        keys = configured_keys(settings)
    mirror = Mirror(Path(args.to), keys)
    shown = False

    def progress(done: int, total: int) -> None:
        nonlocal shown
        if not args.quiet:
            shown = True
            print(
                f"\rmirror: {done}/{total} files ({100 * done // max(total, 1)}%)",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def report(done: Round) -> None:
        nonlocal shown
        if shown:
            print(file=sys.stderr)
            shown = False
        if done.source_size is None:
            print("the log has published no checkpoint yet; nothing to copy", file=sys.stderr)
        elif done.behind:
            print(
                f"the source serves size {done.source_size}, behind the mirror's {done.size} "
                "and consistent with it: nothing to copy",
                file=sys.stderr,
            )
        elif done.written or not args.follow:
            kept = f", {done.kept} kept from an interrupted copy" if done.kept else ""
            moved = "" if done.old_size in (None, done.size) else f" (was {done.old_size})"
            held = mirror.held()
            signers = keys.open_checkpoint(held[0]).labels if held else "no key"
            print(
                f"OK: {args.to} holds the log at size {done.size}{moved}, verified with "
                f"{signers}: {done.written} files written{kept}",
                flush=True,
            )

    @contextlib.asynccontextmanager
    async def opened() -> AsyncIterator[MirrorSource]:
        if args.from_url:
            async with RemoteLog(args.from_url) as remote:
                yield RemoteSource(remote)
            return
        assert settings is not None
        client = make_client(settings)
        try:
            yield DatabaseSource(make_store(settings, client))
        finally:
            await client.close()

    async def follow() -> int:
        async with opened() as source:
            while True:
                try:
                    report(await mirror.sync(source, progress))
                except (RemoteError, PyMongoError) as exc:
                    if not args.follow:
                        raise
                    failure = exc if isinstance(exc, RemoteError) else _database_failure(exc)
                    print(
                        f"\nmirror: cannot read the log ({failure}); retrying in "
                        f"{args.interval:g} s",
                        file=sys.stderr,
                        flush=True,
                    )
                if not args.follow:
                    return EXIT_OK
                await asyncio.sleep(args.interval)

    async def run() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            with mirror.locked():
                return await follow()
        except asyncio.CancelledError:
            # Every file is written whole or not at all; the checkpoint moves only after
            # every tile it needs is in place.
            print(file=sys.stderr)
            if args.follow:
                print(f"mirror: stopped; {args.to} is consistent", file=sys.stderr)
                return EXIT_OK
            print(
                f"mirror: stopped before the copy finished; {args.to} still serves its "
                "previous checkpoint; run again to resume",
                file=sys.stderr,
            )
            return EXIT_STOPPED

    try:
        return asyncio.run(run())
    except MirrorBusy as exc:
        raise UsageError(str(exc)) from None
    except MirrorRefused as exc:
        if shown:
            print(file=sys.stderr)
        try:
            held = mirror.held()
        except MirrorRefused:
            held = None
        print(f"REFUSED: {exc}", file=sys.stderr)
        print(
            f"{args.to} is left as it was"
            + (f", at size {held[1].size}" if held else " (it holds no checkpoint yet)"),
            file=sys.stderr,
        )
        return EXIT_FAILED
    except (TileNotFound, TileCorrupt) as exc:
        print(f"\nFAILED: the log does not serve what its checkpoint needs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RemoteError as exc:
        raise UsageError(f"cannot read the log: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--to {args.to}: {exc}") from None


def configured_keys(settings: Settings) -> KeySet:
    """The log's key set from configuration: RXLEDGER_LOG_KEYS, else the signing key alone."""
    signer = settings.signer(create=False)
    next_signer = settings.next_signer()
    keys = settings.key_set(signer, next_signer)
    return keys or KeySet.single(signer.verifier(), signer.verifier_key)


def cmd_export_proof(args: argparse.Namespace) -> int:
    from anchoring.ledger import events_of
    from app.db import make_client, make_log

    settings = Settings.from_env()
    out = Path(args.out or f"proofs-{args.prescription}")

    async def run() -> int:
        client = make_client(settings)
        tlog = make_log(settings, client)
        try:
            subject = args.prescription
            fields = {"version": 1, "header": 1, "leaf": 1}
            events = (await events_of(tlog.store.ledger, [subject], fields))[subject]
            if not events:
                raise UsageError(f"no prescription {args.prescription!r} in the ledger")
            deadline = asyncio.get_running_loop().time() + args.wait
            while True:
                indices = await tlog.leaf_indices([e["_id"] for e in events])
                cp = await tlog.latest_checkpoint()
                covered = [
                    e for e in events if e["_id"] in indices and cp and indices[e["_id"]] < cp.size
                ]
                if len(covered) == len(events) or asyncio.get_running_loop().time() >= deadline:
                    break
                await asyncio.sleep(0.2)
            paths = (
                await tlog.inclusion_paths([indices[e["_id"]] for e in covered], cp.size)
                if cp and covered
                else []
            )
        finally:
            await client.close()
        tampered: list[dict[str, Any]] = []
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "verifier.key").write_text(tlog.keys.text())  # the key set, after a rotation
            for event, path in zip(covered, paths, strict=True):
                assert cp is not None
                leaf = bytes(event["leaf"])
                index = indices[event["_id"]]
                proof = InclusionProof.against(index, leaf, path, cp)
                if not proof.holds():
                    # The ledger's copy of the leaf is not what the signed tree holds.
                    tampered.append(event)
                    continue
                name = f"v{event['version']}-{event['header'].get('type', 'EVENT')}.json"
                (out / name).write_text(json.dumps(proof.bundle(), indent=2) + "\n")
                print(f"wrote {out / name}: leaf {index} in tree {cp.size}", file=sys.stderr)
        except OSError as exc:
            raise UsageError(f"--out {out}: {exc}") from None
        print(f"wrote {out / 'verifier.key'}", file=sys.stderr)
        for event in tampered:
            print(
                f"TAMPERED: version {event['version']} of {args.prescription}: its ledger leaf "
                f"is not leaf {indices[event['_id']]} of the signed tree; no bundle written "
                "(run rxledger audit)",
                file=sys.stderr,
            )
        if tampered:
            return EXIT_FAILED
        pending = [e for e in events if e not in covered]
        if pending:
            versions = ", ".join(str(e["version"]) for e in pending)
            print(
                f"INCOMPLETE: no checkpoint covers version(s) {versions} of {args.prescription} yet "
                f"(waited {args.wait:g} s); run again shortly",
                file=sys.stderr,
            )
            return EXIT_FAILED
        print(
            f"OK: {len(covered)} bundles; check one with: rxledger verify {out}/v1-*.json --key {out}/verifier.key"
        )
        return EXIT_OK

    return asyncio.run(run())


def cmd_witness(args: argparse.Namespace) -> int:
    from anchoring.cosignature import Cosigner
    from anchoring.note import load_private_key

    try:
        check_key_name(args.name)
    except ValueError as exc:
        raise UsageError(f"--name: {exc}") from None
    try:
        cosigner = Cosigner(args.name, load_private_key(Path(args.key).read_bytes()))
    except FileNotFoundError:
        raise UsageError(
            f"--key: no such file {args.key}; create one with: rxledger keygen --name {args.name} --out {args.key}"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--key {args.key}: {exc}") from None
    if args.print_key:
        print(cosigner.verifier_key)
        return EXIT_OK
    if not args.log or not args.log_key:
        raise UsageError("--log URL and --log-key VKEY are required (except with --print-key)")
    if not args.interval > 0:
        raise UsageError(f"--interval {args.interval}: want a positive number of seconds")
    from app.witness import run_witness

    default_state = Path("var/witness") / f"{args.name.replace('/', '_')}.json"
    state = Path(args.state or default_state).resolve()
    log_key = _key_set(args.log_key)
    try:
        return asyncio.run(
            run_witness(cosigner, log_key, args.log, state, args.origin, args.interval, args.once)
        )
    except KeyboardInterrupt:
        return EXIT_OK


def default_workers() -> int:
    """The number of cores this process may run on (os.cpu_count() where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def serve_workers(given: int | None) -> int:
    """--workers, else RXLEDGER_WORKERS, else default_workers(). Raises UsageError or
    ConfigError for a count below 1."""
    if given is not None:
        if given < 1:
            raise UsageError(f"--workers {given}: want at least 1 worker process")
        return given
    return int(env_number("RXLEDGER_WORKERS", default_workers(), 1, integer=True))


def cmd_serve(args: argparse.Namespace) -> int:
    from app.auth import AuthSettings
    from app.cors import CrossOriginSettings
    from app.workers import shared_state

    settings = Settings.from_env()
    signer = settings.signer()  # fail fast on a missing production key
    settings.key_set(signer, settings.next_signer())  # ... or a key rotation misconfigured
    settings.derived_keys(signer)  # ... or RXLEDGER_TAG_KEY
    AuthSettings.from_env(settings.mode, settings.var_dir)  # ... and token settings
    CrossOriginSettings.from_env(settings.production)  # ... and the CORS allowlist
    limits = LimitSettings.from_env()
    workers = serve_workers(args.workers)
    grace = env_number("RXLEDGER_SHUTDOWN_GRACE", 10.0, 0.0)
    if workers == 1:
        return run_server(args, limits, workers, grace)
    # Workers are spawned (a fresh interpreter each, importing the app): what they share is
    # made here first, and named in the environment they inherit.
    announce_mode(settings)
    with shared_state(workers):
        return run_server(args, limits, workers, grace)


def fork_workers() -> None:
    """Have uvicorn's supervisor fork its workers from this process, with the app imported,
    instead of spawning fresh interpreters that import it each (about a second of CPU per
    worker, every worker at once at start-up): a worker starts in milliseconds, a replacement
    too, and the workers share the imported code's memory. Safe here: this process has no
    other thread, no event loop and no database connection yet, and it is called after the
    metrics directory is named, so prometheus_client (imported here first) writes to it.
    uvicorn keeps its start method in a private module; if that changes, workers are spawned
    as uvicorn does by default, which works the same, only slower."""
    import multiprocessing

    import uvicorn._subprocess

    import app.main  # noqa: F401  (what every worker runs, imported once)

    if hasattr(uvicorn._subprocess, "spawn"):
        uvicorn._subprocess.spawn = multiprocessing.get_context("fork")  # type: ignore[assignment]


def run_server(args: argparse.Namespace, limits: LimitSettings, workers: int, grace: float) -> int:
    """uvicorn, in this process (one worker) or as the supervisor of `workers` processes
    sharing its listening socket; it restarts a worker that dies, and on SIGTERM or SIGINT
    stops them all, each within `grace` seconds of open requests and streams. Returns the exit
    code: uvicorn's STARTUP_FAILURE (3) when a worker failed to start, else 0."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    options: dict[str, Any] = dict(
        factory=True,  # app.main:serve_app
        host=args.host,
        port=args.port,
        workers=workers,
        timeout_graceful_shutdown=math.ceil(grace),
        # The supervisor pings each worker's pong thread; one that starts slowly (a fresh
        # interpreter importing the app on a busy host) must not be taken for hung and killed.
        timeout_worker_healthcheck=30,
        log_level=args.log_level,
        # Subscription messages are small and frequent: compressing each costs more CPU than it
        # saves, and a deflate context costs about 40 KiB of memory per WebSocket.
        ws_per_message_deflate=False,
        # A WebSocket message past this closes the connection (1009) before it is buffered;
        # one under it but over the body limit is refused by the app with a precise error.
        ws_max_size=limits.max_ws_message_bytes,
        # Clients keep connections open between requests; uvicorn's 5 s default races their
        # reuse of an idle connection (the client sees a reset).
        timeout_keep_alive=30,
    )
    if workers == 1:
        uvicorn.run("app.main:serve_app", **options)  # exits with STARTUP_FAILURE itself
        return EXIT_OK
    fork_workers()
    # uvicorn.run's own supervisor, run here to learn how its workers ended: uvicorn.run
    # returns normally after stopping the server for a worker that could not start.
    config = uvicorn.Config("app.main:serve_app", **options)
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        return STARTUP_FAILURE
    return EXIT_OK


def cmd_sequence(args: argparse.Namespace) -> int:
    """Run only the sequencer and anchorer (no HTTP), e.g. as a separate process."""
    from app.db import make_client, make_log

    settings = Settings.from_env()
    announce_mode(settings)

    async def run() -> int:
        client = make_client(settings)
        tlog = make_log(settings, client)
        await tlog.start()
        print(
            f"sequencing {settings.origin} as {tlog.sequencer.holder}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await tlog.stop()
            await client.close()
        return EXIT_OK

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from anchoring.keys import LogKey
    from anchoring.note import Signer, load_private_key
    from app.db import make_client, make_store

    if args.transition < 0 or (args.start is not None and args.start < 0):
        raise UsageError("--from and --transition must be 0 or more")
    settings = Settings.from_env()
    out = Path(args.out) if args.out else settings.log_keys
    if out is None:
        raise UsageError("--out FILE is needed (or RXLEDGER_LOG_KEYS): where to write the key set")
    try:
        new = Signer(settings.key_name, load_private_key(Path(args.new).read_bytes()))
    except FileNotFoundError:
        raise UsageError(
            f"--new: no such file {args.new}; create the new key with: rxledger keygen "
            f"--name {settings.key_name} --out {args.new}"
        ) from None
    except ValueError as exc:
        raise UsageError(f"--new {args.new}: {exc}") from None
    keys = configured_keys(settings)
    if keys.find(new.name, new.key_id) is not None:
        raise UsageError(f"the key of {args.new} ({new.verifier_key}) is already in the key set")

    async def newest_checkpoint() -> int | None:
        client = make_client(settings)
        try:
            doc = await make_store(settings, client).newest_notarization()
        finally:
            await client.close()
        return None if doc is None else int(doc["_id"])

    newest = asyncio.run(newest_checkpoint())
    first = args.start if args.start is not None else (0 if newest is None else newest + 1)
    if newest is not None and first <= newest:
        raise UsageError(
            f"--from {first}: checkpoint {newest} is signed already; the new key can only sign "
            f"from size {newest + 1} on"
        )
    current = [k for k in keys.keys if k.last is None]
    if len(current) != 1 or current[0].first > first:
        raise UsageError(
            "the key set must have exactly one key without an end, in force at --from, to "
            f"rotate from; it has: {', '.join(f'{k.label} {k.range_text}' for k in keys.keys)}"
        )
    last = first + args.transition - 1  # both keys sign `transition` sizes
    if last < current[0].first:
        raise UsageError(
            f"--transition {args.transition} would end {current[0].label} before its first "
            f"size {current[0].first}: the old key must have signed at least one size"
        )
    rotated = KeySet(
        [
            *(
                k if k is not current[0] else LogKey(k.verifier, k.vkey, k.first, last)
                for k in keys.keys
            ),
            LogKey(new.verifier(), new.verifier_key, first),
        ]
    )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(
        "# rxledger log keys: <verifier key> <first size>..<last size> (rxledger rotate-key)\n"
        + rotated.text()
    )
    tmp.replace(out)
    print(rotated.text(), end="")
    print(
        f"wrote the key set to {out}: {current[0].label} signs up to size {last}, "
        f"{new.name}+{new.key_id.hex()} from size {first}"
        + (f" (both from {first} to {last}).\n" if last >= first else ".\n")
        + f"Next: on every gateway set RXLEDGER_LOG_KEYS={out} and "
        f"RXLEDGER_NEXT_SIGNING_KEY={args.new}, and restart them; give {out} to auditors "
        "(rxledger verify --key) and witnesses (rxledger witness --log-key) before the log "
        f"passes size {last}.",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_derive_keys(args: argparse.Namespace) -> int:
    from anchoring.note import Signer, load_private_key
    from app.derived_keys import DerivedKeys

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    settings = Settings.from_env()
    if args.key is None:
        # What the gateway keys them with now: RXLEDGER_TAG_KEY's, else the signing key's.
        signer = settings.signer()
        derived = settings.derived_keys(signer)
        if settings.tag_key_file is not None:
            source = f"RXLEDGER_TAG_KEY ({settings.tag_key_file})"
        else:
            source = f"RXLEDGER_SIGNING_KEY ({settings.signing_key or 'the development key'})"
        label = source
    else:
        try:
            signer = Signer(settings.key_name, load_private_key(Path(args.key).read_bytes()))
        except FileNotFoundError:
            raise UsageError(f"--key {args.key}: no such file") from None
        except ValueError as exc:
            raise UsageError(f"--key {args.key}: {exc}") from None
        derived = DerivedKeys.of_key(signer.private_key.private_bytes_raw())
        source, label = args.key, f"the log key {signer.verifier_key}"
    text = derived.text(label)
    tmp = out.with_name(out.name + ".tmp")
    tmp.touch(mode=0o600)
    tmp.chmod(0o600)
    tmp.write_text(text)
    tmp.replace(out)
    print(
        f"wrote the keys derived from {source} to {out} (mode 0600). Next: on every gateway "
        f"set RXLEDGER_TAG_KEY={out}; once the log signs with another key, {source} need not "
        "stay on any gateway (keep it offline, or destroy it).",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_verifier_key(args: argparse.Namespace) -> int:
    print(Settings.from_env().signer().verifier_key)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from schema.root import sdl

    text = sdl()
    if args.check:
        current = _read_text(args.check, "schema file")
        if current != text:
            print(
                f"{args.check} differs from the schema the code defines; regenerate it with `make schema`",
                file=sys.stderr,
            )
            return EXIT_FAILED
        return EXIT_OK
    sys.stdout.write(text)
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    from app.auth import Role, expected_issuer_audience, load_dev_secret, mint_token

    settings = Settings.from_env()
    env_issuer, env_audience = expected_issuer_audience()
    if args.ttl <= 0:
        raise UsageError(f"--ttl {args.ttl}: want a positive number of seconds")
    claims: dict[str, Any] = {
        "role": Role(args.role),
        "subject": args.sub,
        "organization": args.org,
        "ttl_seconds": args.ttl,
        "kid": args.kid,
        "issuer": args.issuer if args.issuer is not None else env_issuer,
        "audience": args.audience if args.audience is not None else env_audience,
    }
    if args.key:
        try:
            key_pem = Path(args.key).read_bytes()
        except OSError as exc:
            raise UsageError(f"--key: cannot read {args.key}: {exc}") from None
        try:
            token = mint_token(key_pem=key_pem, **claims)
        except ValueError as exc:
            raise UsageError(f"--key {args.key}: {exc}") from None
    else:
        if settings.production:
            raise UsageError(
                "production mode accepts no HS256 tokens: pass --key PRIVATE_PEM (an Ed25519 or RSA key whose public key is in RXLEDGER_JWT_PUBLIC_KEYS or RXLEDGER_JWKS)"
            )
        try:
            token = mint_token(secret=load_dev_secret(settings.var_dir), **claims)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    print(token)
    print(
        f"{args.role} token for {args.sub!r}, valid {args.ttl} s; use: Authorization: Bearer <token>",
        file=sys.stderr,
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rxledger",
        description="A Merkle-anchored prescription ledger: gateway, sequencer and offline verifier.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="create an Ed25519 signing key and print its verifier key")
    p.add_argument("--name", required=True, help="key name in signed notes, e.g. rx.example.org")
    p.add_argument(
        "--out",
        default="var/keys/log.pem",
        help="where to write the PEM private key (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("verify", help="verify a proof bundle offline (no database, no network)")
    p.add_argument(
        "bundle", help="proof bundle JSON: {leaf, leafIndex, treeSize, inclusionPath, checkpoint}"
    )
    p.add_argument(
        "--key",
        required=True,
        help="verifier key <name>+<hex id>+<base64 key>, or a key set file: one verifier key "
        "a line, each optionally followed by the checkpoint sizes it signs (first.. or "
        "first..last), as after a key rotation",
    )
    p.add_argument("--origin", help="require this checkpoint origin")
    p.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="WKEY",
        help="a witness verifier key (<name>+<hex id>+<base64(0x04 ‖ key)>), or a file of them, "
        "one per line; repeatable. The checkpoint must carry their cosignatures",
    )
    p.add_argument(
        "--quorum",
        type=int,
        metavar="K",
        help="how many of the --witness keys must have cosigned (default: all of them)",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "verify-consistency", help="verify that one checkpoint extends another, offline"
    )
    p.add_argument("old_note", help="the older signed checkpoint (a text file)")
    p.add_argument("new_note", help="the newer signed checkpoint (a text file)")
    p.add_argument(
        "--proof", required=True, help="consistency proof JSON: {fromSize, toSize, path}"
    )
    p.add_argument("--key", required=True, help="verifier key, or a key set file (as for verify)")
    p.add_argument("--origin", help="require this checkpoint origin")
    p.set_defaults(func=cmd_verify_consistency)

    p = sub.add_parser(
        "derive-keys",
        help="write the keys the patient tags and webhook secrets are keyed with, from a log key",
        description="Write the two secrets derived from a log key (the patient routing tags' "
        "and the webhook secrets' keys) to a file RXLEDGER_TAG_KEY can name instead of the "
        "key itself: one-way hashes, which sign nothing, so that the old key can leave the "
        "gateways after a rotation. See docs/operations.md, Rotating the log key.",
    )
    p.add_argument(
        "--key",
        metavar="PEM",
        help="the log key the tags and secrets are keyed with, the log's first private key "
        "(PEM; default: what the gateway keys them with now, RXLEDGER_TAG_KEY's, else "
        "RXLEDGER_SIGNING_KEY's)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="where to write them")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_derive_keys)

    p = sub.add_parser(
        "rotate-key",
        help="schedule a new log signing key: write the key set that hands over to it",
        description="Write the log's key set (RXLEDGER_LOG_KEYS) so that from checkpoint size "
        "--from on both the current key and NEW sign --transition sizes, then NEW alone. Every checkpoint signed before stays verifiable with the "
        "old key. Reads the newest checkpoint from the database (MONGODB_URI, RXLEDGER_DB). "
        "See docs/operations.md, Rotating the log key.",
    )
    p.add_argument(
        "--new",
        required=True,
        metavar="PEM",
        help="the new Ed25519 private key (rxledger keygen --out PEM), named RXLEDGER_KEY_NAME",
    )
    p.add_argument(
        "--from",
        dest="start",
        type=int,
        metavar="SIZE",
        help="the first checkpoint size the new key signs (default: the one after "
        "the newest checkpoint)",
    )
    p.add_argument(
        "--transition",
        type=int,
        default=1000,
        metavar="N",
        help="how many sizes after --from both keys sign (default: %(default)s)",
    )
    p.add_argument(
        "--out", metavar="FILE", help="where to write the key set (default: RXLEDGER_LOG_KEYS)"
    )
    p.set_defaults(func=cmd_rotate_key)

    p = sub.add_parser(
        "audit", help="replay the whole log from the database and check every hash and signature"
    )
    p.add_argument(
        "--key",
        help="verifier key or key set file (as for verify) to check checkpoints with "
        "(default: RXLEDGER_LOG_KEYS, else the configured signing key's)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--from-tiles",
        metavar="URL",
        help="audit a remote log through its C2SP tlog-tiles alone, e.g. "
        "https://rx.example.org/log (no database access; needs --key)",
    )
    p.add_argument("--origin", help="with --from-tiles: require this checkpoint origin")
    p.add_argument(
        "--since",
        metavar="NOTE",
        help="with --from-tiles: a checkpoint of the log seen before (a file); the log's tree "
        "must still hold it (no rollback, no rewritten history)",
    )
    p.add_argument(
        "--save",
        metavar="NOTE",
        help="with --from-tiles: write the checkpoint audited to this file when all is well, "
        "for the next audit's --since",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "mirror",
        help="copy the log's tlog-tiles into a directory any static web server can serve",
        description="Write the log as C2SP tlog-tiles files (DIR/checkpoint, DIR/tile/..., "
        "DIR/tile/entries/...), the paths and bytes the gateway serves under /log/, so that "
        "any static web server can serve them. Reads a gateway (--from URL) or the database "
        "(MONGODB_URI, RXLEDGER_DB). Verifies as it copies: the checkpoint's signature with "
        "the log's key, consistency with the checkpoint the mirror holds, and every tile and "
        "entry bundle against the checkpoint's root. Resumes where it stopped, never rewrites "
        "a file, and writes the checkpoint last. A checkpoint not consistent with the "
        "mirror's (a fork) or a tile that does not verify is refused: exit 1, the mirror left "
        "as it was. Exit 2: bad usage, the log unreachable, the directory not writable; 130: "
        "stopped (SIGINT, SIGTERM) before a one-shot copy finished.",
    )
    p.add_argument("--to", required=True, metavar="DIR", help="the mirror's directory")
    p.add_argument(
        "--from",
        dest="from_url",
        metavar="URL",
        help="a gateway's tlog-tiles prefix, e.g. https://rx.example.org/log, or another "
        "mirror's URL (default: the database named by MONGODB_URI and RXLEDGER_DB)",
    )
    p.add_argument(
        "--key",
        metavar="VKEY",
        help="the log's verifier key, or a key set file (as for verify; required with --from; "
        "default for the database: the configured key set, RXLEDGER_LOG_KEYS, else the "
        "signing key's)",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="keep copying as the log grows, until SIGTERM or Ctrl-C; errors reading the log "
        "are retried, a fork or a tile that does not verify stops it (exit 1)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="with --follow: how often to look for a new checkpoint (default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_mirror)

    p = sub.add_parser(
        "export-proof",
        help="write a proof bundle for every event of a prescription, with the verifier key",
        description="Write one proof bundle per event of a prescription (the JSON `rxledger "
        "verify` reads, the same as GraphQL history.bundle) and the log's verifier key, so that "
        "anyone can check them offline: rxledger verify DIR/v1-ISSUED.json --key "
        "DIR/verifier.key. Reads the database (MONGODB_URI, RXLEDGER_DB).",
    )
    p.add_argument("--prescription", required=True, metavar="ID", help="the prescription's id")
    p.add_argument("--out", metavar="DIR", help="directory to write into (default: proofs-<ID>)")
    p.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a checkpoint to cover the newest events (default: %(default)s)",
    )
    p.set_defaults(func=cmd_export_proof)

    p = sub.add_parser(
        "witness",
        help="run a witness: cosign each new checkpoint of a log that is consistent with the last",
        description="Run an independent witness with its own Ed25519 key. It fetches the log's "
        "newest checkpoint (URL/next-checkpoint, else URL/checkpoint), verifies the log's "
        "signature and, from the log's tiles, a consistency proof from the last checkpoint it "
        "cosigned, then returns a C2SP tlog-cosignature/v1 to URL/cosignature. It refuses, and "
        "says why, a checkpoint that is smaller than, forks from or is inconsistent with what "
        "it cosigned. What it cosigned last is kept in --state; keep that file.",
    )
    p.add_argument(
        "--log", metavar="URL", help="the log's tlog-tiles prefix, e.g. http://127.0.0.1:8000/log"
    )
    p.add_argument(
        "--key",
        required=True,
        metavar="WITNESS_KEY",
        help="the witness's Ed25519 private key (PEM; create it with rxledger keygen --out FILE)",
    )
    p.add_argument(
        "--name", required=True, help="the witness's key name, e.g. witness.example.org/w1"
    )
    p.add_argument(
        "--log-key",
        metavar="VKEY",
        help="the log's verifier key, or its key set file (one verifier key a line with the "
        "sizes each signs: the witness follows key rotations), from the log's operator",
    )
    p.add_argument("--origin", help="require this checkpoint origin (default: the first one seen)")
    p.add_argument(
        "--state",
        metavar="FILE",
        help="where the witness remembers what it cosigned (default: var/witness/<name>.json)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="poll interval (default: %(default)s)",
    )
    p.add_argument(
        "--once", action="store_true", help="witness the current checkpoint once and exit"
    )
    p.add_argument(
        "--print-key",
        action="store_true",
        help="print the witness's verifier key (for the log's RXLEDGER_WITNESSES) and exit",
    )
    p.set_defaults(func=cmd_witness)

    p = sub.add_parser(
        "serve",
        help="run the gateway (uvicorn) with its sequencer and anchorer",
        description="Run the gateway: GraphQL over HTTP and WebSocket, the event stream, the "
        "tlog-tiles log and the audit page, in --workers processes on one port. Every worker "
        "serves reads and writes and follows the log; one at a time holds the sequencer lease "
        "and sequences and signs checkpoints. Rate limits and /metrics hold for the server as "
        "a whole. SIGTERM or SIGINT stops all workers, each within RXLEDGER_SHUTDOWN_GRACE "
        "seconds (default 10) of open requests and streams; a worker that dies is restarted.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="gateway processes sharing the port (default: $RXLEDGER_WORKERS, else the number "
        "of cores this process may use)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "sequence", help="run only the sequencer and anchorer (takes over when the leader dies)"
    )
    p.set_defaults(func=cmd_sequence)

    p = sub.add_parser("verifier-key", help="print the verifier key of the configured signing key")
    p.set_defaults(func=cmd_verifier_key)

    from app.auth import Role

    p = sub.add_parser(
        "token",
        help="print a bearer token (JWT) for calling the gateway",
        description="Print a signed bearer token (JWT) on stdout and a usage hint on stderr, so "
        "that TOKEN=$(rxledger token ...) works. Without --key the token is HS256 with the "
        "development secret (RXLEDGER_JWT_DEV_SECRET, else <RXLEDGER_VAR_DIR>/keys/dev-jwt.secret, "
        "created if missing), which a development gateway accepts; production mode needs --key.",
    )
    p.add_argument(
        "--role",
        required=True,
        choices=[role.value for role in Role],
        metavar="ROLE",
        help=f"the viewer's role (the token's role claim): {', '.join(role.value for role in Role)}",
    )
    p.add_argument("--sub", required=True, help="the viewer's id (the token's sub claim)")
    p.add_argument(
        "--org",
        help="organization (org claim): pharmacy id of a PHARMACIST or PARTNER, courier company "
        "of a COURIER, department of a PRESCRIBER",
    )
    p.add_argument(
        "--ttl",
        type=int,
        default=3600 * 8,
        metavar="SECONDS",
        help="seconds until the token expires (default: %(default)s)",
    )
    p.add_argument(
        "--key",
        metavar="PRIVATE_PEM",
        help="sign with this unencrypted PEM private key: Ed25519 gives EdDSA, RSA gives RS256 "
        "(default: HS256 with the development secret, development mode only)",
    )
    p.add_argument(
        "--kid",
        help="key id header; a gateway names a PEM public key by its file name stem, e.g. "
        "issuer-2025 for issuer-2025.pem (default: none, the gateway tries every key)",
    )
    p.add_argument("--issuer", help="iss claim (default: $RXLEDGER_JWT_ISSUER, none when unset)")
    p.add_argument(
        "--audience", help="aud claim (default: $RXLEDGER_JWT_AUDIENCE, none when unset)"
    )
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("schema", help="print the GraphQL schema (SDL), as in schema.graphql")
    p.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the schema instead")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    from app.workers import configure_logging

    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except VerificationError as exc:
        print(f"FAILED: {exc.check}: {exc.detail}", file=sys.stderr)
        return EXIT_FAILED
    except (UsageError, ConfigError) as exc:
        print(f"rxledger {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PyMongoError as exc:
        print(
            f"rxledger {args.command}: database unavailable: {_database_failure(exc)}",
            file=sys.stderr,
        )
        print(
            "check MONGODB_URI (or start the development database with `make db`)", file=sys.stderr
        )
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
