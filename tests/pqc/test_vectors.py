"""The test vectors of docs/envelope-vectors.json: opened by our code, re-made byte for byte
from their stated randomness (by our code and by an independent one built from
docs/envelope.md with kyber-py and dilithium-py), and every documented rejection checked.

Regenerate the file (only when the format changes on purpose) with
``PYTHONPATH=. .venv/bin/python tests/pqc/test_vectors.py --write``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dilithium_py.ml_dsa import ML_DSA_65 as REFERENCE_MLDSA
from kyber_py.ml_kem import ML_KEM_768 as REFERENCE_MLKEM

from pqc import envelope, errors
from pqc.backend import (
    KEM,
    ML_DSA_65,
    X25519_ML_KEM_768,
    Backend,
    PrivateKey,
    find_liboqs,
    get_backend,
)
from pqc.freshness import InMemoryFreshness
from pqc.hybrid_kem import X25519MLKEM768
from pqc.keys import Identity, KemKeyring, OwnedKey, Registry, TrustedKey, key_id
from pqc.openssl_backend import OpenSSLMLDSA65, OpenSSLMLKEM768, openssl_backend

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "envelope-vectors.json"
OURS = openssl_backend()
TIMESTAMP_MS = 1_750_000_000_000
OPEN_AT = 1_750_000_001.0  # one second after the timestamp: inside the window


def fixed(label: str, size: int) -> bytes:
    """Reproducible "random" bytes: SHAKE-256 of a label (the label is in the vectors)."""
    return hashlib.shake_256(b"qsfraud test vector: " + label.encode("ascii")).digest(size)


# ------------------------------------------------- a backend whose randomness is given
# Test code only: production code reaches backends through pqc.backend.get_backend, which
# never returns this one.


class FixedMLKEM768(OpenSSLMLKEM768):
    """ML-KEM-768 whose encapsulation uses the given 32-byte ``m`` (FIPS 203, algorithm 17,
    from kyber-py: OpenSSL takes no caller randomness). Keys and decapsulation: OpenSSL."""

    def __init__(self, m: bytes) -> None:
        self.m = m

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        return REFERENCE_MLKEM._encaps_internal(bytes(public_key), self.m)


class FixedX25519MLKEM768(X25519MLKEM768):
    """X25519MLKEM768 whose ephemeral X25519 private key is given."""

    def __init__(self, ml_kem_768: KEM, ephemeral_private: bytes) -> None:
        super().__init__(ml_kem_768)
        self.ephemeral_private = ephemeral_private

    def _ephemeral(self) -> x25519.X25519PrivateKey:
        return x25519.X25519PrivateKey.from_private_bytes(self.ephemeral_private)


class DeterministicMLDSA65(OpenSSLMLDSA65):
    """ML-DSA-65 signing in FIPS 204's deterministic variant (rnd = 32 zero bytes), from
    dilithium-py: OpenSSL through ``cryptography`` only signs hedged."""

    def sign(self, private_key: PrivateKey, message: bytes, context: bytes) -> bytes:
        _public, secret = REFERENCE_MLDSA.key_derive(private_key.seed)
        return REFERENCE_MLDSA.sign(secret, message, ctx=context, deterministic=True)


@dataclass(frozen=True)
class FixedRandomnessBackend(Backend):
    x25519_ephemeral: bytes = bytes(32)

    def kem(self, algorithm: str) -> KEM:
        if algorithm == X25519_ML_KEM_768:
            return FixedX25519MLKEM768(self.ml_kem_768, self.x25519_ephemeral)
        return super().kem(algorithm)


def fixed_backend(mlkem_m: bytes, x25519_ephemeral: bytes) -> Backend:
    return FixedRandomnessBackend(
        "fixed-randomness", FixedMLKEM768(mlkem_m), DeterministicMLDSA65(), x25519_ephemeral
    )


# ------------------------------------------------- the parties of the vectors


SEED_LABELS = {
    "sender": "sender ML-DSA-65 seed",
    "signer": "document signer ML-DSA-65 seed",
    "hybrid": "recipient X25519MLKEM768 seed",
    "mlkem": "recipient ML-KEM-768 seed",
}


def parties() -> dict[str, tuple[str, str, PrivateKey]]:
    """name, role and private key of each party of the vectors, by label."""
    dsa, hybrid, mlkem = OURS.signature(ML_DSA_65), OURS.kem(X25519_ML_KEM_768), OURS.ml_kem_768
    return {
        "sender": ("retailer-1", "retailer", dsa.keygen(fixed(SEED_LABELS["sender"], 32))),
        "signer": ("admin-1", "admin", dsa.keygen(fixed(SEED_LABELS["signer"], 32))),
        "hybrid": ("aggregator", "aggregator", hybrid.keygen(fixed(SEED_LABELS["hybrid"], 96))),
        "mlkem": ("aggregator", "aggregator", mlkem.keygen(fixed(SEED_LABELS["mlkem"], 64))),
    }


def party_json(label: str, name: str, role: str, key: PrivateKey) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "algorithm": key.algorithm,
        "seed_label": label,
        "seed": key.seed.hex(),
        "public_key": key.public_key.hex(),
        "key_id": key_id(key.algorithm, key.public_key).hex(),
    }


def registry_of(keys: dict[str, Any]) -> Registry:
    registry = Registry()
    for name, role, key in keys.values():
        kind = "signature" if key.algorithm == ML_DSA_65 else "kem"
        registry.add(TrustedKey(name, role, kind, key.algorithm, key.public_key, 0.0))
    return registry


def keyring_of(key: PrivateKey) -> KemKeyring:
    return KemKeyring("aggregator", "aggregator", (OwnedKey(key, 0.0),), OURS)


# ------------------------------------------------- the rejections each vector documents

XOR = 0x01


def sealed_fields(purpose_length: int, kem_length: int, body_length: int) -> list[tuple]:
    """(field, offset of the flipped byte, documented error) of a sealed envelope."""
    kem_start = 65 + purpose_length
    body_start = kem_start + kem_length
    signature_start = body_start + body_length
    return [
        ("magic", 0, "MalformedEnvelope"),
        ("version", 4, "MalformedEnvelope"),
        ("kem_id", 5, "MalformedEnvelope"),
        ("aead_id", 6, "MalformedEnvelope"),
        ("signature_id", 7, "MalformedEnvelope"),
        ("sender_key_id", 8, "UnknownSender"),
        ("recipient_key_id", 24, "WrongRecipient"),
        ("sequence", 47, "TamperedEnvelope"),
        ("timestamp", 48, "TamperedEnvelope"),
        ("body_length", 63, "MalformedEnvelope"),
        ("purpose_length", 64, "MalformedEnvelope"),
        ("purpose (still a valid purpose)", 65, "TamperedEnvelope"),
        ("purpose (no longer a valid purpose)", 70, "MalformedEnvelope"),
        ("kem_ciphertext (first byte)", kem_start, "TamperedEnvelope"),
        ("kem_ciphertext (last byte)", body_start - 1, "TamperedEnvelope"),
        ("body (ciphertext)", body_start, "TamperedEnvelope"),
        ("body (GCM tag)", signature_start - 1, "TamperedEnvelope"),
        ("signature (first byte)", signature_start, "TamperedEnvelope"),
        ("signature (last byte)", signature_start + 3308, "TamperedEnvelope"),
    ]


def document_fields(purpose_length: int, body_length: int) -> list[tuple]:
    body_start = 65 + purpose_length
    signature_start = body_start + body_length
    return [
        ("magic", 0, "MalformedEnvelope"),
        ("version", 4, "MalformedEnvelope"),
        ("kem_id", 5, "MalformedEnvelope"),
        ("aead_id", 6, "MalformedEnvelope"),
        ("signature_id", 7, "MalformedEnvelope"),
        ("sender_key_id", 8, "UnknownSender"),
        ("recipient_key_id", 39, "MalformedEnvelope"),
        ("sequence", 47, "TamperedEnvelope"),
        ("timestamp", 48, "TamperedEnvelope"),
        ("body_length", 63, "MalformedEnvelope"),
        ("purpose_length", 64, "MalformedEnvelope"),
        ("purpose (still a valid purpose)", 65, "TamperedEnvelope"),
        ("body", body_start, "TamperedEnvelope"),
        ("signature (first byte)", signature_start, "TamperedEnvelope"),
        ("signature (last byte)", signature_start + 3308, "TamperedEnvelope"),
    ]


def rejections(fields: list[tuple]) -> list[dict[str, Any]]:
    return [{"field": f, "offset": o, "xor": XOR, "error": e} for f, o, e in fields]


# ------------------------------------------------- making the vectors


SEALED = [
    {
        "name": "sealed, X25519MLKEM768",
        "recipient": "hybrid",
        "purpose": "model-update",
        "sequence": 7,
        "payload": b'{"round": 7, "weights": [0.25, -1.5, 3.0]}',
    },
    {
        "name": "sealed, ML-KEM-768",
        "recipient": "mlkem",
        "purpose": "model-update",
        "sequence": 8,
        "payload": b'{"round": 8, "weights": [0.5, 2.0]}',
    },
]
DOCUMENT = {
    "name": "signed document",
    "purpose": "config",
    "sequence": 3,
    "payload": b'{"thresholds": {"verify": 0.6}}',
}


def derive(secret: bytes, prefix: bytes) -> tuple[bytes, bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 76, salt=None, info=b"qsfraud/v3/aes-256-gcm" + prefix).derive(
        secret
    )
    return okm[:32], okm[32:44], okm[44:76]


def make_sealed(spec: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    sender_name, sender_role, sender_key = keys["sender"]
    _name, _role, recipient_key = keys[spec["recipient"]]
    hybrid = recipient_key.algorithm == X25519_ML_KEM_768
    label = spec["recipient"]
    m = fixed(f"{label} ML-KEM-768 encapsulation m", 32)
    ephemeral = fixed(f"{label} X25519 ephemeral private key", 32) if hybrid else None
    backend = fixed_backend(m, ephemeral or bytes(32))
    identity = Identity(sender_name, sender_role, (OwnedKey(sender_key, 0.0),), backend)
    recipient = TrustedKey(
        "aggregator", "aggregator", "kem", recipient_key.algorithm, recipient_key.public_key, 0.0
    )
    blob = envelope.seal(
        spec["payload"],
        identity,
        recipient,
        spec["purpose"],
        spec["sequence"],
        now=TIMESTAMP_MS / 1000,
    )
    header = envelope.read_header(blob)
    prefix_end = header.header_length + header.kem_length
    prefix = blob[:prefix_end]
    secret = OURS.kem(recipient_key.algorithm).decapsulate(
        recipient_key, prefix[header.header_length :]
    )
    aes_key, nonce, bind_key = derive(secret, prefix)
    digest = envelope.payload_digest(spec["payload"])
    randomness = {
        "mlkem_encapsulation_m_label": f"{label} ML-KEM-768 encapsulation m",
        "mlkem_encapsulation_m": m.hex(),
    }
    if ephemeral is not None:
        randomness["x25519_ephemeral_private_label"] = f"{label} X25519 ephemeral private key"
        randomness["x25519_ephemeral_private"] = ephemeral.hex()
    randomness["mldsa_rnd"] = bytes(32).hex()
    return {
        "name": spec["name"],
        "kem": recipient_key.algorithm,
        "sender": "sender",
        "recipient": label,
        "purpose": spec["purpose"],
        "sequence": spec["sequence"],
        "timestamp_ms": TIMESTAMP_MS,
        "open_at": OPEN_AT,
        "payload": spec["payload"].hex(),
        "randomness": randomness,
        "intermediate": {
            "header": blob[: header.header_length].hex(),
            "kem_ciphertext": prefix[header.header_length :].hex(),
            "shared_secret": secret.hex(),
            "aes_key": aes_key.hex(),
            "nonce": nonce.hex(),
            "bind_key": bind_key.hex(),
            "payload_digest": digest.hex(),
            "binding": hmac.new(bind_key, digest, "sha256").hexdigest(),
            "signed_message_sha256": hashlib.sha256(
                prefix + hmac.new(bind_key, digest, "sha256").digest()
            ).hexdigest(),
        },
        "envelope": blob.hex(),
        "rejections": rejections(
            sealed_fields(len(spec["purpose"]), header.kem_length, header.body_length)
        ),
    }


def make_document(keys: dict[str, Any]) -> dict[str, Any]:
    name, role, key = keys["signer"]
    identity = Identity(name, role, (OwnedKey(key, 0.0),), fixed_backend(bytes(32), bytes(32)))
    blob = envelope.sign_document(
        DOCUMENT["payload"],
        identity,
        DOCUMENT["purpose"],
        DOCUMENT["sequence"],
        now=TIMESTAMP_MS / 1000,
    )
    header = envelope.read_header(blob)
    head = blob[: header.header_length]
    return {
        "name": DOCUMENT["name"],
        "signer": "signer",
        "purpose": DOCUMENT["purpose"],
        "sequence": DOCUMENT["sequence"],
        "timestamp_ms": TIMESTAMP_MS,
        "open_at": OPEN_AT,
        "payload": DOCUMENT["payload"].hex(),
        "randomness": {"mldsa_rnd": bytes(32).hex()},
        "intermediate": {
            "header": head.hex(),
            "body_sha256": hashlib.sha256(DOCUMENT["payload"]).hexdigest(),
            "signed_message_sha256": hashlib.sha256(
                head + hashlib.sha256(DOCUMENT["payload"]).digest()
            ).hexdigest(),
        },
        "envelope": blob.hex(),
        "rejections": rejections(document_fields(len(DOCUMENT["purpose"]), header.body_length)),
    }


def make_vectors() -> dict[str, Any]:
    keys = parties()
    return {
        "format": "qsfraud-envelope-vectors",
        "version": 1,
        "envelope_versions": {"sealed": 3, "signed_document": 2},
        "notes": [
            "All byte strings are lowercase hex. Seeds and randomness are SHAKE-256("
            "'qsfraud test vector: ' || label) of the stated size; the label is given.",
            "Private keys are FIPS seeds: ML-DSA-65 xi (32 B), ML-KEM-768 d || z (64 B), "
            "X25519MLKEM768 d || z || x25519_private (96 B).",
            "ML-KEM encapsulation uses the stated m (FIPS 203 ML-KEM.Encaps_internal); "
            "ML-DSA-65 signs in the deterministic variant (rnd = 32 zero bytes, FIPS 204, "
            "pure, context 'qsfraud/v1/' || purpose). The AES-GCM nonce is derived, not random.",
            "Open each vector at open_at (seconds since the epoch) with empty replay state: "
            "it is accepted. Each rejection XORs one byte at offset with xor; opening the "
            "result must raise error (a pqc.errors class; docs/envelope.md, Opening).",
        ],
        "keys": {label: party_json(SEED_LABELS[label], *value) for label, value in keys.items()},
        "sealed": [make_sealed(spec, keys) for spec in SEALED],
        "signed_document": make_document(keys),
    }


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=2) + "\n"


# ------------------------------------------------- the tests


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return parties()


def test_the_file_is_what_the_stated_randomness_makes(vectors):
    """Our seal and sign_document, given the stated keys and randomness, make these exact
    bytes (the whole file, rejections and intermediate values included)."""
    assert render(make_vectors()) == VECTORS.read_text(encoding="utf-8")


def test_keys_are_the_seeds_keys_in_the_reference_implementations(vectors):
    for label, party in vectors["keys"].items():
        seed = bytes.fromhex(party["seed"])
        assert seed == fixed(party["seed_label"], len(seed))
        public = bytes.fromhex(party["public_key"])
        if party["algorithm"] == ML_DSA_65:
            assert REFERENCE_MLDSA.key_derive(seed)[0] == public, label
        else:
            assert REFERENCE_MLKEM.key_derive(seed[:64])[0] == public[:1184], label
            if party["algorithm"] == X25519_ML_KEM_768:
                x_public = x25519.X25519PrivateKey.from_private_bytes(seed[64:]).public_key()
                assert x_public.public_bytes_raw() == public[1184:]
        assert key_id(party["algorithm"], public).hex() == party["key_id"]


def open_sealed(blob: bytes, vector: dict[str, Any], keys: dict[str, Any]):
    registry = registry_of({"sender": keys["sender"]})
    return envelope.open(
        blob,
        keyring_of(keys[vector["recipient"]][2]),
        registry,
        freshness=InMemoryFreshness(),
        purpose=vector["purpose"],
        roles={"retailer"},
        now=vector["open_at"],
    )


def verify(blob: bytes, vector: dict[str, Any], keys: dict[str, Any]):
    return envelope.verify_document(
        blob,
        registry_of({"signer": keys["signer"]}),
        freshness=InMemoryFreshness(),
        purpose=vector["purpose"],
        roles={"admin"},
        now=vector["open_at"],
        backend=OURS,
    )


@pytest.mark.parametrize("index", [0, 1], ids=["X25519MLKEM768", "ML-KEM-768"])
def test_our_open_accepts_each_sealed_vector(vectors, keys, index):
    vector = vectors["sealed"][index]
    payload, meta = open_sealed(bytes.fromhex(vector["envelope"]), vector, keys)
    assert payload == bytes.fromhex(vector["payload"])
    assert (meta.sender, meta.kem, meta.sequence) == (
        "retailer-1",
        vector["kem"],
        vector["sequence"],
    )


def test_our_verify_accepts_the_signed_document(vectors, keys):
    vector = vectors["signed_document"]
    payload, meta = verify(bytes.fromhex(vector["envelope"]), vector, keys)
    assert payload == bytes.fromhex(vector["payload"]) and meta.sender == "admin-1"


def spec_sealed(vector: dict[str, Any], keys: dict[str, Any]) -> bytes:
    """The sealed vector made from docs/envelope.md with kyber-py and dilithium-py only."""
    sender_pk = bytes.fromhex(keys["sender"]["public_key"])
    recipient = keys[vector["recipient"]]
    recipient_pk = bytes.fromhex(recipient["public_key"])
    randomness = vector["randomness"]
    secret, kem_ct = REFERENCE_MLKEM._encaps_internal(
        recipient_pk[:1184], bytes.fromhex(randomness["mlkem_encapsulation_m"])
    )
    kem_id = 1
    if recipient["algorithm"] == X25519_ML_KEM_768:
        kem_id = 2
        ephemeral = x25519.X25519PrivateKey.from_private_bytes(
            bytes.fromhex(randomness["x25519_ephemeral_private"])
        )
        peer = x25519.X25519PublicKey.from_public_bytes(recipient_pk[1184:])
        secret += ephemeral.exchange(peer)
        kem_ct += ephemeral.public_key().public_bytes_raw()
    payload = bytes.fromhex(vector["payload"])
    purpose = vector["purpose"].encode("ascii")
    header = (
        struct.pack(
            ">4sBBBB16s16sQQQB",
            b"QSFE",
            3,
            kem_id,
            1,
            1,
            key_id(ML_DSA_65, sender_pk),
            key_id(recipient["algorithm"], recipient_pk),
            vector["sequence"],
            vector["timestamp_ms"],
            len(payload) + 16,
            len(purpose),
        )
        + purpose
    )
    prefix = header + kem_ct
    aes_key, nonce, bind_key = derive(secret, prefix)
    chunks = [payload[i : i + 262144] for i in range(0, len(payload), 262144)] or [b""]
    digest = hashlib.sha256(
        b"qsfraud/v3/chunked-sha256"
        + struct.pack(">Q", len(payload))
        + b"".join(hashlib.sha256(c).digest() for c in chunks)
    ).digest()
    message = prefix + hmac.new(bind_key, digest, "sha256").digest()
    _pk, sk = REFERENCE_MLDSA.key_derive(bytes.fromhex(keys["sender"]["seed"]))
    signature = REFERENCE_MLDSA.sign(sk, message, ctx=b"qsfraud/v1/" + purpose, deterministic=True)
    return prefix + AESGCM(aes_key).encrypt(nonce, payload, prefix) + signature


@pytest.mark.parametrize("index", [0, 1], ids=["X25519MLKEM768", "ML-KEM-768"])
def test_reference_implementations_make_and_open_each_sealed_vector(vectors, index):
    vector = vectors["sealed"][index]
    blob = bytes.fromhex(vector["envelope"])
    assert spec_sealed(vector, vectors["keys"]) == blob
    # and open it: kyber-py decapsulation, dilithium-py verification
    recipient_seed = bytes.fromhex(vectors["keys"][vector["recipient"]]["seed"])
    _ek, dk = REFERENCE_MLKEM.key_derive(recipient_seed[:64])
    header_end = 65 + len(vector["purpose"])
    kem_end = header_end + (1120 if vector["kem"] == X25519_ML_KEM_768 else 1088)
    secret = REFERENCE_MLKEM.decaps(dk, blob[header_end : header_end + 1088])
    assert secret.hex() == vector["intermediate"]["shared_secret"][:64]
    sender_pk = bytes.fromhex(vectors["keys"]["sender"]["public_key"])
    message_hash = vector["intermediate"]["signed_message_sha256"]
    aes_key, nonce, bind_key = derive(
        bytes.fromhex(vector["intermediate"]["shared_secret"]), blob[:kem_end]
    )
    body = blob[kem_end:-3309]
    payload = AESGCM(aes_key).decrypt(nonce, body, blob[:kem_end])
    message = (
        blob[:kem_end]
        + hmac.new(
            bind_key, bytes.fromhex(vector["intermediate"]["payload_digest"]), "sha256"
        ).digest()
    )
    assert hashlib.sha256(message).hexdigest() == message_hash
    assert payload == bytes.fromhex(vector["payload"])
    ctx = b"qsfraud/v1/" + vector["purpose"].encode("ascii")
    assert REFERENCE_MLDSA.verify(sender_pk, message, blob[-3309:], ctx=ctx)


def test_reference_implementation_makes_and_verifies_the_signed_document(vectors):
    vector = vectors["signed_document"]
    blob = bytes.fromhex(vector["envelope"])
    signer = vectors["keys"]["signer"]
    payload = bytes.fromhex(vector["payload"])
    purpose = vector["purpose"].encode("ascii")
    header = (
        struct.pack(
            ">4sBBBB16s16sQQQB",
            b"QSFE",
            2,
            0,
            0,
            1,
            bytes.fromhex(signer["key_id"]),
            bytes(16),
            vector["sequence"],
            vector["timestamp_ms"],
            len(payload),
            len(purpose),
        )
        + purpose
    )
    message = header + hashlib.sha256(payload).digest()
    _pk, sk = REFERENCE_MLDSA.key_derive(bytes.fromhex(signer["seed"]))
    signature = REFERENCE_MLDSA.sign(sk, message, ctx=b"qsfraud/v1/" + purpose, deterministic=True)
    assert header + payload + signature == blob
    assert REFERENCE_MLDSA.verify(
        bytes.fromhex(signer["public_key"]), message, blob[-3309:], ctx=b"qsfraud/v1/" + purpose
    )


def rejection_cases(vectors: dict[str, Any]) -> list[tuple[str, int]]:
    cases = [
        (f"sealed/{i}", j)
        for i, v in enumerate(vectors["sealed"])
        for j in range(len(v["rejections"]))
    ]
    return cases + [("document", j) for j in range(len(vectors["signed_document"]["rejections"]))]


ALL_REJECTIONS = (
    rejection_cases(json.loads(VECTORS.read_text(encoding="utf-8"))) if VECTORS.exists() else []
)


@pytest.mark.parametrize(("which", "index"), ALL_REJECTIONS)
def test_each_documented_rejection(vectors, keys, which, index):
    vector = (
        vectors["signed_document"]
        if which == "document"
        else vectors["sealed"][int(which.split("/")[1])]
    )
    rejection = vector["rejections"][index]
    blob = bytearray(bytes.fromhex(vector["envelope"]))
    blob[rejection["offset"]] ^= rejection["xor"]
    expected = getattr(errors, rejection["error"])
    with pytest.raises(expected) as caught:
        if which == "document":
            verify(bytes(blob), vector, keys)
        else:
            open_sealed(bytes(blob), vector, keys)
    assert type(caught.value) is expected, (rejection["field"], caught.value)


# ------------------------------------------------- rules an independent implementation had to guess


def registry_with_sender(keys: dict[str, Any]) -> Registry:
    return registry_of({"sender": keys["sender"]})


def test_kem_id_must_name_the_recipient_keys_algorithm(keys):
    """A well-formed envelope whose KEM id says ML-KEM-768 but whose recipient key id names an
    X25519MLKEM768 key (or the other way round) is WrongRecipient, before any KEM work."""
    sender_name, sender_role, sender_key = keys["sender"]
    identity = Identity(sender_name, sender_role, (OwnedKey(sender_key, 0.0),), OURS)
    for label, other in (("hybrid", "mlkem"), ("mlkem", "hybrid")):
        recipient_key = keys[label][2]
        other_key = keys[other][2]
        # an envelope sealed to `other`, relabelled with `label`'s key id: lengths consistent
        target = TrustedKey(
            "aggregator", "aggregator", "kem", other_key.algorithm, other_key.public_key, 0.0
        )
        blob = bytearray(envelope.seal(b"x", identity, target, "model-update", 1, now=OPEN_AT))
        blob[24:40] = key_id(recipient_key.algorithm, recipient_key.public_key)
        with pytest.raises(errors.WrongRecipient, match="is an"):
            envelope.open(
                bytes(blob),
                keyring_of(recipient_key),
                registry_with_sender(keys),
                freshness=InMemoryFreshness(),
                now=OPEN_AT,
            )


def test_all_zero_x25519_secret_is_refused(keys):
    """A hybrid ciphertext whose ephemeral X25519 key is a low-order point (all-zero shared
    secret) is TamperedEnvelope; sealing to such a recipient key raises ValueError."""
    sender_name, sender_role, sender_key = keys["sender"]
    identity = Identity(sender_name, sender_role, (OwnedKey(sender_key, 0.0),), OURS)
    recipient_key = keys["hybrid"][2]
    target = TrustedKey(
        "aggregator", "aggregator", "kem", X25519_ML_KEM_768, recipient_key.public_key, 0.0
    )
    blob = bytearray(envelope.seal(b"x", identity, target, "model-update", 1, now=OPEN_AT))
    header = envelope.read_header(bytes(blob))
    ephemeral_end = header.header_length + header.kem_length
    blob[ephemeral_end - 32 : ephemeral_end] = bytes(32)  # u = 0: the all-zero secret
    with pytest.raises(errors.TamperedEnvelope, match="does not decrypt"):
        envelope.open(
            bytes(blob),
            keyring_of(recipient_key),
            registry_with_sender(keys),
            freshness=InMemoryFreshness(),
            now=OPEN_AT,
        )
    low_order = TrustedKey(
        "aggregator",
        "aggregator",
        "kem",
        X25519_ML_KEM_768,
        recipient_key.public_key[:1184] + bytes(32),
        0.0,
    )
    with pytest.raises(ValueError):
        envelope.seal(b"x", identity, low_order, "model-update", 1, now=OPEN_AT)


def test_kem_and_aead_ids_go_together_both_ways(vectors, keys):
    """KEM id 0 needs AEAD id 0 and KEM ids 1, 2 need AEAD id 1: every other pair is
    MalformedEnvelope, whatever the rest says."""
    sealed = bytes.fromhex(vectors["sealed"][0]["envelope"])
    document = bytes.fromhex(vectors["signed_document"]["envelope"])
    for blob, kem_id, aead_id in (
        (sealed, 2, 0),
        (sealed, 1, 0),
        (sealed, 0, 1),
        (document, 0, 1),
        (document, 2, 0),
        (sealed, 2, 2),
        (document, 0, 2),
    ):
        changed = bytearray(blob)
        changed[5], changed[6] = kem_id, aead_id
        with pytest.raises(errors.MalformedEnvelope):
            envelope.read_header(bytes(changed))


def test_sealed_body_shorter_than_the_tag_is_malformed(vectors):
    blob = bytearray(bytes.fromhex(vectors["sealed"][1]["envelope"]))
    blob[56:64] = (15).to_bytes(8, "big")
    with pytest.raises(errors.MalformedEnvelope, match="shorter than the AES-GCM tag"):
        envelope.read_header(bytes(blob))


def test_freshness_is_per_sender_name_and_purpose_not_per_key(vectors, keys):
    """After a rotation the new signing key of the same party continues the old sequence:
    the replay state is keyed by the sender's name (and purpose), not its key id."""
    vector = vectors["signed_document"]
    name, role, _old_key = keys["signer"]
    new_key = OURS.signature(ML_DSA_65).keygen(fixed("rotated signer ML-DSA-65 seed", 32))
    registry = registry_of({"old": keys["signer"], "new": (name, role, new_key)})
    seen = InMemoryFreshness()
    envelope.verify_document(
        bytes.fromhex(vector["envelope"]), registry, freshness=seen, now=OPEN_AT, backend=OURS
    )
    rotated = Identity(name, role, (OwnedKey(new_key, 0.0),), OURS)
    same_seq = envelope.sign_document(b"{}", rotated, "config", vector["sequence"], now=OPEN_AT)
    with pytest.raises(errors.Replay):
        envelope.verify_document(same_seq, registry, freshness=seen, now=OPEN_AT, backend=OURS)
    other_purpose = envelope.sign_document(
        b"{}", rotated, "thresholds", vector["sequence"], now=OPEN_AT
    )
    envelope.verify_document(other_purpose, registry, freshness=seen, now=OPEN_AT, backend=OURS)
    assert seen.last_sequence(name, "config") == vector["sequence"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: tests/pqc/test_vectors.py --write   (rewrites docs/envelope-vectors.json)")
    VECTORS.write_text(render(make_vectors()), encoding="utf-8")
    print(f"wrote {VECTORS}")


@pytest.mark.skipif(find_liboqs() is None, reason="no liboqs library (make builds one)")
def test_the_liboqs_backend_opens_and_verifies_every_vector(vectors):
    oqs = get_backend("oqs")
    seeds = {label: bytes.fromhex(party["seed"]) for label, party in vectors["keys"].items()}
    sender = oqs.signature(ML_DSA_65).keygen(seeds["sender"])
    registry = registry_of({"sender": ("retailer-1", "retailer", sender)})
    for vector in vectors["sealed"]:
        key = oqs.kem(vector["kem"]).keygen(seeds[vector["recipient"]])
        keyring = KemKeyring("aggregator", "aggregator", (OwnedKey(key, 0.0),), oqs)
        payload, _meta = envelope.open(
            bytes.fromhex(vector["envelope"]),
            keyring,
            registry,
            freshness=InMemoryFreshness(),
            now=vector["open_at"],
        )
        assert payload == bytes.fromhex(vector["payload"])
    document = vectors["signed_document"]
    signer = oqs.signature(ML_DSA_65).keygen(seeds["signer"])
    payload, _meta = envelope.verify_document(
        bytes.fromhex(document["envelope"]),
        registry_of({"signer": ("admin-1", "admin", signer)}),
        freshness=InMemoryFreshness(),
        now=document["open_at"],
        backend=oqs,
    )
    assert payload == bytes.fromhex(document["payload"])
