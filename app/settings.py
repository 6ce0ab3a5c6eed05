"""Configuration from environment variables (documented in the README)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from anchoring.anchorer import AnchorSettings
from anchoring.log import LogSettings
from anchoring.note import Signer, load_private_key, private_key_pem
from anchoring.sequencer import SequencerSettings

log = logging.getLogger("rxledger.settings")


class ConfigError(Exception):
    """A setting is missing or invalid; the message says which and what to do."""


def _env_float(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}={raw} must be a finite number of at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    mongodb_uri: str
    database: str
    notary_database: str
    mode: str
    origin: str
    key_name: str
    signing_key: Path | None
    var_dir: Path
    db_timeout_ms: int
    log: LogSettings

    @property
    def production(self) -> bool:
        return self.mode == "production"

    @classmethod
    def from_env(cls) -> Settings:
        mode = os.environ.get("RXLEDGER_MODE", "development")
        if mode not in ("development", "production"):
            raise ConfigError(f"RXLEDGER_MODE={mode!r} must be 'development' or 'production'")
        database = os.environ.get("RXLEDGER_DB", "rxledger")
        origin = os.environ.get("RXLEDGER_ORIGIN", "rxledger.local/log")
        key = os.environ.get("RXLEDGER_SIGNING_KEY")
        return cls(
            mongodb_uri=os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/"),
            database=database,
            notary_database=os.environ.get("RXLEDGER_NOTARY_DB", database),
            mode=mode,
            origin=origin,
            key_name=os.environ.get("RXLEDGER_KEY_NAME", origin.split("/")[0]),
            signing_key=Path(key) if key else None,
            var_dir=Path(os.environ.get("RXLEDGER_VAR_DIR", "var")),
            db_timeout_ms=int(_env_float("RXLEDGER_DB_TIMEOUT_MS", 5000, 100)),
            log=LogSettings(
                sequencer=SequencerSettings(
                    batch_size=int(_env_float("RXLEDGER_BATCH_SIZE", 1000, 1)),
                    lease_ttl=_env_float("RXLEDGER_LEASE_TTL", 5.0, 0.5),
                ),
                anchor=AnchorSettings(
                    interval=_env_float("RXLEDGER_CHECKPOINT_INTERVAL", 1.0, 0.01),
                    max_leaves=int(_env_float("RXLEDGER_CHECKPOINT_LEAVES", 1000, 1)),
                ),
            ),
        )

    def signer(self, create: bool = True) -> Signer:
        """The log's signing key: RXLEDGER_SIGNING_KEY, or in development a key under var/
        (created when missing and `create` is true)."""
        path = self.signing_key
        if path is None:
            if not create and not (self.var_dir / "keys" / "dev-log.pem").exists():
                raise ConfigError(
                    "no signing key configured: set RXLEDGER_SIGNING_KEY or pass --key"
                )
            if self.production:
                raise ConfigError(
                    "production mode needs RXLEDGER_SIGNING_KEY (a PEM Ed25519 key); create one with "
                    "`rxledger keygen --name NAME --out PATH`"
                )
            path = self.var_dir / "keys" / "dev-log.pem"
            if not path.exists():
                write_new_key(path)
                log.warning(
                    "development mode: created a new log signing key at %s (not for production)",
                    path,
                )
        try:
            return Signer(self.key_name, load_private_key(path.read_bytes()))
        except FileNotFoundError:
            raise ConfigError(f"RXLEDGER_SIGNING_KEY: no such file {path}") from None
        except ValueError as exc:
            raise ConfigError(f"signing key {path}: {exc}") from None


def write_new_key(path: Path, force: bool = False) -> Signer:
    """Create an Ed25519 key as PEM with mode 0600; refuses to overwrite unless forced."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_key_pem(key))
    os.chmod(path, 0o600)
    return Signer("unused", key)
