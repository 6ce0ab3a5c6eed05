"""A separate OS process appending events through its own TransparencyLog (for tests).

It waits for --go (a file) to exist, so that several processes append at the same time, then
appends --subjects subjects x --versions versions (one coroutine per subject, versions in
order; --versions 0 appends until killed) and prints one JSON line per acknowledged append:
{"id": "<event id hex>", "subject": ..., "version": ...}. It ends with {"done": true}.
With --sequence it runs the sequencer too (the lease decides who sequences).

usage: appender.py --uri URI --db DB --origin ORIGIN --key KEY_FILE --key-name NAME
                   --prefix P --subjects N --versions M --go GO_FILE [--sequence] [--pause S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pymongo import AsyncMongoClient  # noqa: E402

from anchoring.anchorer import AnchorSettings  # noqa: E402
from anchoring.log import LogSettings, TransparencyLog  # noqa: E402
from anchoring.note import Signer, load_private_key  # noqa: E402
from anchoring.sequencer import SequencerSettings  # noqa: E402
from anchoring.store import LogStore  # noqa: E402

SETTINGS = LogSettings(
    sequencer=SequencerSettings(poll_interval=0.02, lease_ttl=1.5, orphan_grace=2.0),
    anchor=AnchorSettings(interval=0.2, max_leaves=100),
)


def emit(doc: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> int:
    client: AsyncMongoClient[dict] = AsyncMongoClient(
        args.uri, serverSelectionTimeoutMS=5000, tz_aware=True
    )
    signer = Signer(args.key_name, load_private_key(Path(args.key).read_bytes()))
    tlog = TransparencyLog(LogStore(client[args.db], args.origin), signer, SETTINGS)
    await tlog.start(sequence=args.sequence)
    emit({"ready": True, "holder": tlog.sequencer.holder})
    deadline = time.monotonic() + 30
    while not os.path.exists(args.go):
        if time.monotonic() > deadline:
            emit({"error": "no go signal"})
            return 3
        await asyncio.sleep(0.01)

    async def one_subject(subject: str) -> None:
        version = 1
        while args.versions == 0 or version <= args.versions:
            header = {"v": 1, "subject": subject, "version": version, "type": "TEST"}
            appended = await tlog.append(subject, version, header)
            emit({"id": str(appended.event_id), "subject": subject, "version": version})
            version += 1
            if args.pause:
                await asyncio.sleep(args.pause)

    try:
        await asyncio.gather(*[one_subject(f"{args.prefix}-{i}") for i in range(args.subjects)])
    finally:
        await tlog.stop()
        await client.close()
    emit({"done": True})
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--uri", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--origin", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--key-name", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--subjects", type=int, required=True)
    p.add_argument("--versions", type=int, required=True)
    p.add_argument("--go", required=True)
    p.add_argument("--sequence", action="store_true")
    p.add_argument("--pause", type=float, default=0.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
