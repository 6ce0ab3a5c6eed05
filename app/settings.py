"""Configuration from environment variables (documented in docs/operations.md, "Configuration").

RXLEDGER_MODE is `development` or `production`. Unset, it is development, and every process that
serves or signs (`rxledger serve`, `rxledger sequence`) says so in a WARNING line at start-up
(`announce_mode`); `make run` sets it to development explicitly.

Browser apps on other origins (parsed and checked in app/cors.py, which documents them):
RXLEDGER_CORS_ORIGINS, comma-separated origins allowed over CORS and on WebSocket upgrades
(unset: none in production, the local GraphiQL origins in development), and
RXLEDGER_CORS_MAX_AGE, the seconds a browser may cache a preflight (default 600).

The log's keys (rotation: docs/operations.md, "Rotating the log key"):
RXLEDGER_SIGNING_KEY, the log's Ed25519 private key (PEM; in development created under
RXLEDGER_VAR_DIR when unset), named RXLEDGER_KEY_NAME (default: the origin's host);
RXLEDGER_NEXT_SIGNING_KEY, the private key (PEM) rotated to, named RXLEDGER_KEY_NAME too;
RXLEDGER_LOG_KEYS, a key set file (anchoring.keys: one verifier key a line, each with the
checkpoint sizes it signs, `rxledger rotate-key` writes it). Unset, the signing key signs every
size. Set, the log signs each checkpoint with every configured key in force at its size and
trusts stored checkpoints only when such a key signed them; both private keys must be listed.
RXLEDGER_TAG_KEY, what the patient routing tags and the webhook secrets at rest are keyed with
(app/derived_keys.py; default: RXLEDGER_SIGNING_KEY): the log's first key file, or better the
file `rxledger derive-keys --key FIRST.pem` wrote, which signs nothing. Set it before
RXLEDGER_SIGNING_KEY changes, or a patient's earlier events no longer match their subscriptions
and filters, and the webhook endpoints' secrets no longer open.

MONGODB_PASSWORD_FILE names a file (a Docker secret) holding the password of the user that
MONGODB_URI names (`mongodb://rxledger@host/...`), so that no password sits in the environment;
it is percent-encoded into the URI (`mongodb_uri_with_password`).

Partner webhooks (app/webhooks.py; docs/partners.md):

RXLEDGER_WEBHOOK_ALLOW_PRIVATE (0 or 1; default 0)
    1 lets endpoints be on loopback, private, link-local or metadata addresses (development and
    tests); otherwise such a URL is refused when created, and a delivery connects only to an
    address checked when its host was resolved (at most 30 s before: DNS rebinding is no way in).
RXLEDGER_WEBHOOK_KEY (base64 of at least 32 bytes; default: derived from the log's key,
RXLEDGER_TAG_KEY's or else the signing key's: app/derived_keys.py)
    The key endpoint secrets are encrypted under (AES-256-GCM, the key through HKDF-SHA256).
    Changing it, or when it is unset the key it is derived from, makes the stored secrets
    unreadable: rotate every endpoint's secret after such a change.
RXLEDGER_WEBHOOK_TIMEOUT (seconds > 0; default 10)
    How long one delivery may take, connection to response headers and body.
RXLEDGER_WEBHOOK_RETRY_SCHEDULE (comma-separated seconds; default 5,30,120,600,3600,14400)
    The waits before each retry of a failed delivery (each lengthened by up to 25 % of jitter);
    after the last one the endpoint is FAILING until replayWebhooks or enableWebhookEndpoint.
RXLEDGER_WEBHOOK_LEASE_TTL (seconds >= 0.5; default 10)
    How long a process's lease on an endpoint lasts without renewal, and its heartbeat (at
    least 3 scan intervals): a crashed process's endpoints are taken over after at most this
    long. Each process holds at most its share of the endpoints (ceil(active endpoints /
    processes with a live heartbeat)).
RXLEDGER_WEBHOOK_SCAN_INTERVAL (seconds >= 0.01; default 1)
    How often each process reads the endpoints to find those it should deliver to.
"""

from __future__ import annotations

import base64
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from anchoring.anchorer import AnchorSettings
from anchoring.cosignature import parse_witness_keys
from anchoring.dialect import DialectError
from anchoring.dialect import forced as forced_dialect
from anchoring.keys import KeySet, parse_key_set
from anchoring.log import LogSettings
from anchoring.note import Signer, Verifier, load_private_key, private_key_pem
from anchoring.sequencer import SequencerSettings
from anchoring.verify import VerificationError
from app.derived_keys import DerivedKeys

log = logging.getLogger("rxledger.settings")


class ConfigError(Exception):
    """A setting is missing or invalid; the message says which and what to do."""


def mongodb_uri_with_password(uri: str, password_file: str | None) -> str:
    """`uri` with the password read from `password_file` (one line; a trailing newline is
    dropped) put after the user it names. Without a file, `uri` as it is. Raises ConfigError
    when the file cannot be read or is empty, or when the URI names no user or has a password."""
    if not password_file:
        return uri
    try:
        password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"MONGODB_PASSWORD_FILE={password_file}: {exc}") from None
    if not password:
        raise ConfigError(f"MONGODB_PASSWORD_FILE={password_file} is empty")
    scheme, sep, rest = uri.partition("://")
    userinfo, at, hosts = rest.partition("@")
    if not sep or not at or not userinfo or "/" in userinfo:
        raise ConfigError(
            "MONGODB_PASSWORD_FILE needs a MONGODB_URI that names its user, e.g. "
            "mongodb://rxledger@mongo-1:27017/?replicaSet=rs0"
        )
    if ":" in userinfo:
        raise ConfigError(
            "MONGODB_URI has a password and MONGODB_PASSWORD_FILE is set: keep only the file"
        )
    return f"{scheme}://{userinfo}:{quote(password, safe='')}@{hosts}"


def env_number(name: str, default: float, minimum: float, integer: bool = False) -> float:
    """A number from the environment variable `name` (its default when unset or empty).
    Raises ConfigError naming the variable when it is not a finite number of at least
    `minimum` (or, with `integer`, not an integer)."""
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    kind = "an integer" if integer else "a number"
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}={raw} must be {kind} of at least {minimum}")
    return value


def _witnesses(raw: str) -> tuple[Verifier, ...]:
    """RXLEDGER_WITNESSES: witness verifier keys (cosignature/v1)."""
    try:
        return tuple(parse_witness_keys(raw))
    except VerificationError as exc:
        raise ConfigError(
            f"RXLEDGER_WITNESSES: {exc.detail} (a witness's verifier key reads "
            "<name>+<hex id>+<base64(0x04 ‖ key)>; `rxledger witness --key FILE --name NAME "
            "--print-key` prints it)"
        ) from None


DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 3600.0, 14400.0)


@dataclass(frozen=True)
class WebhookSettings:
    allow_private: bool = False
    key: bytes | None = None  # None: derived from the log signing key
    timeout: float = 10.0
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    lease_ttl: float = 10.0
    scan_interval: float = 1.0

    @classmethod
    def from_env(cls) -> WebhookSettings:
        raw_private = os.environ.get("RXLEDGER_WEBHOOK_ALLOW_PRIVATE", "").strip()
        if raw_private not in ("", "0", "1"):
            raise ConfigError(f"RXLEDGER_WEBHOOK_ALLOW_PRIVATE={raw_private!r} must be 0 or 1")
        raw_key = os.environ.get("RXLEDGER_WEBHOOK_KEY", "").strip()
        key = None
        if raw_key:
            try:
                key = base64.b64decode(raw_key, validate=True)
            except ValueError:
                raise ConfigError("RXLEDGER_WEBHOOK_KEY is not base64") from None
            if len(key) < 32:
                raise ConfigError(
                    f"RXLEDGER_WEBHOOK_KEY holds {len(key)} bytes; it needs at least 32"
                )
        raw_schedule = os.environ.get("RXLEDGER_WEBHOOK_RETRY_SCHEDULE", "").strip()
        schedule = DEFAULT_RETRY_SCHEDULE
        if raw_schedule:
            try:
                schedule = tuple(float(part) for part in raw_schedule.split(","))
            except ValueError:
                raise ConfigError(
                    f"RXLEDGER_WEBHOOK_RETRY_SCHEDULE={raw_schedule!r} is not a comma-separated "
                    "list of seconds (e.g. 5,30,120)"
                ) from None
            if not all(math.isfinite(s) and s >= 0 for s in schedule):
                raise ConfigError(
                    f"RXLEDGER_WEBHOOK_RETRY_SCHEDULE={raw_schedule!r}: every wait must be a "
                    "finite number of seconds >= 0"
                )
        timeout = env_number("RXLEDGER_WEBHOOK_TIMEOUT", 10.0, 0.001)
        return cls(
            allow_private=raw_private == "1",
            key=key,
            timeout=timeout,
            retry_schedule=schedule,
            lease_ttl=env_number("RXLEDGER_WEBHOOK_LEASE_TTL", 10.0, 0.5),
            scan_interval=env_number("RXLEDGER_WEBHOOK_SCAN_INTERVAL", 1.0, 0.01),
        )


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
    mode_is_default: bool = False  # RXLEDGER_MODE was not set
    # How long a database call waits for the server's reply (pymongo's socketTimeoutMS): a
    # connection that stops answering (a network black hole) fails its call instead of
    # holding the sequencer, an append or a request forever.
    db_reply_timeout_ms: int = 60_000
    next_signing_key: Path | None = None  # RXLEDGER_NEXT_SIGNING_KEY
    log_keys: Path | None = None  # RXLEDGER_LOG_KEYS
    tag_key_file: Path | None = None  # RXLEDGER_TAG_KEY

    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    @property
    def production(self) -> bool:
        return self.mode == "production"

    @classmethod
    def from_env(cls) -> Settings:
        raw_mode = os.environ.get("RXLEDGER_MODE")
        mode = "development" if raw_mode is None else raw_mode
        if mode not in ("development", "production"):
            raise ConfigError(f"RXLEDGER_MODE={mode!r} must be 'development' or 'production'")
        database = os.environ.get("RXLEDGER_DB", "rxledger")
        origin = os.environ.get("RXLEDGER_ORIGIN", "rxledger.local/log")
        key = os.environ.get("RXLEDGER_SIGNING_KEY")
        witnesses = _witnesses(os.environ.get("RXLEDGER_WITNESSES", ""))
        quorum = int(env_number("RXLEDGER_WITNESS_QUORUM", 0, 0, integer=True))
        try:
            forced_dialect()  # RXLEDGER_STORAGE_DIALECT, read where the storage reads it
        except DialectError as exc:
            raise ConfigError(str(exc)) from None
        if quorum > len(witnesses):
            raise ConfigError(
                f"RXLEDGER_WITNESS_QUORUM={quorum} needs at least {quorum} witness keys in "
                f"RXLEDGER_WITNESSES; it has {len(witnesses)}"
            )
        return cls(
            mongodb_uri=mongodb_uri_with_password(
                os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/"),
                os.environ.get("MONGODB_PASSWORD_FILE"),
            ),
            database=database,
            notary_database=os.environ.get("RXLEDGER_NOTARY_DB", database),
            mode=mode,
            origin=origin,
            key_name=os.environ.get("RXLEDGER_KEY_NAME", origin.split("/")[0]),
            signing_key=Path(key) if key else None,
            var_dir=Path(os.environ.get("RXLEDGER_VAR_DIR", "var")),
            db_timeout_ms=int(env_number("RXLEDGER_DB_TIMEOUT_MS", 5000, 100)),
            db_reply_timeout_ms=int(env_number("RXLEDGER_DB_REPLY_TIMEOUT_MS", 60_000, 100)),
            log=LogSettings(
                sequencer=SequencerSettings(
                    batch_size=int(env_number("RXLEDGER_BATCH_SIZE", 4096, 1)),
                    lease_ttl=env_number("RXLEDGER_LEASE_TTL", 5.0, 0.5),
                ),
                anchor=AnchorSettings(
                    interval=env_number("RXLEDGER_CHECKPOINT_INTERVAL", 1.0, 0.01),
                    max_leaves=int(env_number("RXLEDGER_CHECKPOINT_LEAVES", 1000, 1)),
                ),
                witnesses=witnesses,
                quorum=quorum,
                witness_hold=env_number("RXLEDGER_WITNESS_HOLD", 30.0, 0.0),
            ),
            mode_is_default=raw_mode is None,
            next_signing_key=_path(os.environ.get("RXLEDGER_NEXT_SIGNING_KEY")),
            log_keys=_path(os.environ.get("RXLEDGER_LOG_KEYS")),
            tag_key_file=_path(os.environ.get("RXLEDGER_TAG_KEY")),
            webhooks=WebhookSettings.from_env(),
        )

    def next_signer(self) -> Signer | None:
        """The key rotated to (RXLEDGER_NEXT_SIGNING_KEY), if any."""
        if self.next_signing_key is None:
            return None
        return _load_signer(self.key_name, self.next_signing_key, "RXLEDGER_NEXT_SIGNING_KEY")

    def derived_keys(self, signer: Signer) -> DerivedKeys:
        """The keys of the patient routing tags and of the webhook secrets at rest
        (app/derived_keys.py): from RXLEDGER_TAG_KEY, a private key (PEM) or the file `rxledger
        derive-keys` wrote; unset, from `signer` (the log's signing key). Raises ConfigError."""
        if self.tag_key_file is None:
            return DerivedKeys.of_key(signer.private_key.private_bytes_raw())
        try:
            text = self.tag_key_file.read_text()
        except FileNotFoundError:
            raise ConfigError(f"RXLEDGER_TAG_KEY: no such file {self.tag_key_file}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"RXLEDGER_TAG_KEY: cannot read {self.tag_key_file}: {exc}") from None
        if "-----BEGIN" in text:
            key = _load_signer("tag", self.tag_key_file, "RXLEDGER_TAG_KEY").private_key
            return DerivedKeys.of_key(key.private_bytes_raw())
        try:
            return DerivedKeys.parse(text)
        except ValueError as exc:
            raise ConfigError(
                f"RXLEDGER_TAG_KEY {self.tag_key_file} is neither a private key (PEM) nor a file "
                f"`rxledger derive-keys` wrote: {exc}"
            ) from None

    def key_set(self, signer: Signer, next_signer: Signer | None) -> KeySet | None:
        """The log's key set (RXLEDGER_LOG_KEYS), checked to list `signer` and `next_signer`;
        None when unset (`signer` signs every size). Raises ConfigError."""
        if self.log_keys is None:
            if next_signer is not None:
                raise ConfigError(
                    "RXLEDGER_NEXT_SIGNING_KEY needs RXLEDGER_LOG_KEYS, the key set saying from "
                    "which checkpoint size it signs; write it with `rxledger rotate-key`"
                )
            return None
        try:
            keys = parse_key_set(self.log_keys.read_text())
        except OSError as exc:
            raise ConfigError(f"RXLEDGER_LOG_KEYS: cannot read {self.log_keys}: {exc}") from None
        except VerificationError as exc:
            raise ConfigError(f"RXLEDGER_LOG_KEYS {self.log_keys}: {exc.detail}") from None
        for held, variable in (
            (signer, "RXLEDGER_SIGNING_KEY"),
            (next_signer, "RXLEDGER_NEXT_SIGNING_KEY"),
        ):
            if held is not None and keys.find(held.name, held.key_id) is None:
                raise ConfigError(
                    f"{variable}: its verifier key {held.verifier_key} is not in "
                    f"RXLEDGER_LOG_KEYS {self.log_keys}"
                )
        return keys

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
        return _load_signer(self.key_name, path, "RXLEDGER_SIGNING_KEY")


def _path(raw: str | None) -> Path | None:
    return Path(raw) if raw else None


def _load_signer(name: str, path: Path, variable: str) -> Signer:
    try:
        return Signer(name, load_private_key(path.read_bytes()))
    except FileNotFoundError:
        raise ConfigError(f"{variable}: no such file {path}") from None
    except ValueError as exc:
        raise ConfigError(f"signing key {path}: {exc}") from None


UNSET_MODE_WARNING = (
    "RXLEDGER_MODE is not set: running in DEVELOPMENT mode (HS256 development tokens accepted, "
    "keys created under RXLEDGER_VAR_DIR, GraphiQL on). Set RXLEDGER_MODE=production to deploy, "
    "or RXLEDGER_MODE=development to say this is meant"
)


def announce_mode(settings: Settings) -> None:
    """Warn loudly when the mode was not chosen (a deployment that forgot RXLEDGER_MODE would
    otherwise run with development keys and tokens without anyone noticing)."""
    if settings.mode_is_default:
        log.warning(UNSET_MODE_WARNING)


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
