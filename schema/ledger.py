"""GraphQL types and the `ledger` query: checkpoints and proofs anyone may read."""

from __future__ import annotations

import datetime as dt

import strawberry
from strawberry.types import Info

from anchoring.anchorer import SignedCheckpoint
from anchoring.encoding import b64
from anchoring.log import TransparencyLog


@strawberry.type(description="A signed checkpoint (C2SP tlog-checkpoint) of the log.")
class Checkpoint:
    origin: str
    size: int
    root_hash: str = strawberry.field(description="base64 RFC 9162 root hash")
    note: str = strawberry.field(description="the full signed-note text")
    anchored_at: dt.datetime

    @classmethod
    def of(cls, cp: SignedCheckpoint) -> Checkpoint:
        return cls(
            origin=cp.origin,
            size=cp.size,
            root_hash=b64(cp.root_hash),
            note=cp.note,
            anchored_at=cp.anchored_at,
        )


@strawberry.type(description="RFC 9162 inclusion proof of one leaf in a checkpointed tree.")
class InclusionProof:
    leaf_index: int
    tree_size: int
    leaf_hash: str
    path: list[str]
    checkpoint: Checkpoint


@strawberry.type(description="RFC 9162 consistency proof between two tree sizes.")
class ConsistencyProof:
    from_size: int
    to_size: int
    path: list[str]


def _log(info: Info) -> TransparencyLog:
    log: TransparencyLog = info.context["log"]
    return log


@strawberry.type(description="The transparency log: checkpoints and proofs.")
class Ledger:
    @strawberry.field
    def origin(self, info: Info) -> str:
        return _log(info).origin

    @strawberry.field(description="signed-note verifier key: <name>+<key ID>+<base64 key>")
    def verifier_key(self, info: Info) -> str:
        return _log(info).verifier_key

    @strawberry.field(description="number of sequenced (published) leaves")
    async def size(self, info: Info) -> int:
        return await _log(info).published_size()

    @strawberry.field(description="the latest signed checkpoint")
    async def checkpoint(self, info: Info) -> Checkpoint | None:
        cp = await _log(info).latest_checkpoint()
        return None if cp is None else Checkpoint.of(cp)

    @strawberry.field
    async def inclusion_proof(
        self, info: Info, leaf_index: int, tree_size: int | None = None
    ) -> InclusionProof:
        proof = await _log(info).inclusion_proof(leaf_index, tree_size)
        return InclusionProof(
            leaf_index=proof.leaf_index,
            tree_size=proof.tree_size,
            leaf_hash=b64(proof.leaf_hash),
            path=[b64(h) for h in proof.path],
            checkpoint=Checkpoint.of(proof.checkpoint),
        )

    @strawberry.field
    async def consistency_proof(
        self, info: Info, from_size: int, to_size: int | None = None
    ) -> ConsistencyProof:
        old, new, path = await _log(info).consistency_proof(from_size, to_size)
        return ConsistencyProof(from_size=old, to_size=new, path=[b64(h) for h in path])


@strawberry.type
class Query:
    @strawberry.field(description="the transparency log; readable without authentication")
    def ledger(self) -> Ledger:
        return Ledger()


schema = strawberry.Schema(query=Query)
