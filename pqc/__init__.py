"""qsfraud: pqc. Quantum-safe envelopes for model updates; bytes in, sealed bytes out.

Modules: :mod:`pqc.envelope` (seal/open, sign_document/verify_document),
:mod:`pqc.keys` (identities, KEM keys, registry, key store), :mod:`pqc.freshness`
(sequence numbers and time window), :mod:`pqc.backend` (the KEM/signature interface and
backend choice), :mod:`pqc.errors`. The byte layout is in ``docs/envelope.md``.
This package imports nothing else of qsfraud.
"""

from pqc.envelope import EnvelopeMeta, open, seal, sign_document, verify_document
from pqc.errors import (
    BackendUnavailable,
    EnvelopeError,
    FreshnessStateError,
    KeyStoreError,
    MalformedEnvelope,
    OutsideTimeWindow,
    PqcError,
    Replay,
    TamperedEnvelope,
    UnauthorizedSender,
    UnknownSender,
    WrongPurpose,
    WrongRecipient,
)
from pqc.freshness import FileFreshness, FreshnessStore, InMemoryFreshness, TimeWindow
from pqc.keys import KeyStore, Registry, TrustedKey, init_keystore, load_keystore, rotate_keystore

__all__ = [
    "BackendUnavailable",
    "EnvelopeError",
    "EnvelopeMeta",
    "FileFreshness",
    "FreshnessStateError",
    "FreshnessStore",
    "InMemoryFreshness",
    "KeyStore",
    "KeyStoreError",
    "MalformedEnvelope",
    "OutsideTimeWindow",
    "PqcError",
    "Registry",
    "Replay",
    "TamperedEnvelope",
    "TimeWindow",
    "TrustedKey",
    "UnauthorizedSender",
    "UnknownSender",
    "WrongPurpose",
    "WrongRecipient",
    "init_keystore",
    "load_keystore",
    "open",
    "rotate_keystore",
    "seal",
    "sign_document",
    "verify_document",
]
