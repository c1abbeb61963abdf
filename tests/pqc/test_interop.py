"""Interop with independent pure-Python implementations (kyber-py, dilithium-py), both ways,
and an envelope opened and made by a from-the-spec implementation of docs/envelope.md."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import struct
import threading

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dilithium_py.ml_dsa import ML_DSA_65
from kyber_py.ml_kem import ML_KEM_768

from pqc import envelope
from pqc.backend import get_backend
from pqc.errors import MalformedEnvelope, TamperedEnvelope
from pqc.freshness import InMemoryFreshness
from pqc.keys import TrustedKey, init_keystore, key_id, save_store_registry

NOW = 1_750_000_000.0
BACKEND = get_backend("cryptography")


def test_mlkem_ours_keys_their_encapsulation():
    seed = os.urandom(64)
    key = BACKEND.ml_kem_768.keygen(seed)
    ek, _dk = ML_KEM_768.key_derive(seed)
    assert ek == key.public_key
    secret, ciphertext = ML_KEM_768.encaps(key.public_key)
    assert BACKEND.ml_kem_768.decapsulate(key, ciphertext) == secret


def test_mlkem_their_keys_our_encapsulation():
    ek, dk = ML_KEM_768.keygen()
    secret, ciphertext = BACKEND.ml_kem_768.encapsulate(ek)
    assert ML_KEM_768.decaps(dk, ciphertext) == secret


def test_mldsa_their_signature_our_verification():
    seed = os.urandom(32)
    key = BACKEND.ml_dsa_65.keygen(seed)
    pk, sk = ML_DSA_65.key_derive(seed)
    assert pk == key.public_key
    for deterministic in (True, False):
        signature = ML_DSA_65.sign(sk, b"msg", ctx=b"qsfraud/v1/x", deterministic=deterministic)
        assert BACKEND.ml_dsa_65.verify(key.public_key, b"msg", signature, b"qsfraud/v1/x")
        assert not BACKEND.ml_dsa_65.verify(key.public_key, b"msg", signature, b"qsfraud/v1/y")


def test_mldsa_our_signature_their_verification():
    key = BACKEND.ml_dsa_65.keygen()
    signature = BACKEND.ml_dsa_65.sign(key, b"msg", b"qsfraud/v1/x")
    assert ML_DSA_65.verify(key.public_key, b"msg", signature, ctx=b"qsfraud/v1/x")
    assert not ML_DSA_65.verify(key.public_key, b"msg!", signature, ctx=b"qsfraud/v1/x")


# ------------------------------------------------- docs/envelope.md, implemented independently


def spec_kdf(secret: bytes, prefix: bytes) -> tuple[bytes, bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 76, salt=None, info=b"qsfraud/v3/aes-256-gcm" + prefix).derive(
        secret
    )
    return okm[:32], okm[32:44], okm[44:76]


def spec_digest(payload: bytes) -> bytes:
    """The chunked SHA-256 of a payload, as docs/envelope.md defines it."""
    chunks = [payload[i : i + 262144] for i in range(0, len(payload), 262144)] or [b""]
    leaves = b"".join(hashlib.sha256(chunk).digest() for chunk in chunks)
    return hashlib.sha256(
        b"qsfraud/v3/chunked-sha256" + struct.pack(">Q", len(payload)) + leaves
    ).digest()


def spec_binding(bind_key: bytes, payload: bytes) -> bytes:
    return hmac.new(bind_key, spec_digest(payload), "sha256").digest()


def spec_header(
    version: int, kem_id: int, aead_id: int, sender_id: bytes, recipient_id: bytes, seq: int,
    body_length: int, purpose: bytes,
) -> bytes:
    """An envelope header as the specification lays it out (ML-DSA-65, timestamp ``NOW``),
    purpose included."""
    return struct.pack(
        ">4sBBBB16s16sQQQB", b"QSFE", version, kem_id, aead_id, 1, sender_id, recipient_id,
        seq, int(NOW * 1000), body_length, len(purpose),
    ) + purpose


def spec_sealed_prefix(
    version: int, recipient_pk: bytes, signer_pk: bytes, seq: int, payload_length: int
) -> tuple[bytes, bytes]:
    """The shared secret and the prefix (header, purpose ``model-update``, X25519MLKEM768
    ciphertext) of a sealed envelope to ``recipient_pk``, made as the specification says."""
    ml_secret, ml_ct = ML_KEM_768.encaps(recipient_pk[:1184])
    ephemeral = x25519.X25519PrivateKey.generate()
    peer = x25519.X25519PublicKey.from_public_bytes(recipient_pk[1184:])
    header = spec_header(version, 2, 1, key_id("ML-DSA-65", signer_pk),
                         key_id("X25519MLKEM768", recipient_pk), seq, payload_length + 16,
                         b"model-update")
    prefix = header + ml_ct + ephemeral.public_key().public_bytes_raw()
    return ml_secret + ephemeral.exchange(peer), prefix


def spec_open(blob: bytes, dk: bytes, x25519_private: bytes | None, signer_pk: bytes) -> bytes:
    magic, version, kem_id, aead_id, sig_id = struct.unpack_from(">4sBBBB", blob)
    assert (magic, version, aead_id, sig_id) == (b"QSFE", 3, 1, 1)
    body_length, purpose_length = struct.unpack_from(">QB", blob, 56)
    header_end = 65 + purpose_length
    purpose = blob[65:header_end]
    kem_length = {1: 1088, 2: 1120}[kem_id]
    body_start = header_end + kem_length
    prefix = blob[:body_start]
    body = blob[body_start : body_start + body_length]
    signature = blob[body_start + body_length :]
    assert len(signature) == 3309
    kem_ct = blob[header_end:body_start]
    secret = ML_KEM_768.decaps(dk, kem_ct[:1088])
    if kem_id == 2:
        assert x25519_private is not None
        mine = x25519.X25519PrivateKey.from_private_bytes(x25519_private)
        peer = x25519.X25519PublicKey.from_public_bytes(kem_ct[1088:])
        secret += mine.exchange(peer)
    key, nonce, bind_key = spec_kdf(secret, prefix)
    payload = AESGCM(key).decrypt(nonce, body, prefix)
    message = prefix + spec_binding(bind_key, payload)
    assert ML_DSA_65.verify(signer_pk, message, signature, ctx=b"qsfraud/v1/" + purpose)
    return payload


@pytest.mark.parametrize("kem_algorithm", ["X25519MLKEM768", "ML-KEM-768"])
def test_spec_implementation_opens_our_envelope(tmp_path, kem_algorithm):
    sender = init_keystore(tmp_path / "s", "retailer-1", "retailer")
    receiver = init_keystore(tmp_path / "r", "aggregator", "aggregator", kem_algorithm)
    sender.registry.trust(receiver.public_keys())
    recipient = sender.registry.current_kem_key("aggregator")
    payload = os.urandom(600_000)  # three chunks
    blob = envelope.seal(payload, sender.identity, recipient, "model-update", 4, now=NOW)
    seed = receiver.kem.current.private.seed
    _ek, dk = ML_KEM_768.key_derive(seed[:64])
    x_private = seed[64:] if kem_algorithm == "X25519MLKEM768" else None
    assert spec_open(blob, dk, x_private, sender.identity.current.private.public_key) == payload


@pytest.mark.parametrize(
    "payload",
    [b"an update from another implementation", random.Random(3).randbytes(700_000)],
    ids=["one chunk", "three chunks"],
)
def test_our_open_accepts_a_spec_envelope_and_rejects_a_bad_one(tmp_path, payload):
    receiver = init_keystore(tmp_path / "r", "aggregator", "aggregator")
    # the sender's keys come from dilithium-py only: our code never saw its private key
    signer_pk, signer_sk = ML_DSA_65.keygen()
    receiver.registry.add(
        TrustedKey("retailer-9", "retailer", "signature", "ML-DSA-65", signer_pk, NOW)
    )
    save_store_registry(receiver)
    recipient_pk = receiver.kem.current.private.public_key
    secret, prefix = spec_sealed_prefix(3, recipient_pk, signer_pk, 11, len(payload))
    key, nonce, bind_key = spec_kdf(secret, prefix)
    body = AESGCM(key).encrypt(nonce, payload, prefix)
    message = prefix + spec_binding(bind_key, payload)
    signature = ML_DSA_65.sign(signer_sk, message, ctx=b"qsfraud/v1/model-update")
    blob = prefix + body + signature
    got, meta = envelope.open(
        blob, receiver.kem, receiver.registry, freshness=InMemoryFreshness(), now=NOW
    )
    assert got == payload and meta.sender == "retailer-9" and meta.sequence == 11
    wrong_context = ML_DSA_65.sign(signer_sk, message, ctx=b"qsfraud/v1/other")
    with pytest.raises(TamperedEnvelope):
        envelope.open(
            prefix + body + wrong_context,
            receiver.kem,
            receiver.registry,
            freshness=InMemoryFreshness(),
            now=NOW,
        )


# ------------------------------------------------- what the signature must bind, from the spec


def gf128_multiply(x: int, y: int) -> int:
    """Multiplication in GCM's GF(2^128) (SP 800-38D, algorithm 1; blocks as big-endian ints)."""
    z, v = 0, y
    for bit in range(127, -1, -1):
        if (x >> bit) & 1:
            z ^= v
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    return z


def test_recipient_cannot_swap_the_ciphertext_under_the_same_tag(tmp_path):
    """The recipient knows the AES key, and GCM is not key-committing: it can change two
    ciphertext blocks so that the tag stays the same. The payload binding in the signed
    message is what catches that (docs/envelope.md, "Why the signature covers ...")."""
    sender = init_keystore(tmp_path / "s", "retailer-1", "retailer")
    receiver = init_keystore(tmp_path / "r", "aggregator", "aggregator")
    sender.registry.trust(receiver.public_keys())
    receiver.registry.trust(sender.public_keys())
    payload = os.urandom(1 << 20)
    recipient = sender.registry.current_kem_key("aggregator")
    blob = envelope.seal(payload, sender.identity, recipient, "model-update", 1, now=NOW)
    header = envelope.read_header(blob)
    body_start = header.header_length + header.kem_length
    prefix, body = blob[:body_start], blob[body_start : body_start + header.body_length]
    kem = BACKEND.kem("X25519MLKEM768")
    secret = kem.decapsulate(receiver.kem.current.private, prefix[header.header_length :])
    key, nonce, _ = spec_kdf(secret, prefix)
    # GHASH is linear: adding d to ciphertext block j and d*H to block j+1 keeps it
    h = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(bytes(16))
    d = int.from_bytes(os.urandom(16), "big") | 1
    dh = gf128_multiply(d, int.from_bytes(h, "big"))
    forged = bytearray(body)
    j = 1000 * 16
    for offset, delta in ((j, d), (j + 16, dh)):
        block = int.from_bytes(forged[offset : offset + 16], "big") ^ delta
        forged[offset : offset + 16] = block.to_bytes(16, "big")
    assert bytes(forged[-16:]) == body[-16:]
    other_payload = AESGCM(key).decrypt(nonce, bytes(forged), prefix)  # GCM accepts it
    assert other_payload != payload
    forged_blob = prefix + bytes(forged) + blob[body_start + header.body_length :]
    with pytest.raises(TamperedEnvelope, match="signature"):
        envelope.open(
            forged_blob, receiver.kem, receiver.registry, freshness=InMemoryFreshness(), now=NOW
        )
    got, _ = envelope.open(
        blob, receiver.kem, receiver.registry, freshness=InMemoryFreshness(), now=NOW
    )
    assert got == payload


def spec_document(version: int, signer_sk: bytes, signer_pk: bytes, payload: bytes) -> bytes:
    header = spec_header(version, 0, 0, key_id("ML-DSA-65", signer_pk), bytes(16), 5,
                         len(payload), b"config")
    message = header + hashlib.sha256(payload).digest()
    return header + payload + ML_DSA_65.sign(signer_sk, message, ctx=b"qsfraud/v1/config")


@pytest.mark.parametrize("version", [1, 2])
def test_signed_documents_of_both_versions_verify(tmp_path, version):
    reader = init_keystore(tmp_path / "r", "retailer-1", "retailer")
    signer_pk, signer_sk = ML_DSA_65.keygen()
    reader.registry.add(TrustedKey("admin-9", "admin", "signature", "ML-DSA-65", signer_pk, NOW))
    doc = spec_document(version, signer_sk, signer_pk, b'{"thresholds": {"verify": 0.6}}')
    got, meta = envelope.verify_document(
        doc, reader.registry, freshness=InMemoryFreshness(), roles={"admin"}, now=NOW
    )
    assert got == b'{"thresholds": {"verify": 0.6}}' and meta.sender == "admin-9"
    other = bytearray(doc)
    other[4] = 3 - version  # the version byte is signed
    with pytest.raises(TamperedEnvelope):
        envelope.verify_document(
            bytes(other), reader.registry, freshness=InMemoryFreshness(), now=NOW
        )


@pytest.mark.parametrize("version", [1, 2])
def test_older_sealed_envelopes_are_refused(tmp_path, version):
    sender = init_keystore(tmp_path / "s", "retailer-1", "retailer")
    receiver = init_keystore(tmp_path / "r", "aggregator", "aggregator")
    sender.registry.trust(receiver.public_keys())
    receiver.registry.trust(sender.public_keys())
    recipient = sender.registry.current_kem_key("aggregator")
    blob = bytearray(envelope.seal(b"x", sender.identity, recipient, "model-update", 1, now=NOW))
    blob[4] = version
    with pytest.raises(MalformedEnvelope, match=f"version {version} for a sealed envelope"):
        envelope.open(
            bytes(blob), receiver.kem, receiver.registry, freshness=InMemoryFreshness(), now=NOW
        )


def spec_v2_sealed(
    recipient_pk: bytes, signer_pk: bytes, signer_sk: bytes, payload: bytes
) -> bytes:
    """A sealed envelope of version 2 (M = prefix || tag || HMAC(bind_key, SHA-256(payload)),
    HKDF info qsfraud/v2/aes-256-gcm), made as the version 2 specification said."""
    secret, prefix = spec_sealed_prefix(2, recipient_pk, signer_pk, 12, len(payload))
    okm = HKDF(hashes.SHA256(), 76, salt=None, info=b"qsfraud/v2/aes-256-gcm" + prefix).derive(
        secret
    )
    body = AESGCM(okm[:32]).encrypt(okm[32:44], payload, prefix)
    binding = hmac.new(okm[44:], hashlib.sha256(payload).digest(), "sha256").digest()
    message = prefix + body[-16:] + binding
    return prefix + body + ML_DSA_65.sign(signer_sk, message, ctx=b"qsfraud/v1/model-update")


def test_a_genuine_version_2_sealed_envelope_is_refused(tmp_path):
    receiver = init_keystore(tmp_path / "r", "aggregator", "aggregator")
    signer_pk, signer_sk = ML_DSA_65.keygen()
    receiver.registry.add(
        TrustedKey("retailer-9", "retailer", "signature", "ML-DSA-65", signer_pk, NOW)
    )
    recipient_pk = receiver.kem.current.private.public_key
    blob = spec_v2_sealed(recipient_pk, signer_pk, signer_sk, b"an old update")
    seen = InMemoryFreshness()
    with pytest.raises(MalformedEnvelope, match="version 2 for a sealed envelope"):
        envelope.open(blob, receiver.kem, receiver.registry, freshness=seen, now=NOW)
    # relabelled as version 3 it is still no envelope: HKDF label and signed message differ
    relabelled = bytearray(blob)
    relabelled[4] = 3
    with pytest.raises(TamperedEnvelope):
        envelope.open(bytes(relabelled), receiver.kem, receiver.registry, freshness=seen, now=NOW)
    assert seen.last_sequence("retailer-9", "model-update") is None


def test_a_signed_document_of_version_3_is_malformed(tmp_path):
    """Version 3 changed sealed envelopes only: documents are still written as version 2."""
    reader = init_keystore(tmp_path / "r", "retailer-1", "retailer")
    signer_pk, signer_sk = ML_DSA_65.keygen()
    reader.registry.add(TrustedKey("admin-9", "admin", "signature", "ML-DSA-65", signer_pk, NOW))
    doc = spec_document(3, signer_sk, signer_pk, b"{}")
    with pytest.raises(MalformedEnvelope, match="version 3 for a signed document"):
        envelope.verify_document(doc, reader.registry, freshness=InMemoryFreshness(), now=NOW)
    admin = init_keystore(tmp_path / "a", "admin-1", "admin")
    assert envelope.sign_document(b"{}", admin.identity, "config", 1)[4] == 2


# ------------------------------------------------- the chunked payload digest, from the spec

CHUNK = 256 * 1024


def test_chunked_digest_known_value():
    payload = bytes(i % 251 for i in range(2 * CHUNK + 1000))  # chunks of 256, 256, ~1 KiB
    expected = "51798ef80bccd2b237ed1ad8b969d80b5ecbdabbbb312e4283e8d7920e59ab07"
    assert spec_digest(payload).hex() == expected
    assert envelope.payload_digest(payload).hex() == expected
    assert envelope.CHUNK_SIZE == CHUNK
    # the empty payload is one empty chunk
    empty = hashlib.sha256(
        b"qsfraud/v3/chunked-sha256" + bytes(8) + hashlib.sha256(b"").digest()
    ).digest()
    assert envelope.payload_digest(b"") == spec_digest(b"") == empty
    # the length is bound: a payload and the same one plus a zero byte differ
    assert envelope.payload_digest(payload) != envelope.payload_digest(payload + b"\0")


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 4 * CHUNK, 4 * CHUNK + 7, 9 * CHUNK - 3]
)
def test_chunked_digest_is_the_same_inline_and_on_two_threads(monkeypatch, size):
    monkeypatch.setattr(envelope, "_SINGLE_CPU", False)
    payload = random.Random(size).randbytes(size)
    inline = envelope.payload_digest(payload)
    assert inline == spec_digest(payload)
    assert envelope._digest(payload) == inline  # through the helper pool where it pays
    hasher = envelope._ChunkHasher(payload)  # two threads that certainly both hash
    other = threading.Thread(target=hasher.work)
    other.start()
    try:
        assert hasher.result() == inline
    finally:
        other.join()
