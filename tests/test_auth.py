"""Bearer-token authentication (app/auth.py) and `rxledger token`, with real keys and tokens.

Keys are generated per module with `cryptography`, written as PEM (and as a JWKS made with PyJWT's
own `to_jwk`) under tmp_path; tokens are signed by `mint_token` or, for the hostile cases, built
byte by byte. No database is needed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

from app.auth import (
    Authenticator,
    AuthError,
    AuthSettings,
    Role,
    Viewer,
    load_public_key_pem,
    mint_token,
)
from app.settings import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RXLEDGER = [sys.executable, "-m", "app.cli"]
AUTH_ENV = (
    "RXLEDGER_JWT_PUBLIC_KEYS",
    "RXLEDGER_JWKS",
    "RXLEDGER_JWT_DEV_SECRET",
    "RXLEDGER_JWT_ISSUER",
    "RXLEDGER_JWT_AUDIENCE",
    "RXLEDGER_JWT_LEEWAY",
)
SECRET = b"s" * 32
ISSUER, AUDIENCE = "https://idp.example", "rxledger"  # what production tests configure

ED_KEY = Ed25519PrivateKey.generate()
OTHER_ED_KEY = Ed25519PrivateKey.generate()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def write_public_pem(path: Path, key: Ed25519PrivateKey | rsa.RSAPrivateKey) -> Path:
    path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return path


def auth(
    tmp_path: Path,
    *keys: Ed25519PrivateKey | rsa.RSAPrivateKey,
    mode: str = "development",
    **overrides: Any,
) -> Authenticator:
    """An Authenticator trusting `keys` as PEM files named key0.pem, key1.pem, ..."""
    production = mode == "production"  # which needs an issuer and an audience
    fields: dict[str, Any] = {
        "mode": mode,
        "public_keys": tuple(
            load_public_key_pem(write_public_pem(tmp_path / f"key{i}.pem", key))
            for i, key in enumerate(keys)
        ),
        "jwks_path": None,
        "dev_secret": None,
        "issuer": ISSUER if production else None,
        "audience": AUDIENCE if production else None,
        "leeway_seconds": 30.0,
    }
    fields.update(overrides)
    return Authenticator(AuthSettings(**fields))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "dr-zhang", "role": "PRESCRIBER", "iat": now, "exp": now + 600}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def signed(payload: dict[str, Any], key: Any = ED_KEY, alg: str = "EdDSA", **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers=headers or None)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def refusal(authenticator: Authenticator, header: str) -> str:
    with pytest.raises(AuthError) as caught:
        authenticator.authenticate(header)
    return str(caught.value)


@pytest.fixture(autouse=True)
def clean_auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AUTH_ENV:
        monkeypatch.delenv(name, raising=False)


# --- accepted tokens ---------------------------------------------------------------------------


def test_eddsa_token_signed_by_a_configured_key_yields_its_viewer(tmp_path: Path) -> None:
    token = mint_token(
        role=Role.PHARMACIST,
        subject="ph-li",
        organization="pharmacy-7",
        key_pem=private_pem(ED_KEY),
    )
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    viewer = auth(tmp_path, ED_KEY).authenticate(bearer(token))
    assert viewer == Viewer(subject="ph-li", role=Role.PHARMACIST, organization="pharmacy-7")
    assert viewer.rate_key == "PHARMACIST:ph-li"


def test_the_viewer_carries_the_tokens_expiry(tmp_path: Path) -> None:
    exp = int(time.time()) + 123
    viewer = auth(tmp_path, ED_KEY).authenticate(bearer(signed(claims(exp=exp))))
    assert viewer is not None and viewer.expires_at == exp


def test_rs256_token_signed_by_a_configured_key_is_accepted(tmp_path: Path) -> None:
    token = mint_token(role="COURIER", subject="c-9", key_pem=private_pem(RSA_KEY))
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    viewer = auth(tmp_path, ED_KEY, RSA_KEY).authenticate(bearer(token))
    assert viewer == Viewer(subject="c-9", role=Role.COURIER, organization=None)


def test_token_without_kid_is_tried_against_every_key(tmp_path: Path) -> None:
    token = mint_token(role="AUDITOR", subject="a-1", key_pem=private_pem(OTHER_ED_KEY))
    viewer = auth(tmp_path, ED_KEY, OTHER_ED_KEY).authenticate(bearer(token))
    assert viewer is not None and viewer.role is Role.AUDITOR


def test_pem_key_kid_is_the_file_name_stem(tmp_path: Path) -> None:
    key = load_public_key_pem(write_public_pem(tmp_path / "issuer-2025.pem", ED_KEY))
    assert key.kid == "issuer-2025"
    authenticator = auth(tmp_path, public_keys=(key,))
    token = mint_token(role="ADMIN", subject="root", key_pem=private_pem(ED_KEY), kid="issuer-2025")
    assert authenticator.authenticate(bearer(token)) is not None


def test_jwks_key_is_chosen_by_kid(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    keys = [
        OKPAlgorithm.to_jwk(ED_KEY.public_key(), as_dict=True) | {"kid": "ed-old"},
        OKPAlgorithm.to_jwk(OTHER_ED_KEY.public_key(), as_dict=True) | {"kid": "ed-new"},
        RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True) | {"kid": "rsa", "use": "sig"},
    ]
    jwks.write_text(json.dumps({"keys": keys}))
    authenticator = auth(tmp_path, mode="production", jwks_path=jwks)
    signers: list[tuple[Ed25519PrivateKey | rsa.RSAPrivateKey, str]] = [
        (OTHER_ED_KEY, "ed-new"),
        (ED_KEY, "ed-old"),
        (RSA_KEY, "rsa"),
    ]
    for key, kid in signers:
        token = mint_token(
            role="PARTNER",
            subject=kid,
            key_pem=private_pem(key),
            kid=kid,
            issuer=ISSUER,
            audience=AUDIENCE,
        )
        viewer = authenticator.authenticate(bearer(token))
        assert viewer is not None and viewer.subject == kid
    wrong_kid = mint_token(
        role="PARTNER",
        subject="x",
        key_pem=private_pem(ED_KEY),
        kid="ed-new",
        issuer=ISSUER,
        audience=AUDIENCE,
    )
    assert "does not verify" in refusal(authenticator, bearer(wrong_kid))


def test_jwks_symmetric_keys_are_never_trusted(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    oct_key = {"kty": "oct", "kid": "shared", "k": b64url(SECRET)}
    ed_key = OKPAlgorithm.to_jwk(ED_KEY.public_key(), as_dict=True) | {"kid": "ed"}
    jwks.write_text(json.dumps({"keys": [oct_key, ed_key]}))
    authenticator = auth(tmp_path, jwks_path=jwks)
    token = signed(claims(), SECRET, "HS256", kid="shared")
    assert "HS256" in refusal(authenticator, bearer(token))


def test_hs256_token_with_the_dev_secret_is_accepted_in_development(tmp_path: Path) -> None:
    token = mint_token(role="PATIENT", subject="p-1", secret=SECRET)
    viewer = auth(tmp_path, dev_secret=SECRET).authenticate(bearer(token))
    assert viewer == Viewer(subject="p-1", role=Role.PATIENT, organization=None)


def test_bearer_scheme_is_case_insensitive(tmp_path: Path) -> None:
    token = mint_token(role="ADMIN", subject="root", key_pem=private_pem(ED_KEY))
    assert auth(tmp_path, ED_KEY).authenticate(f"bearer  {token} ") is not None


def test_small_clock_skew_is_within_leeway(tmp_path: Path) -> None:
    now = int(time.time())
    token = signed(claims(exp=now - 10, nbf=now + 10, iat=now + 10))
    assert auth(tmp_path, ED_KEY, leeway_seconds=30).authenticate(bearer(token)) is not None


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_authorization_is_anonymous(tmp_path: Path, header: str | None) -> None:
    assert auth(tmp_path, ED_KEY).authenticate(header) is None


# --- refused tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header", ["Basic x", "Bearer", "garbage", "Bearer a b", "Bearer a.b.c", "Bearer !!!"]
)
def test_malformed_authorization_header_is_refused(tmp_path: Path, header: str) -> None:
    assert refusal(auth(tmp_path, ED_KEY), header)


def test_scheme_other_than_bearer_says_what_to_send(tmp_path: Path) -> None:
    assert "Bearer <token>" in refusal(auth(tmp_path, ED_KEY), "Basic dXNlcjpwYXNz")


def test_token_with_unknown_kid_is_refused(tmp_path: Path) -> None:
    token = mint_token(role="ADMIN", subject="root", key_pem=private_pem(ED_KEY), kid="nobody")
    assert "kid 'nobody'" in refusal(auth(tmp_path, ED_KEY), bearer(token))


def test_tampered_payload_is_refused(tmp_path: Path) -> None:
    token = mint_token(role="PATIENT", subject="p-1", key_pem=private_pem(ED_KEY))
    header, _, signature = token.split(".")
    forged = b64url(json.dumps(claims(sub="p-1", role="ADMIN")).encode())
    assert "does not verify" in refusal(
        auth(tmp_path, ED_KEY), bearer(f"{header}.{forged}.{signature}")
    )


def test_token_signed_by_an_untrusted_key_is_refused(tmp_path: Path) -> None:
    token = mint_token(role="ADMIN", subject="root", key_pem=private_pem(OTHER_ED_KEY))
    assert "does not verify" in refusal(auth(tmp_path, ED_KEY), bearer(token))


def test_expired_token_is_refused(tmp_path: Path) -> None:
    token = signed(claims(exp=int(time.time()) - 3600))
    assert "expired" in refusal(auth(tmp_path, ED_KEY), bearer(token))


def test_token_not_valid_before_a_future_time_is_refused(tmp_path: Path) -> None:
    token = signed(claims(nbf=int(time.time()) + 3600))
    assert "not valid yet" in refusal(auth(tmp_path, ED_KEY), bearer(token))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"iss": "https://evil.example"}, "issuer"),
        ({"iss": None}, "'iss'"),
        ({"aud": "other-api"}, "audience"),
        ({"aud": None}, "'aud'"),
    ],
)
def test_issuer_and_audience_are_required_when_configured(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    authenticator = auth(tmp_path, ED_KEY, issuer="https://idp.example", audience="rxledger")
    good: dict[str, Any] = {"iss": "https://idp.example", "aud": ["rxledger", "other"]}
    assert authenticator.authenticate(bearer(signed(claims(**good)))) is not None
    assert expected in refusal(authenticator, bearer(signed(claims(**good | changes))))


def test_token_with_an_audience_is_refused_when_none_is_configured(tmp_path: Path) -> None:
    assert "audience" in refusal(auth(tmp_path, ED_KEY), bearer(signed(claims(aud="other-api"))))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"role": None}, "'role'"),
        ({"sub": None}, "'sub'"),
        ({"exp": None}, "'exp'"),
        ({"role": "SUPERUSER"}, "role must be one of"),
        ({"role": "prescriber"}, "role must be one of"),
        ({"role": ["ADMIN"]}, "role must be one of"),
        ({"sub": "  "}, "sub"),
        ({"org": 7}, "org"),
    ],
)
def test_token_without_valid_sub_role_or_exp_is_refused(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    assert expected in refusal(auth(tmp_path, ED_KEY), bearer(signed(claims(**changes))))


def test_alg_none_is_refused(tmp_path: Path) -> None:
    signing_input = ".".join(
        b64url(json.dumps(part).encode()) for part in ({"alg": "none", "typ": "JWT"}, claims())
    )
    token = f"{signing_input}."
    assert "'none' is not accepted" in refusal(
        auth(tmp_path, ED_KEY, dev_secret=SECRET), bearer(token)
    )


def test_hs256_token_is_refused_in_production(tmp_path: Path) -> None:
    token = mint_token(role="ADMIN", subject="root", secret=SECRET)
    message = refusal(auth(tmp_path, ED_KEY, mode="production"), bearer(token))
    assert "only in development mode" in message and "EdDSA" in message


def test_hs256_token_with_another_secret_is_refused(tmp_path: Path) -> None:
    token = mint_token(role="ADMIN", subject="root", secret=b"x" * 32)
    assert "does not verify" in refusal(auth(tmp_path, dev_secret=SECRET), bearer(token))


def test_hs256_token_keyed_with_a_public_key_pem_is_refused(tmp_path: Path) -> None:
    # The classic algorithm confusion: an attacker signs HS256 with the public key's PEM text.
    public_pem = write_public_pem(tmp_path / "pub.pem", RSA_KEY).read_bytes()
    signing_input = ".".join(
        b64url(json.dumps(part).encode()) for part in ({"alg": "HS256", "typ": "JWT"}, claims())
    )
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(mac)}"
    assert refusal(auth(tmp_path, RSA_KEY, dev_secret=SECRET), bearer(token))
    assert "HS256" in refusal(auth(tmp_path, RSA_KEY), bearer(token))


def test_eddsa_token_is_refused_when_only_rsa_keys_are_configured(tmp_path: Path) -> None:
    token = mint_token(role="ADMIN", subject="root", key_pem=private_pem(ED_KEY))
    assert "'EdDSA' is not accepted" in refusal(auth(tmp_path, RSA_KEY), bearer(token))


def unsigned(header: dict[str, Any] | str, payload: dict[str, Any] | str) -> str:
    parts = [p if isinstance(p, str) else json.dumps(p) for p in (header, payload)]
    return ".".join(b64url(p.encode()) for p in parts) + "." + b64url(b"x" * 64)


@pytest.mark.parametrize(
    "token",
    [
        unsigned({"alg": ["EdDSA"]}, claims()),
        unsigned({"alg": "EdDSA", "kid": 5}, claims()),
        unsigned({"alg": {"x": 1}}, claims()),
        unsigned("[1, 2]", claims()),
        unsigned("not json", claims()),
        unsigned({"alg": "EdDSA"}, "[]"),
        signed(claims(exp="tomorrow")),
        signed(claims(nbf=[1])),
        signed(claims(sub=42)),
        signed({"sub": "x", "role": "ADMIN", "exp": 1e400}),
        "Zm9v." * 3,
    ],
)
def test_hostile_tokens_raise_only_auth_error(tmp_path: Path, token: str) -> None:
    with pytest.raises(AuthError):
        auth(tmp_path, ED_KEY, dev_secret=SECRET).authenticate(bearer(token))


# --- configuration -----------------------------------------------------------------------------


def test_production_with_the_dev_secret_set_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "RXLEDGER_JWT_PUBLIC_KEYS", str(write_public_pem(tmp_path / "k.pem", ED_KEY))
    )
    monkeypatch.setenv("RXLEDGER_JWT_DEV_SECRET", SECRET.decode())
    with pytest.raises(ConfigError, match="unset it in production"):
        AuthSettings.from_env("production", tmp_path)


def test_production_without_keys_or_jwks_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RXLEDGER_JWT_PUBLIC_KEYS .* or RXLEDGER_JWKS"):
        AuthSettings.from_env("production", tmp_path)
    assert not (tmp_path / "keys").exists()


@pytest.mark.parametrize(
    ("issuer", "audience", "missing"),
    [
        (None, None, "RXLEDGER_JWT_ISSUER and RXLEDGER_JWT_AUDIENCE"),
        ("https://idp.example", None, "RXLEDGER_JWT_AUDIENCE"),
        (None, "rxledger", "RXLEDGER_JWT_ISSUER"),
    ],
)
def test_production_without_issuer_or_audience_is_a_config_error_naming_them(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    issuer: str | None,
    audience: str | None,
    missing: str,
) -> None:
    # Without them, a token the identity provider issued for any other service would do here.
    monkeypatch.setenv(
        "RXLEDGER_JWT_PUBLIC_KEYS", str(write_public_pem(tmp_path / "k.pem", ED_KEY))
    )
    for name, value in (("RXLEDGER_JWT_ISSUER", issuer), ("RXLEDGER_JWT_AUDIENCE", audience)):
        if value is not None:
            monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        AuthSettings.from_env("production", tmp_path)
    assert f"production mode needs {missing}" in str(caught.value)


def test_production_from_env_loads_keys_issuer_audience_and_leeway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ed_pem = write_public_pem(tmp_path / "ed.pem", ED_KEY)
    rsa_pem = write_public_pem(tmp_path / "rsa.pem", RSA_KEY)
    monkeypatch.setenv("RXLEDGER_JWT_PUBLIC_KEYS", f"{ed_pem}, {rsa_pem}")
    monkeypatch.setenv("RXLEDGER_JWT_ISSUER", "https://idp.example")
    monkeypatch.setenv("RXLEDGER_JWT_AUDIENCE", "rxledger")
    monkeypatch.setenv("RXLEDGER_JWT_LEEWAY", "5")
    settings = AuthSettings.from_env("production", tmp_path)
    assert [(k.kid, k.algorithm) for k in settings.public_keys] == [
        ("ed", "EdDSA"),
        ("rsa", "RS256"),
    ]
    assert (settings.issuer, settings.audience, settings.leeway_seconds) == (
        "https://idp.example",
        "rxledger",
        5.0,
    )
    assert settings.dev_secret is None


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: d / "missing.pem", "cannot read"),
        (lambda d: (d / "k.pem").write_bytes(private_pem(ED_KEY)) and d / "k.pem", "private key"),
        (lambda d: (d / "k.pem").write_text("hello") and d / "k.pem", "not a PEM public key"),
        (
            lambda d: write_public_pem(
                d / "k.pem", rsa.generate_private_key(public_exponent=65537, key_size=1024)
            ),
            "1024 bits",
        ),
    ],
)
def test_unusable_public_key_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: Any, expected: str
) -> None:
    monkeypatch.setenv("RXLEDGER_JWT_PUBLIC_KEYS", str(setup(tmp_path)))
    with pytest.raises(ConfigError, match=expected):
        AuthSettings.from_env("production", tmp_path)


@pytest.mark.parametrize(
    "content", ['{"keys": []}', "not json", '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}']
)
def test_jwks_file_without_signature_keys_is_a_config_error(tmp_path: Path, content: str) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(content)
    with pytest.raises(ConfigError, match="RXLEDGER_JWKS"):
        auth(tmp_path, mode="production", jwks_path=jwks)


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_leeway_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RXLEDGER_JWT_LEEWAY", value)
    with pytest.raises(ConfigError, match="RXLEDGER_JWT_LEEWAY"):
        AuthSettings.from_env("development", tmp_path)


def test_development_secret_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    first = AuthSettings.from_env("development", tmp_path)
    path = tmp_path / "keys" / "dev-jwt.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.dev_secret is not None and len(bytes.fromhex(first.dev_secret.decode())) == 32
    assert AuthSettings.from_env("development", tmp_path).dev_secret == first.dev_secret


def test_dev_secret_from_env_takes_precedence_and_must_be_long_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RXLEDGER_JWT_DEV_SECRET", SECRET.decode())
    assert AuthSettings.from_env("development", tmp_path).dev_secret == SECRET
    assert not (tmp_path / "keys").exists()
    monkeypatch.setenv("RXLEDGER_JWT_DEV_SECRET", "short")
    with pytest.raises(ConfigError, match="at least 32"):
        AuthSettings.from_env("development", tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"secret": SECRET, "role": "KING"}, "not one of"),
        ({"role": "ADMIN"}, "exactly one"),
        ({"role": "ADMIN", "secret": SECRET, "key_pem": private_pem(ED_KEY)}, "exactly one"),
        ({"role": "ADMIN", "secret": b"short"}, "at least 32"),
        ({"role": "ADMIN", "secret": SECRET, "ttl_seconds": 0}, "ttl"),
        ({"role": "ADMIN", "key_pem": b"nope"}, "not a PEM private key"),
    ],
)
def test_mint_token_refuses_bad_arguments(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        mint_token(subject="x", **kwargs)


# --- rxledger token ----------------------------------------------------------------------------


def rxledger_token(tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    env |= {"RXLEDGER_VAR_DIR": str(tmp_path / "var"), "RXLEDGER_MODE": mode}
    return subprocess.run(
        [*RXLEDGER, "token", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_development_token_is_accepted_by_a_development_gateway(tmp_path: Path) -> None:
    run = rxledger_token(
        tmp_path, "development", "--role", "PRESCRIBER", "--sub", "dr-zhang", "--org", "cardiology"
    )
    assert run.returncode == 0, run.stderr
    token = run.stdout.removesuffix("\n")
    assert run.stdout == token + "\n" and token.count(".") == 2
    assert "Authorization: Bearer" in run.stderr
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    gateway = Authenticator(AuthSettings.from_env("development", tmp_path / "var"))
    assert gateway.authenticate(bearer(token)) == Viewer(
        subject="dr-zhang", role=Role.PRESCRIBER, organization="cardiology"
    )
    ttl = jwt.decode(token, options={"verify_signature": False})
    assert ttl["exp"] - ttl["iat"] == 8 * 3600


def test_cli_production_without_key_exits_2_and_asks_for_key(tmp_path: Path) -> None:
    run = rxledger_token(tmp_path, "production", "--role", "ADMIN", "--sub", "root")
    assert run.returncode == 2
    assert run.stdout == ""
    assert "--key" in run.stderr and "Traceback" not in run.stderr


def test_cli_with_ed25519_key_prints_an_eddsa_token_for_production(tmp_path: Path) -> None:
    key = tmp_path / "issuer.key"
    key.write_bytes(private_pem(ED_KEY))
    run = rxledger_token(
        tmp_path,
        "production",
        "--role",
        "AUDITOR",
        "--sub",
        "aud-1",
        "--key",
        str(key),
        "--kid",
        "key0",
        "--ttl",
        "60",
        "--issuer",
        ISSUER,
        "--audience",
        AUDIENCE,
    )
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": "key0", "typ": "JWT"}
    viewer = auth(tmp_path, ED_KEY, mode="production").authenticate(bearer(token))
    assert viewer == Viewer(subject="aud-1", role=Role.AUDITOR, organization=None)


def test_cli_rejects_an_unknown_role(tmp_path: Path) -> None:
    run = rxledger_token(tmp_path, "development", "--role", "KING", "--sub", "x")
    assert run.returncode == 2
    assert "invalid choice: 'KING'" in run.stderr
