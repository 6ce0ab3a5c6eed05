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
    if response.status_code != 200:
        try:
            reason = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = response.text[:300]
        raise RemoteError(
            f"the log did not take the cosignature (HTTP {response.status_code}): {reason}"
        )
    witness.submitted = note
    published = response.json().get("published")
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
    witness = Witness(cosigner, log_key, state, origin)
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
            except RemoteError as exc:
                message, code = f"cannot reach the log: {exc}; retrying", EXIT_UNREACHABLE
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
