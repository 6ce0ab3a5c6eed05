"""Canonical leaf bytes (RFC 8785 JSON Canonicalization Scheme) and base64 helpers."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import rfc8785


class EncodingError(ValueError):
    """A value cannot be turned into canonical leaf bytes, or a base64 string is malformed."""


def canonical_json(value: Any) -> bytes:
    """RFC 8785 bytes of a JSON value; raises EncodingError on non-JSON values."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise EncodingError(f"value is not canonicalizable JSON: {exc}") from exc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str = "value") -> bytes:
    """Strict standard base64 decoding with a message naming the field."""
    if not isinstance(text, str):
        raise EncodingError(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise EncodingError(f"{what}: malformed base64 ({exc})") from exc
    if base64.b64encode(data).decode("ascii") != text:
        raise EncodingError(f"{what}: non-canonical base64 (extra padding or stray bits)")
    return data
