"""Quantum-safe envelopes: bytes in, sealed bytes out, and back (``docs/envelope.md``).

:func:`seal` encrypts a payload to a recipient's KEM key (X25519MLKEM768 or ML-KEM-768,
then AES-256-GCM) and signs it with the sender's ML-DSA-65 key; :func:`open` checks it all
(format, sender, recipient, signature, time window, sequence) and returns the payload.
:func:`sign_document` / :func:`verify_document` do the same without encryption, for
documents every reader may see (e.g. configuration signed by an admin).

Sealing a large payload hashes it in the calling thread while a helper thread runs the KEM
and AES-GCM (both release the GIL), so the signature can start sooner; see "Why" in
``docs/envelope.md`` for the signed message that makes this possible.

>>> import tempfile
>>> from pqc.keys import init_keystore
>>> from pqc.freshness import InMemoryFreshness
>>> retailer = init_keystore(tempfile.mkdtemp(), "retailer-1", "retailer")
>>> aggregator = init_keystore(tempfile.mkdtemp(), "aggregator", "aggregator")
>>> aggregator.registry.trust(retailer.public_keys())
>>> recipient = aggregator.registry.current_kem_key("aggregator")
>>> blob = seal(b"weights", retailer.identity, recipient, "model-update", seq=1)
>>> seen = InMemoryFreshness()
>>> payload, meta = open(blob, aggregator.kem, aggregator.registry, freshness=seen)
>>> payload, meta.sender, meta.purpose, meta.sequence
(b'weights', 'retailer-1', 'model-update', 1)
>>> open(blob, aggregator.kem, aggregator.registry, freshness=seen)
Traceback (most recent call last):
...
pqc.errors.Replay: sequence 1 from retailer-1 (model-update) is not after 1: replay
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pqc.backend import KEM, ML_DSA_65, ML_KEM_768, X25519_ML_KEM_768, Backend, get_backend
from pqc.errors import (
    KeyStoreError,
    MalformedEnvelope,
    TamperedEnvelope,
    UnauthorizedSender,
    WrongPurpose,
    WrongRecipient,
)
from pqc.freshness import DEFAULT_WINDOW, FreshnessStore, TimeWindow
from pqc.keys import KEM_KIND, KEY_ID_SIZE, Identity, KemKeyring, Registry, TrustedKey

MAGIC = b"QSFE"
VERSION = 2
DOCUMENT_VERSIONS = (1, 2)  # a signed document is the same in both; sealed envelopes: 2 only
KEM_IDS = {0: None, 1: ML_KEM_768, 2: X25519_ML_KEM_768}
KEM_SIZES = {0: 0, 1: 1088, 2: 1120}
AEAD_NONE, AEAD_AES_256_GCM = 0, 1
SIGNATURE_IDS = {1: ML_DSA_65}
SIGNATURE_SIZE = 3309
GCM_TAG_SIZE = 16
FIXED = struct.Struct(">4sBBBB16s16sQQQB")  # everything up to and including the purpose length
PURPOSE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
CONTEXT_PREFIX = b"qsfraud/v1/"
KDF_LABEL = b"qsfraud/v2/aes-256-gcm"
KEY_SIZE, NONCE_SIZE, BIND_KEY_SIZE = 32, 12, 32
PARALLEL_MIN = 64 * 1024  # below this, a helper thread costs more than the overlap saves
NO_RECIPIENT = bytes(KEY_ID_SIZE)


@dataclass(frozen=True)
class Header:
    """The parsed, NOT yet authenticated header of an envelope."""

    kem_id: int
    aead_id: int
    signature_id: int
    sender_key_id: bytes
    recipient_key_id: bytes
    sequence: int
    timestamp_ms: int
    body_length: int
    purpose: str
    header_length: int
    version: int = VERSION

    @property
    def kem_length(self) -> int:
        return KEM_SIZES[self.kem_id]

    @property
    def is_document(self) -> bool:
        return self.kem_id == 0


@dataclass(frozen=True)
class EnvelopeMeta:
    """What :func:`open` / :func:`verify_document` vouch for besides the payload."""

    sender: str
    sender_role: str
    sender_key_id: str
    recipient_key_id: str | None
    kem: str | None
    purpose: str
    sequence: int
    timestamp: float
    payload_size: int


def context_for(purpose: str) -> bytes:
    """The ML-DSA context string of a purpose.

    >>> context_for("model-update")
    b'qsfraud/v1/model-update'
    """
    return CONTEXT_PREFIX + check_purpose(purpose).encode("ascii")


def check_purpose(purpose: str) -> str:
    """``purpose`` if valid (``[a-z0-9][a-z0-9._-]{0,63}``), else ValueError."""
    if not PURPOSE.fullmatch(purpose):
        raise ValueError(f"invalid purpose {purpose!r}: use [a-z0-9][a-z0-9._-]{{0,63}}")
    return purpose


def _header(
    kem_id: int,
    aead_id: int,
    sender: bytes,
    recipient: bytes,
    seq: int,
    timestamp_ms: int,
    body_length: int,
    purpose: str,
) -> bytes:
    raw = check_purpose(purpose).encode("ascii")
    if not 0 <= seq < 2**64:
        raise ValueError("the sequence number must fit in 64 bits unsigned")
    fixed = FIXED.pack(
        MAGIC,
        VERSION,
        kem_id,
        aead_id,
        1,
        sender,
        recipient,
        seq,
        timestamp_ms,
        body_length,
        len(raw),
    )
    return fixed + raw


def read_header(blob: bytes) -> Header:
    """Parse the header and check every length; MalformedEnvelope if anything is off.

    The result is unauthenticated: use it for routing at most, never for decisions.

    >>> read_header(b"QSFE")
    Traceback (most recent call last):
    ...
    pqc.errors.MalformedEnvelope: envelope too short: 4 bytes
    """
    view = memoryview(blob)
    if len(view) < FIXED.size:
        raise MalformedEnvelope(f"envelope too short: {len(view)} bytes")
    (magic, version, kem_id, aead_id, sig_id, sender, recipient, seq, stamp, body, plen) = (
        FIXED.unpack_from(view)
    )
    if magic != MAGIC:
        raise MalformedEnvelope("not a qsfraud envelope (bad magic)")
    if version not in DOCUMENT_VERSIONS:
        raise MalformedEnvelope(f"unsupported envelope version {version}")
    if kem_id not in KEM_IDS:
        raise MalformedEnvelope(f"unknown KEM id {kem_id}")
    if kem_id != 0 and version != VERSION:
        raise MalformedEnvelope(f"unsupported version {version} for a sealed envelope")
    if sig_id not in SIGNATURE_IDS:
        raise MalformedEnvelope(f"unknown signature id {sig_id}")
    if (kem_id == 0) != (aead_id == AEAD_NONE) or aead_id not in (AEAD_NONE, AEAD_AES_256_GCM):
        raise MalformedEnvelope(f"invalid KEM/AEAD combination {kem_id}/{aead_id}")
    if kem_id == 0 and recipient != NO_RECIPIENT:
        raise MalformedEnvelope("a signed document names no recipient")
    if kem_id != 0 and body < GCM_TAG_SIZE:
        raise MalformedEnvelope("encrypted body shorter than the AES-GCM tag")
    header_length = FIXED.size + plen
    if len(view) < header_length:
        raise MalformedEnvelope(f"envelope too short: {len(view)} bytes")
    try:
        purpose = check_purpose(bytes(view[FIXED.size : header_length]).decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedEnvelope("invalid purpose") from exc
    expected = header_length + KEM_SIZES[kem_id] + body + SIGNATURE_SIZE
    if len(view) < expected:
        raise MalformedEnvelope(f"truncated envelope: {len(view)} of {expected} bytes")
    if len(view) > expected:
        raise MalformedEnvelope(f"{len(view) - expected} trailing bytes after the envelope")
    return Header(
        kem_id,
        aead_id,
        sig_id,
        sender,
        recipient,
        seq,
        stamp,
        body,
        purpose,
        header_length,
        version,
    )


# ----------------------------------------------------------------------------- digests and keys


def body_digest(body: bytes | memoryview) -> bytes:
    """SHA-256: of a signed document's body (what its signature covers instead of the body),
    and of a sealed envelope's payload (the inner part of :func:`payload_binding`).

    >>> body_digest(b"abc").hex()[:16]
    'ba7816bf8f01cfea'
    """
    return hashlib.sha256(body).digest()


def payload_binding(bind_key: bytes, payload_digest: bytes) -> bytes:
    """``HMAC-SHA-256(bind_key, SHA-256(payload))``: what a sealed envelope's signature covers
    instead of the payload. Keyed, so the public signature confirms no guess of the payload.

    >>> payload_binding(bytes(32), body_digest(b"abc")).hex()[:16]
    '0b18f2bc0fb54605'
    """
    return hmac.digest(bind_key, payload_digest, "sha256")


def sealed_message(prefix: bytes, tag: bytes, bind_key: bytes, payload_digest: bytes) -> bytes:
    """What a sealed envelope's signature covers: header || KEM ciphertext, the GCM tag and
    :func:`payload_binding` (``docs/envelope.md``)."""
    return prefix + tag + payload_binding(bind_key, payload_digest)


def document_message(header: bytes | memoryview, body: bytes | memoryview) -> bytes:
    """What a signed document's signature covers: header || SHA-256(body)."""
    return bytes(header) + body_digest(body)


def _derive(shared_secret: bytes, prefix: bytes) -> tuple[AESGCM, bytes, bytes]:
    """The AES-256-GCM key, the nonce and the binding key of one envelope."""
    okm = HKDF(
        hashes.SHA256(), KEY_SIZE + NONCE_SIZE + BIND_KEY_SIZE, salt=None, info=KDF_LABEL + prefix
    ).derive(shared_secret)
    nonce_end = KEY_SIZE + NONCE_SIZE
    return AESGCM(okm[:KEY_SIZE]), okm[KEY_SIZE:nonce_end], okm[nonce_end:]


_scratch_local = threading.local()
SCRATCH_MAX = 16 * 1024 * 1024


def _scratch(size: int) -> memoryview:
    """A per-thread reusable buffer that the ciphertext is encrypted into before it is copied
    into the envelope: one fresh allocation per envelope instead of two. (Measured: two fresh
    1 MiB buffers per seal make glibc trim and re-fault ~480 pages, ~2 ms per seal here.)"""
    buffer: bytearray | None = getattr(_scratch_local, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        if size <= SCRATCH_MAX:
            _scratch_local.buffer = buffer
    return memoryview(buffer)[:size]


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


_helpers: tuple[int, ThreadPoolExecutor] | None = None


def _helper_pool() -> ThreadPoolExecutor:
    """The process's helper threads for :func:`seal`.

    Made again after a fork: a child inherits the executor but not its threads, and would
    wait forever for a job that no thread runs. (No lock: a race only makes a spare pool.)
    """
    global _helpers
    pid, helpers = _helpers or (0, None)
    if helpers is None or pid != os.getpid():
        workers = min(4, usable_cpus())
        helpers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pqc-seal")
        _helpers = (os.getpid(), helpers)
    return helpers


_SINGLE_CPU = usable_cpus() < 2


# ----------------------------------------------------------------------------- seal / sign


def seal(
    payload: bytes,
    sender: Identity,
    recipient: TrustedKey,
    purpose: str,
    seq: int,
    *,
    now: float | None = None,
) -> bytes:
    """Encrypt ``payload`` to ``recipient`` (a trusted KEM key) and sign it as ``sender``."""
    if recipient.kind != KEM_KIND:
        raise KeyStoreError(f"{recipient.name}'s {recipient.algorithm} key is not a KEM key")
    now = time.time() if now is None else now
    if not recipient.valid_at(now):
        raise KeyStoreError(f"{recipient.name}'s KEM key {recipient.key_id.hex()} has expired")
    kem_ids = {name: number for number, name in KEM_IDS.items() if name is not None}
    if recipient.algorithm not in kem_ids:
        raise KeyStoreError(f"{recipient.name}'s KEM {recipient.algorithm!r} is not supported")
    kem = sender.backend.kem(recipient.algorithm)
    header = _header(
        kem_ids[recipient.algorithm],
        AEAD_AES_256_GCM,
        sender.key_id,
        recipient.key_id,
        seq,
        int(now * 1000),
        len(payload) + GCM_TAG_SIZE,
        purpose,
    )
    with _scratch(len(payload) + GCM_TAG_SIZE) as body:
        if len(payload) < PARALLEL_MIN or _SINGLE_CPU:  # a helper would only take turns
            digest = body_digest(payload)
            prefix, bind_key = _encrypt(kem, recipient.public_key, header, payload, body)
        else:
            digest, (prefix, bind_key) = _hash_while_encrypting(
                kem, recipient.public_key, header, payload, body
            )
        message = sealed_message(prefix, bytes(body[-GCM_TAG_SIZE:]), bind_key, digest)
        return b"".join((prefix, body, _sign(sender, message, purpose)))


def _encrypt(
    kem: KEM, public_key: bytes, header: bytes, payload: bytes, body: memoryview
) -> tuple[bytes, bytes]:
    """Encapsulate to ``public_key``, encrypt ``payload`` into ``body`` (ciphertext || tag);
    return the prefix (header || KEM ciphertext) and the binding key."""
    secret, kem_ciphertext = kem.encapsulate(public_key)
    prefix = header + kem_ciphertext
    aead, nonce, bind_key = _derive(secret, prefix)
    aead.encrypt_into(nonce, payload, prefix, body)
    return prefix, bind_key


def _hash_while_encrypting(
    kem: KEM, public_key: bytes, header: bytes, payload: bytes, body: memoryview
) -> tuple[bytes, tuple[bytes, bytes]]:
    """SHA-256(payload) here while a helper thread runs :func:`_encrypt`: the signature needs
    both, and they take about as long (~0.7 and ~0.6 ms per MiB). hashlib releases the GIL
    for the whole call, so the helper gets it at once; AES-GCM releases it too."""
    try:
        job = _helper_pool().submit(_encrypt, kem, public_key, header, payload, body)
    except RuntimeError:  # the interpreter is shutting down: no new threads, do it in turn
        return body_digest(payload), _encrypt(kem, public_key, header, payload, body)
    try:
        digest = body_digest(payload)
    finally:
        try:
            encrypted = job.result()
        except BaseException:
            if not job.done():  # interrupted: the helper may still write into the buffer
                _scratch_local.buffer = None
            raise
    return digest, encrypted


def sign_document(
    payload: bytes, signer: Identity, purpose: str, seq: int, *, now: float | None = None
) -> bytes:
    """Sign ``payload`` (not encrypted: anyone can read it) as ``signer``."""
    now = time.time() if now is None else now
    header = _header(
        0, AEAD_NONE, signer.key_id, NO_RECIPIENT, seq, int(now * 1000), len(payload), purpose
    )
    signature = _sign(signer, document_message(header, payload), purpose)
    return b"".join((header, payload, signature))


def _sign(signer: Identity, message: bytes, purpose: str) -> bytes:
    scheme = signer.backend.signature(ML_DSA_65)
    return scheme.sign(signer.current.private, message, context_for(purpose))


# ----------------------------------------------------------------------------- open / verify


def open(  # shadows the builtin on purpose: envelope.open is the API
    blob: bytes,
    recipient: KemKeyring,
    registry: Registry,
    *,
    freshness: FreshnessStore,
    purpose: str | None = None,
    roles: Collection[str] | None = None,
    window: TimeWindow = DEFAULT_WINDOW,
    now: float | None = None,
) -> tuple[bytes, EnvelopeMeta]:
    """Check and decrypt an envelope made by :func:`seal`; return ``(payload, meta)``.

    Raises a :class:`~pqc.errors.EnvelopeError` subclass (and returns nothing) unless the
    envelope parses, its sender is trusted (and in ``roles`` if given), it is sealed to one of
    ``recipient``'s unexpired keys, it decrypts, its signature verifies, its purpose is
    ``purpose`` (if given), its timestamp is inside ``window`` and its sequence number is new.
    The signature covers the decrypted payload, so decryption comes first; the payload is
    returned only once everything has passed.
    """
    now = time.time() if now is None else now
    header = read_header(blob)
    if header.is_document:
        raise MalformedEnvelope("this is a signed document, not a sealed envelope")
    kem_key = recipient.find(header.recipient_key_id, now)
    if kem_key is None:
        raise WrongRecipient(
            f"sealed to KEM key {header.recipient_key_id.hex()}, which {recipient.name} "
            "does not hold (or which has expired)"
        )
    trusted = registry.sender(header.sender_key_id, now)  # before any expensive work
    view = memoryview(blob)
    kem_end = header.header_length + header.kem_length
    prefix = bytes(view[:kem_end])
    body = view[kem_end : kem_end + header.body_length]
    kem = recipient.backend.kem(kem_key.private.algorithm)
    try:
        secret = kem.decapsulate(kem_key.private, prefix[header.header_length :])
        aead, nonce, bind_key = _derive(secret, prefix)
        payload = aead.decrypt(nonce, body, prefix)
    except (InvalidTag, ValueError) as exc:
        raise TamperedEnvelope(
            f"envelope claiming to come from {trusted.name} does not decrypt: it was changed"
        ) from exc
    tag = bytes(body[-GCM_TAG_SIZE:])
    message = sealed_message(prefix, tag, bind_key, body_digest(payload))
    meta = _authenticate(view, header, trusted, message, recipient.backend, purpose, roles)
    window.check(header.timestamp_ms, now)
    freshness.advance(trusted.name, header.purpose, header.sequence)
    return payload, meta


def verify_document(
    blob: bytes,
    registry: Registry,
    *,
    freshness: FreshnessStore,
    purpose: str | None = None,
    roles: Collection[str] | None = None,
    window: TimeWindow = DEFAULT_WINDOW,
    now: float | None = None,
    backend: Backend | None = None,
) -> tuple[bytes, EnvelopeMeta]:
    """Check a document made by :func:`sign_document`; return ``(payload, meta)``.

    The same checks as :func:`open`, without a recipient or decryption. Documents of
    version 1 are accepted too: they differ only in the (signed) version byte.
    """
    now = time.time() if now is None else now
    header = read_header(blob)
    if not header.is_document:
        raise MalformedEnvelope("this is a sealed envelope, not a signed document")
    trusted = registry.sender(header.sender_key_id, now)
    view = memoryview(blob)
    body = view[header.header_length : header.header_length + header.body_length]
    message = document_message(view[: header.header_length], body)
    meta = _authenticate(view, header, trusted, message, backend or get_backend(), purpose, roles)
    window.check(header.timestamp_ms, now)
    freshness.advance(trusted.name, header.purpose, header.sequence)
    return bytes(body), meta


def _authenticate(
    view: memoryview,
    header: Header,
    trusted: TrustedKey,
    message: bytes,
    backend: Backend,
    purpose: str | None,
    roles: Collection[str] | None,
) -> EnvelopeMeta:
    """Check the signature over ``message``, then the purpose and the sender's role."""
    scheme = backend.signature(trusted.algorithm)
    signature = bytes(view[len(view) - SIGNATURE_SIZE :])
    if not scheme.verify(trusted.public_key, message, signature, context_for(header.purpose)):
        raise TamperedEnvelope(f"signature by {trusted.name} does not verify")
    if purpose is not None and header.purpose != purpose:
        raise WrongPurpose(f"expected purpose {purpose!r}, got {header.purpose!r}")
    if roles is not None and trusted.role not in roles:
        raise UnauthorizedSender(
            f"{trusted.name} is a {trusted.role}; {header.purpose!r} must come from "
            f"{' or '.join(sorted(roles))}"
        )
    return EnvelopeMeta(
        sender=trusted.name,
        sender_role=trusted.role,
        sender_key_id=trusted.key_id.hex(),
        recipient_key_id=None if header.is_document else header.recipient_key_id.hex(),
        kem=KEM_IDS[header.kem_id],
        purpose=header.purpose,
        sequence=header.sequence,
        timestamp=header.timestamp_ms / 1000.0,
        payload_size=header.body_length - (0 if header.is_document else GCM_TAG_SIZE),
    )
