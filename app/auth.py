"""Bearer-token authentication: which viewer is calling, in which role.

A request carries `Authorization: Bearer <JWT>`. The token is verified once, against keys loaded
at startup, and becomes a `Viewer` (subject, role, organization); no header means an anonymous
request. Every refusal is an `AuthError` whose message is safe to show the client.

Claims
    `sub`   required, non-empty string: who the viewer is (`Viewer.subject`).
    `role`  required, one of PRESCRIBER, PHARMACIST, COURIER, PATIENT, PARTNER, AUDITOR, ADMIN.
    `org`   optional string: the pharmacy id of a PHARMACIST or PARTNER, the courier company of a
            COURIER, the department of a PRESCRIBER (`Viewer.organization`).
    `exp`   required; `nbf` and `iat` are checked when present. `iss` and `aud` are required and
            checked when RXLEDGER_JWT_ISSUER / RXLEDGER_JWT_AUDIENCE are set (always, in
            production); a token that carries an `aud` is refused when no audience is configured
            (RFC 7519 §4.1.3).

Algorithms
    EdDSA (Ed25519) and RS256 (RSA, at least 2048 bits) against the configured public keys;
    HS256 only in development mode, with the development secret. Everything else, `none`
    included, is refused. The algorithm a token names only selects among keys configured for that
    algorithm, so an HS256 token can never be checked against a public key.

Environment (read by `AuthSettings.from_env`)
    RXLEDGER_JWT_PUBLIC_KEYS  Comma-separated paths of PEM public keys (SubjectPublicKeyInfo,
                              `-----BEGIN PUBLIC KEY-----`): Ed25519 keys verify EdDSA tokens, RSA
                              keys RS256 tokens. A key's kid is its file name without the last
                              suffix (`keys/issuer-2025.pem` has kid `issuer-2025`). A token whose
                              header has a `kid` is checked only against keys with that kid; one
                              without a `kid` is tried against every key of its algorithm.
    RXLEDGER_JWKS             Path of a JWKS file (`{"keys": [...]}`); OKP/Ed25519 keys verify
                              EdDSA tokens, RSA keys RS256 tokens, matched on `kid` as above.
                              Other keys (symmetric `oct`, other curves or algorithms, `use`
                              "enc") are skipped with a warning; a file with no usable key is a
                              startup error. Read once at startup.
    RXLEDGER_JWT_DEV_SECRET   HS256 secret (at least 32 bytes), development mode only. When unset in
                              development, the secret is the text of `<RXLEDGER_VAR_DIR>/keys/
                              dev-jwt.secret` (64 hex characters), created with mode 0600 on first
                              use; `rxledger token` uses the same secret, so development tokens
                              work with `make run` without setup. Setting it in production is a
                              startup error, and production refuses every HS256 token.
    RXLEDGER_JWT_ISSUER       Tokens must carry exactly this `iss`. Required in production.
    RXLEDGER_JWT_AUDIENCE     Tokens must carry this `aud` (a string, or a list holding it). Required
                              in production.
    RXLEDGER_JWT_LEEWAY       Seconds of clock skew tolerated on `exp`, `nbf` and `iat` (default 30).

Production mode needs RXLEDGER_JWT_PUBLIC_KEYS or RXLEDGER_JWKS (or both), and both
RXLEDGER_JWT_ISSUER and RXLEDGER_JWT_AUDIENCE; without them, and with RXLEDGER_JWT_DEV_SECRET set,
startup fails with a `ConfigError` naming the variables.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from app.settings import ConfigError

if TYPE_CHECKING:
    from jwt.types import Options

log = logging.getLogger("rxledger.auth")

DEV_SECRET_FILE = Path("keys") / "dev-jwt.secret"
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the SHA-256 output
MIN_RSA_BITS = 2048
DEFAULT_LEEWAY_SECONDS = 30.0

PublicKey = Ed25519PublicKey | RSAPublicKey
PrivateKey = Ed25519PrivateKey | RSAPrivateKey


class Role(enum.StrEnum):
    PRESCRIBER = "PRESCRIBER"
    PHARMACIST = "PHARMACIST"
    COURIER = "COURIER"
    PATIENT = "PATIENT"
    PARTNER = "PARTNER"
    AUDITOR = "AUDITOR"
    ADMIN = "ADMIN"


ROLE_NAMES = ", ".join(role.value for role in Role)
MALFORMED_TOKEN = "bearer token is not a well-formed JWT; send the token exactly as it was issued"


@dataclass(frozen=True)
class Viewer:
    """The authenticated caller, from a verified token's `sub`, `role` and `org` claims."""

    subject: str
    role: Role
    organization: str | None
    # The token's `exp` (Unix time): long-lived streams end there. Not part of who the viewer is.
    expires_at: float | None = field(default=None, compare=False)

    @property
    def rate_key(self) -> str:
        """The key rate limits count against: one bucket per role and subject."""
        return f"{self.role.value}:{self.subject}"


class AuthError(Exception):
    """A bearer token was sent but refused; the message is safe to show the client and says
    what to do."""


@dataclass(frozen=True)
class VerificationKey:
    """A public key that verifies tokens of exactly one algorithm ("EdDSA" or "RS256")."""

    kid: str | None
    algorithm: str
    key: PublicKey
    source: str  # where it was loaded from, for error messages


@dataclass(frozen=True)
class AuthSettings:
    mode: str
    public_keys: tuple[VerificationKey, ...]
    jwks_path: Path | None
    dev_secret: bytes | None
    issuer: str | None
    audience: str | None
    leeway_seconds: float

    def __post_init__(self) -> None:
        if self.mode not in ("development", "production"):
            raise ConfigError(f"mode {self.mode!r} must be 'development' or 'production'")
        if self.dev_secret is not None and len(self.dev_secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"the HS256 development secret is {len(self.dev_secret)} bytes, want at least {MIN_SECRET_BYTES}; set RXLEDGER_JWT_DEV_SECRET to a longer value (e.g. `openssl rand -hex 32`)"
            )
        if self.production and self.dev_secret is not None:
            raise ConfigError(
                "RXLEDGER_JWT_DEV_SECRET (HS256) is for development only: unset it in production and verify tokens with RXLEDGER_JWT_PUBLIC_KEYS or RXLEDGER_JWKS"
            )
        if self.production and not self.public_keys and self.jwks_path is None:
            raise ConfigError(
                "production mode needs token verification keys: set RXLEDGER_JWT_PUBLIC_KEYS (comma-separated PEM public keys, Ed25519 or RSA) or RXLEDGER_JWKS (a JWKS file)"
            )
        missing = [
            name
            for name, value in (
                ("RXLEDGER_JWT_ISSUER", self.issuer),
                ("RXLEDGER_JWT_AUDIENCE", self.audience),
            )
            if not value
        ]
        if self.production and missing:
            # Without both, a token the identity provider issued to any other service, signed
            # by the same key, would be accepted here.
            raise ConfigError(
                f"production mode needs {' and '.join(missing)}: tokens must name their issuer "
                "(iss) and this gateway as their audience (aud); set them to the values your "
                "identity provider puts in the tokens it issues for rxledger"
            )

    @property
    def production(self) -> bool:
        return self.mode == "production"

    @classmethod
    def from_env(cls, mode: str, var_dir: Path) -> AuthSettings:
        """Read the RXLEDGER_JWT_* variables and load the PEM keys; in development, create the
        dev secret file under `var_dir` when it is missing. Raises ConfigError."""
        key_paths = [p.strip() for p in os.environ.get("RXLEDGER_JWT_PUBLIC_KEYS", "").split(",")]
        jwks = os.environ.get("RXLEDGER_JWKS", "").strip()
        issuer, audience = expected_issuer_audience()
        env_secret = os.environ.get("RXLEDGER_JWT_DEV_SECRET") or None
        if mode == "production":
            dev_secret = env_secret.encode() if env_secret else None  # refused by __post_init__
        else:
            dev_secret = load_dev_secret(var_dir)
        return cls(
            mode=mode,
            public_keys=tuple(load_public_key_pem(Path(p)) for p in key_paths if p),
            jwks_path=Path(jwks) if jwks else None,
            dev_secret=dev_secret,
            issuer=issuer,
            audience=audience,
            leeway_seconds=_leeway_from_env(),
        )


def expected_issuer_audience() -> tuple[str | None, str | None]:
    """RXLEDGER_JWT_ISSUER and RXLEDGER_JWT_AUDIENCE, None when unset or empty."""
    issuer = os.environ.get("RXLEDGER_JWT_ISSUER", "").strip()
    audience = os.environ.get("RXLEDGER_JWT_AUDIENCE", "").strip()
    return issuer or None, audience or None


def _leeway_from_env() -> float:
    raw = os.environ.get("RXLEDGER_JWT_LEEWAY", "").strip()
    if not raw:
        return DEFAULT_LEEWAY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"RXLEDGER_JWT_LEEWAY={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"RXLEDGER_JWT_LEEWAY={raw} must be a finite number of seconds >= 0")
    return value


def load_dev_secret(var_dir: Path) -> bytes:
    """The development HS256 secret: RXLEDGER_JWT_DEV_SECRET, else the text of
    var_dir/keys/dev-jwt.secret, which is created (32 random bytes as hex, mode 0600) if missing."""
    env_secret = os.environ.get("RXLEDGER_JWT_DEV_SECRET")
    if env_secret:
        return env_secret.encode()
    path = var_dir / DEV_SECRET_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # created earlier, or just now by a concurrent process: read it
    except OSError as exc:
        raise ConfigError(f"cannot create the development token secret {path}: {exc}") from None
    else:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_hex(32) + "\n")
        log.warning(
            "development mode: created the HS256 token secret %s (not for production)", path
        )
    try:
        secret = path.read_text(encoding="ascii").strip().encode()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the development token secret {path}: {exc}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the development token secret {path} holds {len(secret)} bytes, want at least {MIN_SECRET_BYTES}; delete it to have a new one created"
        )
    return secret


def _algorithm_for(key: object) -> str:
    """The one JWS algorithm a public key verifies. Raises ValueError for any other key."""
    if isinstance(key, Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key has {key.key_size} bits, want at least {MIN_RSA_BITS}")
        return "RS256"
    raise ValueError(f"{type(key).__name__} is not supported; use an Ed25519 or RSA key")


def load_public_key_pem(path: Path) -> VerificationKey:
    """A PEM public key file as a VerificationKey whose kid is the file name stem.
    Raises ConfigError naming the file."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"RXLEDGER_JWT_PUBLIC_KEYS: cannot read {path}: {exc}") from None
    try:
        key = load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        if b"PRIVATE KEY" in pem:
            raise ConfigError(
                f"RXLEDGER_JWT_PUBLIC_KEYS: {path} holds a private key; configure its public key instead (`openssl pkey -in {path} -pubout`)"
            ) from None
        raise ConfigError(
            f"RXLEDGER_JWT_PUBLIC_KEYS: {path} is not a PEM public key (-----BEGIN PUBLIC KEY-----)"
        ) from None
    try:
        algorithm = _algorithm_for(key)
    except ValueError as exc:
        raise ConfigError(f"RXLEDGER_JWT_PUBLIC_KEYS: {path}: {exc}") from None
    assert isinstance(key, Ed25519PublicKey | RSAPublicKey)
    return VerificationKey(kid=path.stem, algorithm=algorithm, key=key, source=str(path))


def load_jwks(path: Path) -> tuple[VerificationKey, ...]:
    """The usable Ed25519 and RSA signature keys of a JWKS file. Raises ConfigError."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        key_set = jwt.PyJWKSet.from_dict(document)
    except OSError as exc:
        raise ConfigError(f"RXLEDGER_JWKS: cannot read {path}: {exc}") from None
    except (ValueError, AttributeError, jwt.PyJWTError) as exc:
        raise ConfigError(f"RXLEDGER_JWKS: {path} is not a usable JWKS file: {exc}") from None
    keys = []
    for jwk in key_set:
        public = jwk.key.public_key() if hasattr(jwk.key, "public_key") else jwk.key
        try:
            algorithm = _algorithm_for(public)
        except ValueError as exc:
            log.warning("RXLEDGER_JWKS: skipping key %r of %s: %s", jwk.key_id, path, exc)
            continue
        if jwk.algorithm_name != algorithm or jwk.public_key_use not in (None, "sig"):
            log.warning(
                "RXLEDGER_JWKS: skipping key %r of %s: alg %s, use %s (want %s for signatures)",
                jwk.key_id,
                path,
                jwk.algorithm_name,
                jwk.public_key_use,
                algorithm,
            )
            continue
        keys.append(VerificationKey(jwk.key_id, algorithm, public, f"{path}#{jwk.key_id}"))
    if not keys:
        raise ConfigError(f"RXLEDGER_JWKS: {path} holds no Ed25519 or RSA signature key")
    return tuple(keys)


class Authenticator:
    """Turns an Authorization header into a Viewer; keys and options are fixed at construction."""

    def __init__(self, settings: AuthSettings) -> None:
        jwks_keys = load_jwks(settings.jwks_path) if settings.jwks_path else ()
        self._keys = settings.public_keys + jwks_keys
        # Production never accepts HS256, whatever the settings hold.
        self._secret = None if settings.production else settings.dev_secret
        self._algorithms = frozenset(
            {key.algorithm for key in self._keys} | ({"HS256"} if self._secret else set())
        )
        self._production = settings.production
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._leeway = settings.leeway_seconds
        required = ["exp", "sub"]
        required += ["iss"] if settings.issuer else []
        required += ["aud"] if settings.audience else []
        self._options: Options = {
            "require": required,
            "enforce_minimum_key_length": True,
        }

    def authenticate(self, authorization: str | None) -> Viewer | None:
        """The viewer an Authorization header proves, or None when there is no header (an
        anonymous request). Raises AuthError, and nothing else, for a header that does not."""
        if authorization is None or not authorization.strip():
            return None
        token = _bearer_token(authorization)
        try:
            claims = self._verified_claims(token)
        except jwt.PyJWTError as exc:
            raise AuthError(self._explain(exc)) from None
        except (ValueError, TypeError, KeyError, RecursionError):
            raise AuthError(MALFORMED_TOKEN) from None
        return _viewer(claims)

    def _verified_claims(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise AuthError(self._refusal(alg))
        if alg == "HS256":
            assert self._secret is not None
            return self._decode(token, self._secret, alg)
        kid = header.get("kid")
        candidates = [k for k in self._keys if k.algorithm == alg and kid in (None, k.kid)]
        if not candidates:
            raise AuthError(
                f"no {alg} key with kid {kid!r} is configured here; use a token signed by a key this gateway trusts"
            )
        for key in candidates[:-1]:
            try:
                return self._decode(token, key.key, alg)
            except jwt.InvalidSignatureError:
                continue
        return self._decode(token, candidates[-1].key, alg)

    def _decode(self, token: str, key: PublicKey | bytes, alg: str) -> dict[str, Any]:
        return jwt.decode(
            token,
            key,
            algorithms=[alg],
            options=self._options,
            issuer=self._issuer,
            audience=self._audience,
            leeway=self._leeway,
        )

    def _refusal(self, alg: object) -> str:
        accepted = ", ".join(sorted(self._algorithms)) or "none configured"
        if alg == "HS256" and self._production:
            return f"HS256 tokens are accepted only in development mode; use a token signed with {accepted}"
        return f"token algorithm {alg!r} is not accepted; use a token signed with {accepted}"

    def _explain(self, exc: jwt.PyJWTError) -> str:
        if isinstance(exc, jwt.ExpiredSignatureError):
            return "token has expired; get a new one"
        if isinstance(exc, jwt.ImmatureSignatureError):
            return "token is not valid yet (nbf or iat is in the future); check the issuer's clock"
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"token lacks the required claim {exc.claim!r}"
        if isinstance(exc, jwt.InvalidIssuerError):
            return f"token issuer (iss) must be {self._issuer!r}"
        if isinstance(exc, jwt.InvalidAudienceError):
            if self._audience is None:
                return "token names an audience (aud) but this gateway accepts tokens without one"
            return f"token audience (aud) must include {self._audience!r}"
        if isinstance(exc, jwt.InvalidSignatureError):
            return (
                "token signature does not verify; use a token signed by a key this gateway trusts"
            )
        return MALFORMED_TOKEN


def _bearer_token(authorization: str) -> str:
    parts = authorization.split()
    # RFC 9110 §11.1: the scheme name is case-insensitive.
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise AuthError('the Authorization header must be "Bearer <token>"')
    return parts[1]


def _viewer(claims: dict[str, Any]) -> Viewer:
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject.strip():
        raise AuthError("token subject (sub) must be a non-empty string")
    role = claims.get("role")
    if role is None:
        raise AuthError(f"token lacks the required claim 'role' (one of {ROLE_NAMES})")
    if not isinstance(role, str) or role not in Role.__members__:
        raise AuthError(f"token role must be one of {ROLE_NAMES}")
    organization = claims.get("org")
    if organization is not None and not isinstance(organization, str):
        raise AuthError("token organization (org) must be a string")
    return Viewer(
        subject=subject,
        role=Role[role],
        organization=organization or None,
        expires_at=float(claims["exp"]),
    )


def load_private_key_pem(pem: bytes) -> PrivateKey:
    """An unencrypted PEM Ed25519 or RSA private key. Raises ValueError saying what is wrong."""
    try:
        key = load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError("the private key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM private key (-----BEGIN PRIVATE KEY-----)") from None
    if not isinstance(key, Ed25519PrivateKey | RSAPrivateKey):
        raise ValueError(f"{type(key).__name__} is not supported; use an Ed25519 or RSA key")
    _algorithm_for(key.public_key())
    return key


def mint_token(
    *,
    role: Role | str,
    subject: str,
    organization: str | None = None,
    ttl_seconds: int = 3600,
    key_pem: bytes | None = None,
    secret: bytes | None = None,
    kid: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """A signed bearer token valid from now for ttl_seconds: EdDSA for an Ed25519 key_pem, RS256
    for an RSA one, HS256 with secret. Requires exactly one of key_pem and secret; raises
    ValueError for an unknown role, an empty subject, a ttl <= 0 or an unusable key."""
    if (key_pem is None) == (secret is None):
        raise ValueError("pass exactly one of key_pem and secret")
    try:
        role = Role(role)
    except ValueError:
        raise ValueError(f"role {role!r} is not one of {ROLE_NAMES}") from None
    if not subject.strip():
        raise ValueError("subject must not be empty")
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds is {ttl_seconds}, want > 0")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "role": role.value,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if organization:
        claims["org"] = organization
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    headers = {"kid": kid} if kid else None
    if secret is not None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the HS256 secret is {len(secret)} bytes, want at least {MIN_SECRET_BYTES}"
            )
        return jwt.encode(claims, secret, algorithm="HS256", headers=headers)
    assert key_pem is not None
    key = load_private_key_pem(key_pem)
    return jwt.encode(claims, key, algorithm=_algorithm_for(key.public_key()), headers=headers)
