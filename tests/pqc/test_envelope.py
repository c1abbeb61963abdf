"""Seal/open and sign/verify round trips, and every typed rejection."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqc import envelope
from pqc.errors import (
    KeyStoreError,
    MalformedEnvelope,
    OutsideTimeWindow,
    Replay,
    TamperedEnvelope,
    UnauthorizedSender,
    UnknownSender,
    WrongPurpose,
    WrongRecipient,
)
from pqc.freshness import InMemoryFreshness, TimeWindow
from pqc.keys import Registry

NOW = 1_750_000_000.0


def seal_to_aggregator(parties, payload=b"weights", seq=1, purpose="model-update", now=NOW):
    recipient = parties.retailer.registry.current_kem_key("aggregator")
    return envelope.seal(payload, parties.retailer.identity, recipient, purpose, seq, now=now)


def open_at_aggregator(parties, blob, **kwargs):
    kwargs.setdefault("now", NOW)
    kwargs.setdefault("freshness", parties.freshness)
    agg = parties.aggregator
    return envelope.open(blob, agg.kem, agg.registry, **kwargs)


@pytest.mark.parametrize("size", [0, 1, 1000, 256 * 1024, 256 * 1024 + 1, 3 * 1024 * 1024])
def test_round_trip_both_kems(parties_any_kem, size):
    payload = os.urandom(size)
    blob = seal_to_aggregator(parties_any_kem, payload)
    got, meta = open_at_aggregator(parties_any_kem, blob, purpose="model-update")
    assert got == payload
    assert meta.sender == "retailer-1" and meta.sender_role == "retailer"
    assert meta.sequence == 1 and meta.timestamp == NOW and meta.payload_size == size
    assert meta.kem == parties_any_kem.aggregator.kem.current.private.algorithm
    assert meta.recipient_key_id == parties_any_kem.aggregator.kem.current.key_id.hex()
    assert size < 16 or payload not in blob


def test_default_mode_is_hybrid(parties):
    blob = seal_to_aggregator(parties)
    assert envelope.read_header(blob).kem_id == 2


def test_replay_and_old_sequence_are_rejected(parties):
    blob5 = seal_to_aggregator(parties, seq=5)
    blob3 = seal_to_aggregator(parties, seq=3)
    open_at_aggregator(parties, blob5)
    with pytest.raises(Replay, match="replay"):
        open_at_aggregator(parties, blob5)
    with pytest.raises(Replay):
        open_at_aggregator(parties, blob3)
    open_at_aggregator(parties, seal_to_aggregator(parties, seq=6))


def test_sequences_are_per_sender_and_purpose(parties):
    open_at_aggregator(parties, seal_to_aggregator(parties, seq=7))
    open_at_aggregator(parties, seal_to_aggregator(parties, seq=1, purpose="heartbeat"))
    other = envelope.seal(
        b"x",
        parties.other_retailer.identity,
        parties.other_retailer.registry.current_kem_key("aggregator"),
        "model-update",
        1,
        now=NOW,
    )
    _, meta = open_at_aggregator(parties, other)
    assert meta.sender == "retailer-2"
    assert parties.freshness.last_sequence("retailer-1", "model-update") == 7


@pytest.mark.parametrize("skew", [-901.0, 121.0])
def test_out_of_window_is_rejected(parties, skew):
    blob = seal_to_aggregator(parties, now=NOW + skew)
    with pytest.raises(OutsideTimeWindow):
        open_at_aggregator(parties, blob)
    # a rejected envelope does not consume its sequence number
    open_at_aggregator(parties, seal_to_aggregator(parties, seq=1))


def test_window_is_configurable(parties):
    blob = seal_to_aggregator(parties, now=NOW - 30)
    with pytest.raises(OutsideTimeWindow):
        open_at_aggregator(parties, blob, window=TimeWindow(max_age_s=10, max_future_s=1))


def test_wrong_recipient(parties):
    recipient = parties.retailer.registry.current_kem_key("retailer-2")
    blob = envelope.seal(b"x", parties.retailer.identity, recipient, "model-update", 1, now=NOW)
    with pytest.raises(WrongRecipient, match="aggregator"):
        open_at_aggregator(parties, blob)


def test_unknown_sender(parties):
    blob = seal_to_aggregator(parties)
    agg = parties.aggregator
    with pytest.raises(UnknownSender):
        envelope.open(blob, agg.kem, Registry(), freshness=InMemoryFreshness(), now=NOW)


def test_swapped_sender_id_is_rejected(parties):
    blob = bytearray(seal_to_aggregator(parties))
    blob[8:24] = parties.other_retailer.identity.key_id  # another trusted sender
    with pytest.raises(TamperedEnvelope, match="retailer-2"):
        open_at_aggregator(parties, bytes(blob))


def test_resigned_by_another_sender_keeps_identity_honest(parties):
    """A sender cannot pass its envelope off as another's: the meta names the real signer."""
    blob = envelope.seal(
        b"x",
        parties.other_retailer.identity,
        parties.other_retailer.registry.current_kem_key("aggregator"),
        "model-update",
        1,
        now=NOW,
    )
    _, meta = open_at_aggregator(parties, blob)
    assert meta.sender == "retailer-2"


def test_wrong_purpose_and_role(parties):
    blob = seal_to_aggregator(parties, purpose="global-model")
    with pytest.raises(WrongPurpose):
        open_at_aggregator(parties, blob, purpose="model-update")
    with pytest.raises(UnauthorizedSender, match="retailer-1 is a retailer"):
        open_at_aggregator(parties, blob, roles={"aggregator"})


def test_seal_refuses_a_signing_key_as_recipient(parties):
    signing = [k for k in parties.retailer.registry.party("aggregator") if k.kind == "signature"]
    with pytest.raises(KeyStoreError):
        envelope.seal(b"x", parties.retailer.identity, signing[0], "model-update", 1)


@pytest.mark.parametrize("purpose", ["", "Model", "a b", "x" * 65, "é"])
def test_invalid_purpose_is_refused(parties, purpose):
    with pytest.raises(ValueError):
        seal_to_aggregator(parties, purpose=purpose)


def test_signed_document_round_trip(parties):
    doc = envelope.sign_document(
        b'{"threshold": 0.7}', parties.admin.identity, "config", 3, now=NOW
    )
    assert b'{"threshold": 0.7}' in doc  # readable by everyone, by design
    payload, meta = envelope.verify_document(
        doc, parties.retailer.registry, freshness=InMemoryFreshness(), roles={"admin"}, now=NOW
    )
    assert payload == b'{"threshold": 0.7}'
    assert meta.sender == "admin-1" and meta.recipient_key_id is None and meta.kem is None


def test_signed_document_checks(parties):
    doc = envelope.sign_document(b"cfg", parties.retailer.identity, "config", 1, now=NOW)
    seen = InMemoryFreshness()
    registry = parties.aggregator.registry
    with pytest.raises(UnauthorizedSender):
        envelope.verify_document(doc, registry, freshness=seen, roles={"admin"}, now=NOW)
    envelope.verify_document(doc, registry, freshness=seen, now=NOW)
    with pytest.raises(Replay):
        envelope.verify_document(doc, registry, freshness=seen, now=NOW)
    tampered = doc.replace(b"cfg", b"cfG")
    with pytest.raises(TamperedEnvelope):
        envelope.verify_document(tampered, registry, freshness=InMemoryFreshness(), now=NOW)


def test_document_and_envelope_are_not_interchangeable(parties):
    doc = envelope.sign_document(b"cfg", parties.admin.identity, "config", 1, now=NOW)
    with pytest.raises(MalformedEnvelope, match="signed document"):
        open_at_aggregator(parties, doc)
    blob = seal_to_aggregator(parties)
    with pytest.raises(MalformedEnvelope, match="sealed envelope"):
        envelope.verify_document(
            blob, parties.aggregator.registry, freshness=InMemoryFreshness(), now=NOW
        )


def test_contexts_separate_purposes(parties):
    """A signature made for one purpose does not verify for another (ML-DSA context)."""
    blob = bytearray(seal_to_aggregator(parties, purpose="model-updatf"))
    start = 65
    assert blob[start : start + 12] == b"model-updatf"
    blob[start : start + 12] = b"model-update"
    with pytest.raises(TamperedEnvelope):
        open_at_aggregator(parties, bytes(blob))


@given(
    payload=st.binary(max_size=2048),
    seq=st.integers(0, 2**64 - 1),
    purpose=st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True),
)
@settings(max_examples=40, deadline=None)
def test_round_trip_property(shared_parties, payload, seq, purpose):
    parties = shared_parties
    recipient = parties.retailer.registry.current_kem_key("aggregator")
    blob = envelope.seal(payload, parties.retailer.identity, recipient, purpose, seq, now=NOW)
    agg = parties.aggregator
    got, meta = envelope.open(
        blob, agg.kem, agg.registry, freshness=InMemoryFreshness(), purpose=purpose, now=NOW
    )
    assert (got, meta.sequence, meta.purpose) == (payload, seq, purpose)
    doc = envelope.sign_document(payload, parties.admin.identity, purpose, seq, now=NOW)
    got, meta = envelope.verify_document(
        doc, agg.registry, freshness=InMemoryFreshness(), purpose=purpose, now=NOW
    )
    assert (got, meta.sender) == (payload, "admin-1")


def test_sequence_must_fit_64_bits(parties):
    with pytest.raises(ValueError):
        seal_to_aggregator(parties, seq=2**64)
    with pytest.raises(ValueError):
        seal_to_aggregator(parties, seq=-1)


# ------------------------------- large payloads: hashed on two threads, encrypted while signing


def record_encrypt_threads(monkeypatch) -> list[str]:
    """Names of the threads that ran the AES-GCM part of each seal."""
    names: list[str] = []
    real = envelope._encrypt

    def spy(*args):
        names.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(envelope, "_encrypt", spy)
    return names


@pytest.mark.parametrize("size", [envelope.PARALLEL_MIN - 1, envelope.PARALLEL_MIN, 2 << 20])
def test_large_payloads_are_encrypted_by_a_helper_and_round_trip(parties, monkeypatch, size):
    monkeypatch.setattr(envelope, "_SINGLE_CPU", False)  # as on any machine with 2+ CPUs
    names = record_encrypt_threads(monkeypatch)
    payload = os.urandom(size)
    blob = seal_to_aggregator(parties, payload)
    assert (names[0] != threading.current_thread().name) == (size >= envelope.PARALLEL_MIN)
    assert names[0].startswith("pqc-seal") == (size >= envelope.PARALLEL_MIN)
    assert open_at_aggregator(parties, blob)[0] == payload


def test_one_cpu_seals_in_the_calling_thread(parties, monkeypatch):
    monkeypatch.setattr(envelope, "_SINGLE_CPU", True)
    names = record_encrypt_threads(monkeypatch)
    payload = os.urandom(envelope.PARALLEL_MIN)
    blob = seal_to_aggregator(parties, payload)
    assert names == [threading.current_thread().name]
    assert open_at_aggregator(parties, blob)[0] == payload


def test_inline_and_helper_paths_make_the_same_format(parties, monkeypatch):
    payload = os.urandom(300_000)
    monkeypatch.setattr(envelope, "PARALLEL_MIN", 1 << 40)  # everything in this thread
    inline = seal_to_aggregator(parties, payload, seq=1)
    monkeypatch.setattr(envelope, "PARALLEL_MIN", 0)  # everything through the helper
    monkeypatch.setattr(envelope, "_SINGLE_CPU", False)
    helper = seal_to_aggregator(parties, os.urandom(10), seq=2)
    assert open_at_aggregator(parties, inline)[0] == payload
    assert len(open_at_aggregator(parties, helper)[0]) == 10


@pytest.mark.parametrize("where", ["body start", "body middle", "tag", "signature"])
def test_tampering_with_a_large_envelope_is_caught(parties, where):
    payload = os.urandom(1 << 20)
    blob = bytearray(seal_to_aggregator(parties, payload))
    header = envelope.read_header(bytes(blob))
    body_start = header.header_length + header.kem_length
    body_end = body_start + header.body_length
    position = {
        "body start": body_start,
        "body middle": (body_start + body_end) // 2,
        "tag": body_end - 1,
        "signature": len(blob) - 100,
    }[where]
    blob[position] ^= 0x01
    with pytest.raises(TamperedEnvelope):
        open_at_aggregator(parties, bytes(blob))
    # the rejected envelope consumed nothing: the same sequence number still opens
    assert open_at_aggregator(parties, seal_to_aggregator(parties, payload))[0] == payload


def test_a_kem_error_reaches_the_caller_and_the_next_seal_works(parties):
    good = parties.retailer.registry.current_kem_key("aggregator")
    broken = dataclasses.replace(good, public_key=good.public_key[:-1])
    payload = os.urandom(envelope.PARALLEL_MIN)
    with pytest.raises(ValueError, match="public key"):
        envelope.seal(payload, parties.retailer.identity, broken, "model-update", 1, now=NOW)
    assert open_at_aggregator(parties, seal_to_aggregator(parties, payload))[0] == payload


def test_an_encryption_error_in_the_helper_reaches_the_caller(parties, monkeypatch):
    monkeypatch.setattr(envelope, "_SINGLE_CPU", False)
    real = envelope._encrypt
    threads: list[str] = []

    def failing(*args):
        threads.append(threading.current_thread().name)
        raise MemoryError("no room for the ciphertext")

    monkeypatch.setattr(envelope, "_encrypt", failing)
    payload = os.urandom(3 * envelope.CHUNK_SIZE)
    with pytest.raises(MemoryError, match="ciphertext"):
        seal_to_aggregator(parties, payload)
    assert threads and threads[0].startswith("pqc-seal")
    monkeypatch.setattr(envelope, "_encrypt", real)
    assert open_at_aggregator(parties, seal_to_aggregator(parties, payload))[0] == payload


def test_a_hashing_error_reaches_the_caller(parties, monkeypatch):
    monkeypatch.setattr(envelope, "_SINGLE_CPU", False)
    payload = os.urandom(4 * envelope.CHUNK_SIZE)

    class Broken:  # every full chunk fails, on whichever thread hashes it
        @staticmethod
        def sha256(data=b""):
            if len(data) == envelope.CHUNK_SIZE:
                raise MemoryError("hashing failed")
            return hashlib.sha256(data)

    monkeypatch.setattr(envelope, "hashlib", Broken)
    with pytest.raises(MemoryError, match="hashing failed"):
        seal_to_aggregator(parties, payload)
    monkeypatch.setattr(envelope, "hashlib", hashlib)
    assert open_at_aggregator(parties, seal_to_aggregator(parties, payload))[0] == payload


def test_a_hashing_error_on_the_other_thread_is_raised_by_result(monkeypatch):
    payload = os.urandom(3 * envelope.CHUNK_SIZE)
    caller = threading.current_thread()

    class Broken:  # fails on any thread but the caller's
        @staticmethod
        def sha256(data=b""):
            if threading.current_thread() is not caller:
                raise MemoryError("helper failed")
            return hashlib.sha256(data)

    monkeypatch.setattr(envelope, "hashlib", Broken)
    hasher = envelope._ChunkHasher(payload)
    helper = threading.Thread(target=hasher.work)
    helper.start()
    helper.join()
    with pytest.raises(MemoryError, match="helper failed"):
        hasher.result()


def kem_ciphertext(blob: bytes) -> bytes:
    header = envelope.read_header(blob)
    return blob[header.header_length : header.header_length + header.kem_length]


def test_concurrent_seals_never_share_a_kem_ciphertext(parties, monkeypatch):
    monkeypatch.setattr(envelope, "_SINGLE_CPU", False)
    recipient = parties.retailer.registry.current_kem_key("aggregator")
    payload = os.urandom(envelope.CHUNK_SIZE + 1)
    blobs: list[bytes] = []

    def seal_some(first_seq: int) -> None:
        for seq in range(first_seq, first_seq + 5):
            blobs.append(
                envelope.seal(payload, parties.retailer.identity, recipient, "x", seq, now=NOW)
            )

    threads = [threading.Thread(target=seal_some, args=(10 * n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(blobs) == 20
    assert len({kem_ciphertext(blob) for blob in blobs}) == 20
    for blob in blobs:
        assert open_at_aggregator(parties, blob, freshness=InMemoryFreshness())[0] == payload


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_seal_works_in_a_forked_child(parties, monkeypatch):
    """A child inherits the helper pool but not its threads: it must make its own."""
    monkeypatch.setattr(envelope, "_SINGLE_CPU", False)
    payload = os.urandom(envelope.PARALLEL_MIN)
    seal_to_aggregator(parties, payload)  # the parent's helper pool now exists
    pid = os.fork()
    if pid == 0:  # the child: seal, open, exit at once without running pytest's teardown
        code = 1
        try:
            code = (
                0
                if open_at_aggregator(parties, seal_to_aggregator(parties, payload, seq=2))[0]
                == payload
                else 1
            )
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("seal hung in a forked child")
