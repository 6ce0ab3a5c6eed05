"""Errors the log raises to its callers."""

from __future__ import annotations


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
