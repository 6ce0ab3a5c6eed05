"""The log's keys over time: which verifier key may sign the checkpoints of which tree sizes.

A key set is text, one key a line (the file `rxledger verify --key`, the witnesses and the
log itself read):

    # comments (from a # at the start or after a space) and blank lines are ignored
    <verifier key>                      signs checkpoints of every size
    <verifier key> <first>..            signs sizes first and above
    <verifier key> <first>..<last>      signs sizes first to last (inclusive): a retired key

A rotation is two lines whose ranges overlap: during the overlap every checkpoint carries both
signatures (the transition), after the old key's `last` only the new key's. The ranges come
from configuration or from whoever hands the file to a verifier, never from the database: a
database writer cannot add a key, and a checkpoint signed only by a retired key beyond its
`last` (a stolen old key) is refused. Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from anchoring.note import (
    MAX_TREE_SIZE,
    Checkpoint,
    Verifier,
    parse_checkpoint,
    parse_verifier_key,
    split_note,
    verifier_key_string,
)
from anchoring.verify import (
    BAD_SIGNATURE,
    MALFORMED,
    ORIGIN_MISMATCH,
    UNKNOWN_KEY,
    VerificationError,
)

RETIRED_KEY = "key out of range"

_RANGE = re.compile(r"(0|[1-9][0-9]*)\.\.(0|[1-9][0-9]*)?")
_COMMENT = re.compile(r"(^|\s)#.*$")


@dataclass(frozen=True)
class LogKey:
    """A verifier key and the checkpoint sizes it may sign: `first` to `last` inclusive
    (`last` None: no end yet)."""

    verifier: Verifier
    vkey: str
    first: int = 0
    last: int | None = None

    def covers(self, size: int) -> bool:
        return self.first <= size and (self.last is None or size <= self.last)

    @property
    def label(self) -> str:
        """`name+keyid` as reports name the key."""
        return f"{self.verifier.name}+{self.verifier.key_id.hex()}"

    @property
    def range_text(self) -> str:
        return f"{self.first}..{'' if self.last is None else self.last}"

    def line(self) -> str:
        """This key as a line of a key set file."""
        if self.first == 0 and self.last is None:
            return self.vkey
        return f"{self.vkey} {self.range_text}"


@dataclass(frozen=True)
class SignedBy:
    """A checkpoint that verified, and the keys whose signatures on it count."""

    checkpoint: Checkpoint
    keys: tuple[LogKey, ...]
    text: str  # the note's text, without its signatures

    @property
    def labels(self) -> str:
        return ", ".join(k.label for k in self.keys)


class KeySet:
    """The log's keys, each with its range of sizes."""

    def __init__(self, keys: list[LogKey]) -> None:
        if not keys:
            raise VerificationError(MALFORMED, "a key set needs at least one verifier key")
        seen: set[tuple[str, bytes]] = set()
        for key in keys:
            ident = (key.verifier.name, key.verifier.key_id)
            if ident in seen:
                raise VerificationError(MALFORMED, f"key {key.label} is listed twice")
            seen.add(ident)
        self.keys = tuple(keys)
        self._by_id = {(k.verifier.name, k.verifier.key_id): k for k in keys}

    @classmethod
    def single(cls, verifier: Verifier, vkey: str) -> KeySet:
        """One key for every size: the key set of a log that never rotated."""
        return cls([LogKey(verifier, vkey)])

    @classmethod
    def of(cls, keys: KeySet | list[Verifier]) -> KeySet:
        """`keys` as a key set: a list of verifiers is one key for every size each."""
        if isinstance(keys, KeySet):
            return keys
        return cls([LogKey(v, verifier_key_of(v)) for v in keys])

    def text(self) -> str:
        return "".join(k.line() + "\n" for k in self.keys)

    def for_size(self, size: int) -> list[LogKey]:
        """The keys that may sign the checkpoint of `size`, in file order."""
        return [k for k in self.keys if k.covers(size)]

    def find(self, name: str, key_id: bytes) -> LogKey | None:
        return self._by_id.get((name, key_id))

    @property
    def verifiers(self) -> list[Verifier]:
        return [k.verifier for k in self.keys]

    def open_checkpoint(self, note: str, origin: str | None = None) -> SignedBy:
        """Verify a signed checkpoint against the keys in force at its size, and parse it.

        Signatures by keys not in the set are ignored. Raises VerificationError: MALFORMED,
        BAD_SIGNATURE (a listed key's signature does not verify), UNKNOWN_KEY (no listed key
        signed), RETIRED_KEY (only keys whose range excludes this size signed), ORIGIN_MISMATCH.
        """
        text, signatures = split_note(note)
        valid: list[LogKey] = []
        for name, raw in signatures:
            key = self.find(name, raw[:4])
            if key is None:
                continue
            if not key.verifier.verify(text.encode(), raw[4:]):
                raise VerificationError(
                    BAD_SIGNATURE, f"signature by {name} ({raw[:4].hex()}) does not verify"
                )
            valid.append(key)
        if not valid:
            names = ", ".join(k.label for k in self.keys)
            raise VerificationError(UNKNOWN_KEY, f"note is not signed by a log key ({names})")
        cp = parse_checkpoint(text)
        in_force = tuple(k for k in valid if k.covers(cp.size))
        if not in_force:
            found = ", ".join(f"{k.label} (sizes {k.range_text})" for k in valid)
            raise VerificationError(
                RETIRED_KEY,
                f"checkpoint of size {cp.size} is signed only by {found}: no key in force at "
                "that size signed it",
            )
        if origin is not None and cp.origin != origin:
            raise VerificationError(
                ORIGIN_MISMATCH, f"checkpoint origin {cp.origin!r}, want {origin!r}"
            )
        return SignedBy(cp, in_force, text)


def verifier_key_of(verifier: Verifier) -> str:
    """The verifier key string of `verifier` (an Ed25519 note key)."""
    raw = verifier.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return verifier_key_string(verifier.name, raw)


def parse_key_line(line: str) -> LogKey:
    """One line of a key set: a verifier key, optionally followed by `first..` or
    `first..last`. Raises VerificationError(MALFORMED)."""
    fields = line.split()
    if not 1 <= len(fields) <= 2:
        raise VerificationError(
            MALFORMED, f"key line must read <verifier key> [<first>..[<last>]]: {line!r:.80}"
        )
    verifier = parse_verifier_key(fields[0])
    if len(fields) == 1:
        return LogKey(verifier, fields[0])
    match = _RANGE.fullmatch(fields[1])
    if match is None:
        raise VerificationError(
            MALFORMED, f"key range {fields[1]!r:.40} must read <first>.. or <first>..<last>"
        )
    first = int(match.group(1))
    last = None if match.group(2) is None else int(match.group(2))
    if first > MAX_TREE_SIZE or (last is not None and not first <= last <= MAX_TREE_SIZE):
        raise VerificationError(
            MALFORMED, f"key range {fields[1]} must have first <= last <= 2^64 - 1"
        )
    return LogKey(verifier, fields[0], first, last)


def parse_key_set(text: str) -> KeySet:
    """A key set from its text (see the module docstring). Raises VerificationError(MALFORMED)
    naming the line that does not parse."""
    keys: list[LogKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        try:
            keys.append(parse_key_line(line))
        except VerificationError as exc:
            raise VerificationError(MALFORMED, f"line {number}: {exc.detail}") from None
    return KeySet(keys)
