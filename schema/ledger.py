"""GraphQL types and the `ledger` query: checkpoints and proofs anyone may read."""

from __future__ import annotations

import datetime as dt
import json

import strawberry
from strawberry.types import Info

from anchoring import log as tlog
from anchoring.anchorer import SignedCheckpoint
from anchoring.encoding import b64
from anchoring.errors import ProofUnavailable
from anchoring.hashing import leaf_hash
from anchoring.log import TransparencyLog
from anchoring.receipt import Receipt as SignedReceipt
from app.limits import ClientError


@strawberry.type(
    description="A witness's C2SP tlog-cosignature/v1 on a checkpoint: it checked that the "
    "checkpoint is consistent with every earlier one it saw."
)
class Cosignature:
    witness: str = strawberry.field(description="the witness's key name")
    key_id: str = strawberry.field(
        description="8 hex digits: SHA-256(name ‖ 0x0A ‖ 0x04 ‖ key)[:4]"
    )
    cosigned_at: dt.datetime = strawberry.field(description="the timestamp the witness signed")
    line: str = strawberry.field(description="the signature line as it appears in the note")


@strawberry.type(
    description="One of the log's signing keys and the checkpoint sizes it signs, as the "
    "operator configured them (RXLEDGER_LOG_KEYS): after a key rotation, the old key keeps "
    "the sizes it signed and the new key signs from its first size on. Take the key set for "
    "verifying from the operator, not from the log you are checking."
)
class VerifierKey:
    key: str = strawberry.field(description="signed-note verifier key: <name>+<key ID>+<base64>")
    key_name: str
    key_id: str = strawberry.field(
        description="8 hex digits: SHA-256(name ‖ 0x0A ‖ 0x01 ‖ key)[:4]"
    )
    from_size: int = strawberry.field(description="the smallest checkpoint size it signs")
    until_size: int | None = strawberry.field(
        description="the largest checkpoint size it signs (inclusive); null: no end, it signs on"
    )
    current: bool = strawberry.field(description="whether it signs the next checkpoint")
    line: str = strawberry.field(
        description="this key as a line of a key set file (rxledger verify --key FILE)"
    )


@strawberry.type(description="A signed checkpoint (C2SP tlog-checkpoint) of the log.")
class Checkpoint:
    origin: str
    size: int
    root_hash: str = strawberry.field(description="base64 RFC 9162 root hash")
    note: str = strawberry.field(
        description="the full signed-note text: the log's signature, then any witnesses' "
        "cosignatures"
    )
    anchored_at: dt.datetime
    cosignatures: list[Cosignature] = strawberry.field(
        description="the witnesses' cosignatures stored with this checkpoint, each verified "
        "against RXLEDGER_WITNESSES when it arrived (the first of each witness is kept)"
    )

    @classmethod
    def of(cls, cp: SignedCheckpoint) -> Checkpoint:
        return cls(
            origin=cp.origin,
            size=cp.size,
            root_hash=b64(cp.root_hash),
            note=cp.witnessed_note,
            anchored_at=cp.anchored_at,
            cosignatures=[
                Cosignature(
                    witness=c.name,
                    key_id=c.key_id.hex(),
                    cosigned_at=dt.datetime.fromtimestamp(c.timestamp, dt.UTC),
                    line=c.line.rstrip("\n"),
                )
                for c in cp.cosignatures
            ],
        )


def bundle_json(proof: tlog.InclusionProof) -> str:
    """The proof bundle as compact JSON, the same bytes everywhere the API returns it."""
    return json.dumps(proof.bundle(), separators=(",", ":"))


@strawberry.type(description="RFC 9162 inclusion proof of one leaf in a checkpointed tree.")
class InclusionProof:
    leaf_index: int
    tree_size: int
    leaf_hash: str = strawberry.field(description="base64 SHA-256(0x00 ‖ leaf)")
    path: list[str] = strawberry.field(description="base64 sibling hashes, leaf to root")
    checkpoint: Checkpoint = strawberry.field(description="the signed checkpoint of treeSize")
    source: strawberry.Private[tlog.InclusionProof]

    @strawberry.field(
        description="the proof as the JSON bundle `rxledger verify BUNDLE --key KEY` checks "
        "offline: {leaf, leafIndex, treeSize, inclusionPath, checkpoint}"
    )
    def bundle(self) -> str:
        return bundle_json(self.source)  # only when asked for

    @classmethod
    def of(cls, proof: tlog.InclusionProof) -> InclusionProof:
        return cls(
            leaf_index=proof.leaf_index,
            tree_size=proof.tree_size,
            leaf_hash=b64(proof.leaf_hash),
            path=[b64(h) for h in proof.path],
            checkpoint=Checkpoint.of(proof.checkpoint),
            source=proof,
        )


@strawberry.type(description="RFC 9162 consistency proof between two tree sizes.")
class ConsistencyProof:
    from_size: int
    to_size: int
    path: list[str]


@strawberry.type(
    description="The log's signed promise for a leaf sequenced but not yet in a checkpoint: "
    "a signed note '<origin>\\nreceipt\\n<leaf index>\\n<base64 leaf hash>\\n<time>\\n' "
    "by the log key. Superseded by an inclusion proof once a checkpoint covers the leaf."
)
class Receipt:
    leaf_index: int
    leaf_hash: str
    issued_at: dt.datetime
    note: str

    @classmethod
    def of(cls, receipt: SignedReceipt) -> Receipt:
        return cls(
            leaf_index=receipt.leaf_index,
            leaf_hash=b64(receipt.leaf_hash),
            issued_at=receipt.issued_at,
            note=receipt.note,
        )


@strawberry.type(description="One leaf of the log.")
class LedgerEntry:
    leaf_index: int
    leaf: str = strawberry.field(description="base64 leaf bytes (RFC 8785 JSON of the header)")
    leaf_hash: str


@strawberry.type
class CheckpointEdge:
    cursor: str
    node: Checkpoint


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class CheckpointConnection:
    edges: list[CheckpointEdge]
    page_info: PageInfo


def _log(info: Info) -> TransparencyLog:
    log: TransparencyLog = info.context["log"]
    return log


def page_size(info: Info, first: int) -> int:
    maximum: int = info.context["max_page"]
    if not 1 <= first <= maximum:
        raise ClientError(f"first is {first}; it must be 1 to {maximum}", "BAD_USER_INPUT")
    return first


def non_negative(value: int | None, name: str) -> None:
    if value is not None and value < 0:
        raise ClientError(f"{name} is {value}; it must be 0 or more", "BAD_USER_INPUT")


@strawberry.type(description="The transparency log: checkpoints and proofs.")
class Ledger:
    @strawberry.field
    def origin(self, info: Info) -> str:
        return _log(info).origin

    @strawberry.field(
        description="signed-note verifier key: <name>+<key ID>+<base64 key>, of the key that "
        "signs now (after a key rotation, the new one: verifierKeys lists them all)"
    )
    def verifier_key(self, info: Info) -> str:
        return _log(info).verifier_key

    @strawberry.field(
        description="the log's current and past signing keys, each with the checkpoint sizes "
        "it signs, in the order of the key set"
    )
    def verifier_keys(self, info: Info) -> list[VerifierKey]:
        tlog_ = _log(info)
        current = tlog_.verifier_key
        return [
            VerifierKey(
                key=k.vkey,
                key_name=k.verifier.name,
                key_id=k.verifier.key_id.hex(),
                from_size=k.first,
                until_size=k.last,
                current=k.vkey == current,
                line=k.line(),
            )
            for k in tlog_.key_history()
        ]

    @strawberry.field(description="number of sequenced (published) leaves")
    async def size(self, info: Info) -> int:
        return await _log(info).published_size()

    @strawberry.field(
        description="the latest published checkpoint (with a witness quorum: the latest its "
        "witnesses cosigned)"
    )
    async def checkpoint(self, info: Info) -> Checkpoint | None:
        cp = await _log(info).latest_checkpoint()
        return None if cp is None else Checkpoint.of(cp)

    @strawberry.field(
        description="published checkpoints, oldest first (not one still waiting for its "
        "witnesses); the cursor is a tree size"
    )
    async def checkpoints(
        self, info: Info, first: int = 20, after: str | None = None
    ) -> CheckpointConnection:
        first = page_size(info, first)
        after_size = -1
        if after is not None:
            if not after.isdigit():
                raise ClientError(f"after {after[:40]!r} is not a tree size", "BAD_USER_INPUT")
            after_size = int(after)
        cps = await _log(info).checkpoints(after_size, first + 1)
        edges = [CheckpointEdge(cursor=str(cp.size), node=Checkpoint.of(cp)) for cp in cps[:first]]
        return CheckpointConnection(
            edges=edges,
            page_info=PageInfo(
                has_next_page=len(cps) > first, end_cursor=edges[-1].cursor if edges else None
            ),
        )

    @strawberry.field(description="a leaf of the log by index (null beyond the published size)")
    async def entry(self, info: Info, leaf_index: int) -> LedgerEntry | None:
        non_negative(leaf_index, "leafIndex")
        log = _log(info)
        if leaf_index >= await log.published_size():
            return None
        doc = await log.entry(leaf_index)
        if doc is None:
            return None
        leaf = bytes(doc["leaf"])
        return LedgerEntry(leaf_index=leaf_index, leaf=b64(leaf), leaf_hash=b64(leaf_hash(leaf)))

    @strawberry.field(description="treeSize defaults to the latest checkpoint's")
    async def inclusion_proof(
        self, info: Info, leaf_index: int, tree_size: int | None = None
    ) -> InclusionProof:
        non_negative(leaf_index, "leafIndex")
        non_negative(tree_size, "treeSize")
        try:
            proof = await _log(info).inclusion_proof(leaf_index, tree_size)
        except ProofUnavailable as exc:
            raise ClientError(str(exc), "PROOF_UNAVAILABLE") from None
        return InclusionProof.of(proof)

    @strawberry.field(description="toSize defaults to the latest checkpoint's")
    async def consistency_proof(
        self, info: Info, from_size: int, to_size: int | None = None
    ) -> ConsistencyProof:
        non_negative(from_size, "fromSize")
        non_negative(to_size, "toSize")
        try:
            old, new, path = await _log(info).consistency_proof(from_size, to_size)
        except ProofUnavailable as exc:
            raise ClientError(str(exc), "PROOF_UNAVAILABLE") from None
        return ConsistencyProof(from_size=old, to_size=new, path=[b64(h) for h in path])
