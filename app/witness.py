"""`rxledger witness`: the process that watches a log and cosigns its consistent checkpoints.

It treats the log as possibly hostile: whatever the log answers, the witness neither cosigns
an inconsistent checkpoint nor stops watching (except with --once, which exits with the
outcome: 0 cosigned, 1 refused, 2 the log could not be read or did not take the cosignature).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

from anchoring.cosignature import Cosigner
from anchoring.keys import KeySet
from anchoring.note import format_signature, split_note
from anchoring.proofs import consistency_proof
from anchoring.remote import RemoteError, RemoteLog, printable
from anchoring.tiles import TileCorrupt, TileNotFound
from anchoring.witness import Refused, Witness

log = logging.getLogger("rxledger.witness")

EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2


class LogRejected(Exception):
    """The log answered but did not take the cosignature."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def witness_once(witness: Witness, remote: RemoteLog) -> tuple[int, str | None]:
    """Fetch the log's newest checkpoint, cosign it if consistent and hand the cosignature
    back. Returns (checkpoint size, what happened: None when this checkpoint was handed back
    before and the log shows it). Raises Refused, LogRejected, or RemoteError when the log
    cannot be read."""
    note = await remote.checkpoint("next-checkpoint", missing_ok=True)
    if note is None:  # a log that does not wait for witnesses: its published checkpoint
        note = await remote.checkpoint()
    assert note is not None
    tiles = remote.tiles(cache_tiles=256)

    async def consistency(old: int, new: int) -> list[bytes]:
        try:
            return await consistency_proof(tiles, old, new, new)
        except (TileNotFound, TileCorrupt) as exc:
            raise RemoteError(f"the log's tiles for size {new} cannot be read: {exc}") from exc

    cosignature = await witness.witness(note, consistency)
    size = witness.state.size if witness.state else 0
    text, signatures = split_note(note)  # its lines change as witnesses add theirs
    ours = (cosignature.name, cosignature.key_id)
    shown = any((name, raw[:4]) == ours for name, raw in signatures)
    if witness.submitted == text and shown:
        return size, None
    # Sent again when the log shows the checkpoint without it: the log lost it (a lost write,
    # a restored backup) or serves a note older than it (then the log keeps the first).
    # The note as fetched may carry an earlier cosignature of ours: send this one instead.
    others = "".join(
        format_signature(name, raw) for name, raw in signatures if (name, raw[:4]) != ours
    )
    status, body = await remote.post("cosignature", f"{text}\n{others}{cosignature.line}")
    answer = _json_object(body)
    if status != 200:
        error = answer.get("error")
        reason = error.get("message") if isinstance(error, dict) else None
        raise LogRejected(
            f"HTTP {status}: {printable(str(reason or body.decode(errors='replace')))}"
        )
    cosigned_by = answer.get("cosignedBy")
    if not isinstance(cosigned_by, list) or witness.cosigner.name not in cosigned_by:
        raise LogRejected(
            f"the log answered but did not keep the cosignature by {witness.cosigner.name}: is "
            "this witness's key in the log's RXLEDGER_WITNESSES?"
        )
    witness.submitted = text
    published = answer.get("published") is True
    return size, f"cosigned checkpoint {size}" + (" (published)" if published else "")


def _json_object(body: bytes) -> dict[str, object]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


async def run_witness(
    cosigner: Cosigner,
    log_key: KeySet,
    url: str,
    state: Path,
    origin: str | None,
    interval: float,
    once: bool,
) -> int:
    """Watch the log at `url` every `interval` seconds (once with `once`); the exit code."""
    try:
        witness = Witness(cosigner, log_key, state, origin)
    except (ValueError, OSError) as exc:
        _say(f"rxledger witness: --state {state}: {exc}; fix or move the file")
        return EXIT_UNREACHABLE
    last = f"size {witness.state.size}" if witness.state else "nothing yet"
    _say(
        f"witness {cosigner.name} ({cosigner.verifier_key}) watching {url}; "
        f"state {state}: cosigned {last}"
    )
    said = ""
    async with RemoteLog(url) as remote:
        while True:
            try:
                _, answer = await witness_once(witness, remote)
                said_by = f"; the log's signature by {witness.signed_by}" if answer else ""
                message, code = (answer or "") + said_by, EXIT_OK
            except Refused as exc:
                message, code = f"REFUSED: {exc}", EXIT_REFUSED
            except LogRejected as exc:
                message, code = f"REJECTED by the log: {exc}", EXIT_UNREACHABLE
            except RemoteError as exc:
                retry = "" if once else f"; retrying every {interval:g} s"
                message, code = f"cannot reach the log: {exc}{retry}", EXIT_UNREACHABLE
            except Exception as exc:  # a hostile answer we did not foresee: keep watching
                log.debug("witness: unexpected error", exc_info=True)
                message = f"unexpected error: {type(exc).__name__}: {printable(str(exc))}"
                code = EXIT_UNREACHABLE
            if message and message != said:
                _say(message)
                said = message
            if once:
                return code
            await asyncio.sleep(interval)
