"""Typed errors raised by :mod:`pqc`; each carries a one-line message and never any plaintext.

>>> issubclass(TamperedEnvelope, EnvelopeError)
True
>>> str(Replay("sequence 3 from retailer-1 is not after 5"))
'sequence 3 from retailer-1 is not after 5'
"""

from __future__ import annotations


class PqcError(Exception):
    """Base class of every error raised by :mod:`pqc`."""


class EnvelopeError(PqcError):
    """An envelope or signed document was rejected; nothing of its payload is returned."""


class MalformedEnvelope(EnvelopeError):
    """The bytes do not parse as an envelope: bad magic, version, ids, lengths or purpose."""


class UnknownSender(EnvelopeError):
    """The sender's key id is not in the registry (or that key has expired)."""


class UnauthorizedSender(EnvelopeError):
    """The sender is known but its role may not send this purpose."""


class WrongRecipient(EnvelopeError):
    """The envelope is sealed to a KEM key that this recipient does not hold."""


class WrongPurpose(EnvelopeError):
    """The envelope is valid but carries another purpose than the one expected."""


class TamperedEnvelope(EnvelopeError):
    """The signature or the AES-GCM tag does not verify: the bytes were changed."""


class Replay(EnvelopeError):
    """The sequence number is not greater than the last one accepted from that sender."""


class OutsideTimeWindow(EnvelopeError):
    """The timestamp is too old or too far in the future."""


class KeyStoreError(PqcError):
    """A key file or registry file is missing, unreadable, of the wrong format or unsafe."""


class FreshnessStateError(PqcError):
    """A persisted freshness state file is unreadable or of the wrong format."""


class BackendUnavailable(PqcError):
    """The requested cryptographic backend cannot be used on this machine."""
