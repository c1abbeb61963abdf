"""Quantum-safe envelopes: bytes in, sealed bytes out, and back (``docs/envelope.md``).

:func:`seal` encrypts a payload to a recipient's KEM key (X25519MLKEM768 or ML-KEM-768,
then AES-256-GCM) and signs it with the sender's ML-DSA-65 key; :func:`open` checks it all
(format, sender, recipient, signature, time window, sequence) and returns the payload.
:func:`sign_document` / :func:`verify_document` do the same without encryption, for
documents every reader may see (e.g. configuration signed by an admin).

The signature of a sealed envelope covers a keyed, chunked digest of the payload and not the
ciphertext, so sealing a large payload hashes it on two threads (hashlib releases the GIL)
and then signs while a helper thread runs AES-GCM; opening hashes the decrypted payload on two
threads. See "Why the signature covers these bytes" in ``docs/envelope.md``.

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
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

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
VERSION = 3  # of sealed envelopes; they are transient Kafka messages, so only this one opens
DOCUMENT_VERSION = 2  # signed documents did not change in version 3: still written as 2
DOCUMENT_VERSIONS = (1, 2)  # a signed document is the same in both
KEM_IDS = {0: None, 1: ML_KEM_768, 2: X25519_ML_KEM_768}
KEM_SIZES = {0: 0, 1: 1088, 2: 1120}
AEAD_NONE, AEAD_AES_256_GCM = 0, 1
SIGNATURE_IDS = {1: ML_DSA_65}
SIGNATURE_SIZE = 3309
GCM_TAG_SIZE = 16
FIXED = struct.Struct(">4sBBBB16s16sQQQB")  # everything up to and including the purpose length
PURPOSE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
CONTEXT_PREFIX = b"qsfraud/v1/"
KDF_LABEL = b"qsfraud/v3/aes-256-gcm"
DIGEST_LABEL = b"qsfraud/v3/chunked-sha256"
CHUNK_SIZE = 256 * 1024  # of the chunked payload digest: part of the format, never change it
KEY_SIZE, NONCE_SIZE, BIND_KEY_SIZE = 32, 12, 32
PARALLEL_MIN = 64 * 1024  # below this, a helper thread costs more than the overlap saves
NO_RECIPIENT = bytes(KEY_ID_SIZE)
T = TypeVar("T")


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
    version: int = VERSION,
) -> bytes:
    raw = check_purpose(purpose).encode("ascii")
    if not 0 <= seq < 2**64:
        raise ValueError("the sequence number must fit in 64 bits unsigned")
    fixed = FIXED.pack(
        MAGIC,
        version,
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
    if version not in (*DOCUMENT_VERSIONS, VERSION):
        raise MalformedEnvelope(f"unsupported envelope version {version}")
    if kem_id not in KEM_IDS:
        raise MalformedEnvelope(f"unknown KEM id {kem_id}")
    if kem_id != 0 and version != VERSION:
        raise MalformedEnvelope(
            f"unsupported version {version} for a sealed envelope: only version {VERSION} "
            "is opened (the sender must be upgraded)"
        )
    if kem_id == 0 and version not in DOCUMENT_VERSIONS:
        raise MalformedEnvelope(f"unsupported version {version} for a signed document")
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
    """SHA-256 of a signed document's body: what its signature covers instead of the body.

    >>> body_digest(b"abc").hex()[:16]
    'ba7816bf8f01cfea'
    """
    return hashlib.sha256(body).digest()


def chunk_count(length: int) -> int:
    """How many :data:`CHUNK_SIZE` chunks a payload of ``length`` bytes has (an empty payload
    is one empty chunk).

    >>> chunk_count(0), chunk_count(1), chunk_count(CHUNK_SIZE), chunk_count(CHUNK_SIZE + 1)
    (1, 1, 1, 2)
    """
    return max(1, -(-length // CHUNK_SIZE))


def combine_chunk_digests(length: int, chunk_digests: list[bytes]) -> bytes:
    """``SHA-256(DIGEST_LABEL || u64(length) || SHA-256(chunk_0) || SHA-256(chunk_1) || ...)``:
    the payload digest of a sealed envelope from the digests of its chunks."""
    if len(chunk_digests) != chunk_count(length):
        raise ValueError(f"a {length}-byte payload has {chunk_count(length)} chunks")
    return hashlib.sha256(
        b"".join((DIGEST_LABEL, length.to_bytes(8, "big"), *chunk_digests))
    ).digest()


def payload_digest(payload: bytes | memoryview) -> bytes:
    """The chunked SHA-256 of a sealed envelope's payload (``docs/envelope.md``), computed in
    this thread (:func:`_digest` lets a helper thread take chunks too).

    >>> payload_digest(b"abc").hex()[:16]
    '5510101536a5f442'
    """
    return _ChunkHasher(payload).result()


def payload_binding(bind_key: bytes, payload_digest: bytes) -> bytes:
    """``HMAC-SHA-256(bind_key, payload_digest)``: what a sealed envelope's signature covers
    instead of the payload. Keyed, so the public signature confirms no guess of the payload.

    >>> payload_binding(bytes(32), payload_digest(b"abc")).hex()[:16]
    '28ac1d18c5043a76'
    """
    return hmac.digest(bind_key, payload_digest, "sha256")


def sealed_message(prefix: bytes, bind_key: bytes, payload_digest: bytes) -> bytes:
    """What a sealed envelope's signature covers: header || KEM ciphertext, then
    :func:`payload_binding` (``docs/envelope.md``). Not the ciphertext, nor its tag: so the
    signature need not wait for AES-GCM."""
    return prefix + payload_binding(bind_key, payload_digest)


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


class _ChunkHasher:
    """:func:`payload_digest` of one payload, by every thread that calls :meth:`work`.

    Each thread takes the next chunk not yet taken until none is left, so a helper that
    starts late (or never: its CPU is busy) only takes fewer chunks. hashlib releases the GIL
    while it hashes a chunk, so two threads hash on two CPUs.
    """

    def __init__(self, payload: bytes | memoryview) -> None:
        self._view = memoryview(payload)
        self._digests = [b""] * chunk_count(len(self._view))
        self._next = 0
        self._busy = 0
        self._error: BaseException | None = None
        self._idle = threading.Condition(threading.Lock())

    @property
    def chunks(self) -> int:
        return len(self._digests)

    def work(self) -> None:
        """Hash chunks until none is left to take (or one failed)."""
        while True:
            with self._idle:
                index = self._next
                if index >= len(self._digests) or self._error is not None:
                    return
                self._next += 1
                self._busy += 1
            try:
                start = index * CHUNK_SIZE
                chunk = self._view[start : start + CHUNK_SIZE]
                self._digests[index] = hashlib.sha256(chunk).digest()
            except BaseException as exc:  # re-raised by result(), in the caller's thread
                self._error = exc
            finally:
                with self._idle:
                    self._busy -= 1
                    if not self._busy:
                        self._idle.notify_all()

    def result(self) -> bytes:
        """Work too, wait for the chunks other threads took, and combine (or raise)."""
        self.work()
        with self._idle:
            while self._busy:
                self._idle.wait()
        if self._error is not None:
            raise self._error
        return combine_chunk_digests(len(self._view), self._digests)


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
    """The process's helper threads for :func:`seal` and :func:`open`.

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


def _submit(job: Callable[..., T], *args: Any) -> Future[T] | None:
    """``job(*args)`` on a helper thread; None if the interpreter is shutting down (no new
    threads then: the caller does it in turn)."""
    try:
        return _helper_pool().submit(job, *args)
    except RuntimeError:
        return None


def _parallel(length: int) -> bool:
    return length >= PARALLEL_MIN and not _SINGLE_CPU  # else a helper would only take turns


def _digest(payload: bytes | memoryview) -> bytes:
    """:func:`payload_digest`, split over this thread and a helper if that pays."""
    hasher = _ChunkHasher(payload)
    if hasher.chunks > 1 and _parallel(len(payload)):
        _submit(hasher.work)
    return hasher.result()


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
        if not _parallel(len(payload)):
            digest = payload_digest(payload)
            prefix, aead, nonce, bind_key = _encapsulate(kem, recipient.public_key, header)
            _encrypt(aead, nonce, prefix, payload, body)
            signature = _sign(sender, sealed_message(prefix, bind_key, digest), purpose)
        else:
            prefix, signature = _seal_on_two_threads(
                kem, recipient.public_key, header, payload, body, sender, purpose
            )
        return b"".join((prefix, body, signature))


def _encapsulate(kem: KEM, public_key: bytes, header: bytes) -> tuple[bytes, AESGCM, bytes, bytes]:
    """Encapsulate to ``public_key``; return the prefix (header || KEM ciphertext), the AEAD,
    the nonce and the binding key."""
    secret, kem_ciphertext = kem.encapsulate(public_key)
    prefix = header + kem_ciphertext
    return (prefix, *_derive(secret, prefix))


def _encrypt(aead: AESGCM, nonce: bytes, prefix: bytes, payload: bytes, body: memoryview) -> None:
    """AES-256-GCM: ``body`` = ciphertext || tag of ``payload``, with the prefix as AAD."""
    aead.encrypt_into(nonce, payload, prefix, body)


def _seal_on_two_threads(
    kem: KEM,
    public_key: bytes,
    header: bytes,
    payload: bytes,
    body: memoryview,
    sender: Identity,
    purpose: str,
) -> tuple[bytes, bytes]:
    """The prefix and the signature of :func:`seal`, with ``body`` encrypted by a helper.

    The signature needs the prefix, the binding key and the payload digest, not the
    ciphertext. So: the payload's chunks hashed by both threads; the KEM here once no chunk is
    left to take, while the helper finishes its last one; then the signature here while the
    helper runs AES-GCM (ML-DSA signing, SHA-256 and AES-GCM release the GIL; the KEM holds
    it, so it would stop the helper between chunks).
    """
    hasher = _ChunkHasher(payload)
    if hasher.chunks > 1:
        _submit(hasher.work)  # if it never runs, this thread hashes every chunk
    hasher.work()
    prefix, aead, nonce, bind_key = _encapsulate(kem, public_key, header)
    message = sealed_message(prefix, bind_key, hasher.result())
    # only now: the helper takes the GIL as it wakes, and HMAC releases it (signing does too)
    job = _submit(_encrypt, aead, nonce, prefix, payload, body)
    if job is None:
        _encrypt(aead, nonce, prefix, payload, body)
    try:
        signature = _sign(sender, message, purpose)
    finally:
        if job is not None:
            try:
                job.result()
            except BaseException:
                if not job.done():  # interrupted: the helper may still write into the buffer
                    _scratch_local.buffer = None
                raise
    return prefix, signature


def sign_document(
    payload: bytes, signer: Identity, purpose: str, seq: int, *, now: float | None = None
) -> bytes:
    """Sign ``payload`` (not encrypted: anyone can read it) as ``signer``."""
    now = time.time() if now is None else now
    header = _header(
        0,
        AEAD_NONE,
        signer.key_id,
        NO_RECIPIENT,
        seq,
        int(now * 1000),
        len(payload),
        purpose,
        DOCUMENT_VERSION,
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
    The signature covers the decrypted payload's digest, so decryption comes first (a large
    payload is then hashed on two threads); the payload is returned only once everything has
    passed.
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
    if kem_key.private.algorithm != KEM_IDS[header.kem_id]:
        # the key id names the key, the KEM id how to decapsulate: both must agree
        raise WrongRecipient(
            f"sealed to KEM key {header.recipient_key_id.hex()} with {KEM_IDS[header.kem_id]}, "
            f"but that key of {recipient.name} is an {kem_key.private.algorithm} key"
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
    message = sealed_message(prefix, bind_key, _digest(payload))
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
