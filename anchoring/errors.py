"""Errors the log raises to its callers, and the one way a database error is put into words."""

from __future__ import annotations

import traceback


class LedgerError(Exception):
    """Base class of the log's expected errors."""


class InvalidEvent(LedgerError, ValueError):
    """The event cannot be appended as given (bad subject, version or header)."""


class VersionConflict(LedgerError):
    """Another event already holds this (subject, version)."""

    def __init__(self, subject: str, version: int) -> None:
        super().__init__(f"an event for subject {subject!r} version {version} already exists")
        self.subject = subject
        self.version = version


class LedgerUnavailable(LedgerError):
    """The database could not be reached or did not answer; nothing was acknowledged."""


class ProofUnavailable(LedgerError, ValueError):
    """A proof was asked for sizes or indices the log cannot prove (yet)."""


class AnchorRefused(LedgerError):
    """The anchorer refused to sign: the tree is not consistent with the last checkpoint."""


class CosignatureRejected(LedgerError):
    """A cosignature was not accepted: not by a configured witness, not valid, or not on a
    checkpoint this log signed."""


def database_error(exc: BaseException) -> str:
    """A database error as logs, health endpoints and clients may show it: its class and,
    when the server sent one, its code. Never the error's text: a BulkWriteError's text holds
    the documents it failed to write, and an OperationFailure's the server's full reply, either
    of which may carry the personal data an event records."""
    code = getattr(exc, "code", None)
    name = type(exc).__name__
    return name if not isinstance(code, int) else f"{name} (code {code})"


def frames(exc: BaseException) -> str:
    """Where an exception was raised (its stack, innermost last), without its text: for
    logging an unexpected error without the values its message may quote."""
    return "".join(traceback.format_tb(exc.__traceback__)).rstrip()
