"""The keys the gateway derives from a log key, which outlive that key's use for signing.

Two secrets are keyed with the log's key (by default its signing key, RXLEDGER_SIGNING_KEY):

- the patient routing tags: HMAC-SHA256 under `tags` (app/policy.py, `Tags`), so entries hold
  no patient identifier;
- the webhook endpoint secrets at rest: AES-256-GCM under `webhooks` (app/webhooks.py,
  `SecretBox`), unless RXLEDGER_WEBHOOK_KEY names another key.

Both must stay the same for the life of the log, across key rotations: a patient's earlier
events must keep matching their subscriptions, and the secrets sealed before must keep opening.
After a rotation the old key signs nothing more, so it should leave the gateways: `rxledger
derive-keys --key OLD.pem --out FILE` writes both secrets to a file that RXLEDGER_TAG_KEY then
names instead of the old key. Each is a one-way hash of the key (SHA-256 and HKDF-SHA256 with
their own labels), so the file cannot sign a checkpoint or a receipt. The file:

    # rxledger keys derived from the log key <verifier key>: they sign nothing (rxledger derive-keys)
    tags <base64 of 32 bytes>
    webhooks <base64 of 32 bytes>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TAGS_LABEL = b"rxledger patient tag\n"
WEBHOOKS_INFO = b"rxledger webhook secrets v1"
FIELDS = ("tags", "webhooks")


@dataclass(frozen=True)
class DerivedKeys:
    tags: bytes  # the HMAC-SHA256 key of the patient routing tags
    webhooks: bytes  # the AES-256-GCM key webhook endpoint secrets are sealed under

    @classmethod
    def of_key(cls, key: bytes) -> DerivedKeys:
        """Those of a log key (its 32 raw private bytes)."""
        return cls(hashlib.sha256(TAGS_LABEL + key).digest(), webhook_key(key))

    def text(self, source: str) -> str:
        """The file `rxledger derive-keys` writes; `source` says what they were derived from."""
        return (
            f"# rxledger keys derived from {source}: they sign nothing (rxledger derive-keys)\n"
            f"tags {base64.b64encode(self.tags).decode()}\n"
            f"webhooks {base64.b64encode(self.webhooks).decode()}\n"
        )

    @classmethod
    def parse(cls, text: str) -> DerivedKeys:
        """Read what `text` wrote. Raises ValueError naming the first problem."""
        found: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in FIELDS or parts[0] in found:
                raise ValueError(f"line {number} must read `tags <base64>` or `webhooks <base64>`")
            try:
                value = base64.b64decode(parts[1], validate=True)
            except binascii.Error:
                raise ValueError(f"line {number}: {parts[0]} is not base64") from None
            if len(value) != 32:
                raise ValueError(f"line {number}: {parts[0]} holds {len(value)} bytes, not 32")
            found[parts[0]] = value
        missing = [f for f in FIELDS if f not in found]
        if missing:
            raise ValueError(f"no {' and no '.join(missing)} line")
        return cls(found["tags"], found["webhooks"])


def webhook_key(material: bytes) -> bytes:
    """The AES-256-GCM key endpoint secrets are sealed under, from key material (a log key's
    raw private bytes, or RXLEDGER_WEBHOOK_KEY): HKDF-SHA256."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=WEBHOOKS_INFO).derive(
        material
    )
