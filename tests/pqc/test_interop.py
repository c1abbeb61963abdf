"""Interop with independent pure-Python implementations (kyber-py, dilithium-py), both ways,
and an envelope opened and made by a from-the-spec implementation of docs/envelope.md."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dilithium_py.ml_dsa import ML_DSA_65
from kyber_py.ml_kem import ML_KEM_768

from pqc import envelope
from pqc.backend import get_backend
from pqc.errors import TamperedEnvelope
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


def spec_body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def spec_kdf(secret: bytes, prefix: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 44, salt=None, info=b"qsfraud/v1/aes-256-gcm" + prefix).derive(
        secret
    )
    return okm[:32], okm[32:]


def spec_open(blob: bytes, dk: bytes, x25519_private: bytes | None, signer_pk: bytes) -> bytes:
    magic, version, kem_id, aead_id, sig_id = struct.unpack_from(">4sBBBB", blob)
    assert (magic, version, aead_id, sig_id) == (b"QSFE", 1, 1, 1)
    body_length, purpose_length = struct.unpack_from(">QB", blob, 56)
    header_end = 65 + purpose_length
    purpose = blob[65:header_end]
    kem_length = {1: 1088, 2: 1120}[kem_id]
    body_start = header_end + kem_length
    body = blob[body_start : body_start + body_length]
    signature = blob[body_start + body_length :]
    assert len(signature) == 3309
    message = blob[:body_start] + spec_body_digest(body)
    assert ML_DSA_65.verify(signer_pk, message, signature, ctx=b"qsfraud/v1/" + purpose)
    kem_ct = blob[header_end:body_start]
    secret = ML_KEM_768.decaps(dk, kem_ct[:1088])
    if kem_id == 2:
        assert x25519_private is not None
        mine = x25519.X25519PrivateKey.from_private_bytes(x25519_private)
        peer = x25519.X25519PublicKey.from_public_bytes(kem_ct[1088:])
        secret += mine.exchange(peer)
    key, nonce = spec_kdf(secret, blob[:body_start])
    return AESGCM(key).decrypt(nonce, body, blob[:body_start])


@pytest.mark.parametrize("kem_algorithm", ["X25519MLKEM768", "ML-KEM-768"])
def test_spec_implementation_opens_our_envelope(tmp_path, kem_algorithm):
    sender = init_keystore(tmp_path / "s", "retailer-1", "retailer")
    receiver = init_keystore(tmp_path / "r", "aggregator", "aggregator", kem_algorithm)
    sender.registry.trust(receiver.public_keys())
    recipient = sender.registry.current_kem_key("aggregator")
    payload = os.urandom(300_000)
    blob = envelope.seal(payload, sender.identity, recipient, "model-update", 4, now=NOW)
    seed = receiver.kem.current.private.seed
    _ek, dk = ML_KEM_768.key_derive(seed[:64])
    x_private = seed[64:] if kem_algorithm == "X25519MLKEM768" else None
    assert spec_open(blob, dk, x_private, sender.identity.current.private.public_key) == payload


def test_our_open_accepts_a_spec_envelope_and_rejects_a_bad_one(tmp_path):
    receiver = init_keystore(tmp_path / "r", "aggregator", "aggregator")
    # the sender's keys come from dilithium-py only: our code never saw its private key
    signer_pk, signer_sk = ML_DSA_65.keygen()
    receiver.registry.add(
        TrustedKey("retailer-9", "retailer", "signature", "ML-DSA-65", signer_pk, NOW)
    )
    save_store_registry(receiver)
    recipient_pk = receiver.kem.current.private.public_key
    ml_secret, ml_ct = ML_KEM_768.encaps(recipient_pk[:1184])
    ephemeral = x25519.X25519PrivateKey.generate()
    peer = x25519.X25519PublicKey.from_public_bytes(recipient_pk[1184:])
    secret = ml_secret + ephemeral.exchange(peer)
    kem_ct = ml_ct + ephemeral.public_key().public_bytes_raw()
    payload = b"an update from another implementation"
    purpose = b"model-update"
    header = struct.pack(
        ">4sBBBB16s16sQQQB",
        b"QSFE",
        1,
        2,
        1,
        1,
        key_id("ML-DSA-65", signer_pk),
        key_id("X25519MLKEM768", recipient_pk),
        11,
        int(NOW * 1000),
        len(payload) + 16,
        len(purpose),
    )
    prefix = header + purpose + kem_ct
    key, nonce = spec_kdf(secret, prefix)
    body = AESGCM(key).encrypt(nonce, payload, prefix)
    message = prefix + spec_body_digest(body)
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
