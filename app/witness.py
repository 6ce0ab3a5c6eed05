"""`rxledger witness`: the process that watches a log and cosigns its consistent checkpoints."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from anchoring.note import Verifier
from anchoring.proofs import consistency_proof
from anchoring.remote import RemoteError, RemoteLog
from anchoring.tiles import TileNotFound
from anchoring.witness import Cosigner, Refused, Witness

EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2


class LogRejected(Exception):
    """The log answered but did not take the cosignature."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def witness_once(witness: Witness, remote: RemoteLog) -> tuple[int, str | None]:
    """Fetch the log's newest checkpoint, cosign it if consistent and hand the cosignature
    back. Returns (checkpoint size, what the log answered: None when it was sent before).
    Raises Refused, or RemoteError when the log cannot be read."""
    body = await remote.get("next-checkpoint", missing_ok=True)
    note = body.decode(errors="replace") if body is not None else await remote.checkpoint()
    tiles = remote.tiles(cache_tiles=256)

    async def consistency(old: int, new: int) -> list[bytes]:
        try:
            return await consistency_proof(tiles, old, new, new)
        except TileNotFound as exc:
            raise RemoteError(f"the log's tiles for size {new} are incomplete: {exc}") from exc

    cosignature = await witness.witness(note, consistency)
    size = witness.state.size if witness.state else 0
    if witness.submitted == note:
        return size, None
    response = await remote.post("cosignature", note + cosignature.line)
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.status_code != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        reason = error.get("message") if isinstance(error, dict) else response.text[:300]
        raise LogRejected(f"HTTP {response.status_code}: {reason}")
    if witness.cosigner.name not in answer.get("cosignedBy", []):
        raise LogRejected(
            f"the log answered but did not keep the cosignature by {witness.cosigner.name}: is "
            "this witness's key in the log's RXLEDGER_WITNESSES?"
        )
    witness.submitted = note
    published = answer.get("published")
    return size, f"cosigned checkpoint {size}" + (" (published)" if published else "")


async def _run(
    cosigner: Cosigner,
    log_key: Verifier,
    url: str,
    state: Path,
    origin: str | None,
    interval: float,
    once: bool,
) -> int:
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
                message = answer or ""
                code = EXIT_OK
            except Refused as exc:
                message, code = f"REFUSED: {exc}", EXIT_REFUSED
            except LogRejected as exc:
                message, code = f"REJECTED by the log: {exc}", EXIT_UNREACHABLE
            except RemoteError as exc:
                retry = "" if once else f"; retrying every {interval:g} s"
                message, code = f"cannot reach the log: {exc}{retry}", EXIT_UNREACHABLE
            if message and message != said:
                _say(message)
                said = message
            if once:
                return code
            await asyncio.sleep(interval)


def run_witness(
    cosigner: Cosigner,
    log_key: Verifier,
    url: str,
    state: Path,
    origin: str | None,
    interval: float,
    once: bool,
) -> int:
    try:
        return asyncio.run(_run(cosigner, log_key, url, state, origin, interval, once))
    except KeyboardInterrupt:
        return EXIT_OK
