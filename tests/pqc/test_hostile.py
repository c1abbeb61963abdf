"""Hostile input: every single-byte flip, every truncation, appended bytes, random garbage.

Each is rejected with the typed error its position calls for, never another exception and
never a payload.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqc import envelope
from pqc.errors import (
    EnvelopeError,
    MalformedEnvelope,
    TamperedEnvelope,
    UnknownSender,
    WrongRecipient,
)
from pqc.freshness import InMemoryFreshness

NOW = 1_750_000_000.0
PURPOSE = "model-update"


@pytest.fixture(scope="module")
def small(shared_parties):
    parties = shared_parties
    recipient = parties.retailer.registry.current_kem_key("aggregator")
    blob = envelope.seal(b"tiny update", parties.retailer.identity, recipient, PURPOSE, 9, now=NOW)
    return parties, blob


def try_open(parties, blob):
    agg = parties.aggregator
    return envelope.open(blob, agg.kem, agg.registry, freshness=InMemoryFreshness(), now=NOW)


def expected_errors(position: int, header: envelope.Header) -> tuple[type[EnvelopeError], ...]:
    """Which error a changed byte at ``position`` must raise (see docs/envelope.md)."""
    if position < 8 or 56 <= position < 65:  # magic, version, ids, body length, purpose length
        return (MalformedEnvelope,)
    if position < 24:
        return (UnknownSender,)
    if position < 40:
        return (WrongRecipient,)
    if position < 56:  # sequence, timestamp
        return (TamperedEnvelope,)
    if position < header.header_length:  # purpose: invalid characters, or another purpose
        return (MalformedEnvelope, TamperedEnvelope)
    return (TamperedEnvelope,)  # KEM ciphertext, body, signature


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_single_byte_flip_is_rejected(small, mask):
    parties, blob = small
    header = envelope.read_header(blob)
    try_open(parties, blob)  # the untouched envelope opens
    for position in range(len(blob)):
        changed = bytearray(blob)
        changed[position] ^= mask
        with pytest.raises(expected_errors(position, header)):
            try_open(parties, bytes(changed))


def test_every_truncation_is_malformed(small):
    parties, blob = small
    for length in range(len(blob)):
        with pytest.raises(MalformedEnvelope):
            try_open(parties, blob[:length])


@given(extra=st.binary(min_size=1, max_size=64))
@settings(max_examples=50, deadline=None)
def test_appended_bytes_are_malformed(small, extra):
    parties, blob = small
    with pytest.raises(MalformedEnvelope, match="trailing"):
        try_open(parties, blob + extra)


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_random_mutations_never_crash(small, data):
    parties, blob = small
    changed = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(changed) - 1))
        changed[position] = data.draw(st.integers(0, 255))
    if bytes(changed) == blob:
        return
    with pytest.raises(EnvelopeError):
        try_open(parties, bytes(changed))


@given(garbage=st.binary(max_size=6000))
@settings(max_examples=200, deadline=None)
def test_random_bytes_never_crash(small, garbage):
    parties, _ = small
    with pytest.raises(EnvelopeError):
        try_open(parties, garbage)


@given(tail=st.binary(max_size=200))
@settings(max_examples=100, deadline=None)
def test_valid_looking_prefix_with_garbage_never_crashes(small, tail):
    parties, blob = small
    with pytest.raises(EnvelopeError):
        try_open(parties, blob[:65] + tail)


def test_every_byte_flip_of_a_signed_document(parties):
    doc = envelope.sign_document(b"cfg", parties.admin.identity, "config", 1, now=NOW)
    header = envelope.read_header(doc)
    for position in range(len(doc)):
        changed = bytearray(doc)
        changed[position] ^= 0x01
        allowed = expected_errors(position, header)
        if 24 <= position < 40:  # a document names no recipient: any change is malformed
            allowed = (MalformedEnvelope,)
        with pytest.raises(allowed):
            envelope.verify_document(
                bytes(changed), parties.retailer.registry, freshness=InMemoryFreshness(), now=NOW
            )


def test_byte_flips_in_a_large_envelope(shared_parties, monkeypatch):
    """The same rules for an envelope sealed on the helper-thread path: every byte of the
    header and KEM ciphertext, the ends of the body (tag included), a sample of the rest."""
    monkeypatch.setattr(envelope, "_SINGLE_CPU", False)
    parties = shared_parties
    recipient = parties.retailer.registry.current_kem_key("aggregator")
    payload = random.Random(5).randbytes(envelope.PARALLEL_MIN + 100)
    blob = envelope.seal(payload, parties.retailer.identity, recipient, PURPOSE, 9, now=NOW)
    header = envelope.read_header(blob)
    assert try_open(parties, blob)[0] == payload
    body_start = header.header_length + header.kem_length
    body_end = body_start + header.body_length
    positions = {*range(body_start + 64), *range(body_end - 64, len(blob), 7)}
    positions |= set(random.Random(6).sample(range(body_start, body_end), 200))
    for position in sorted(positions):
        changed = bytearray(blob)
        changed[position] ^= 0x01
        with pytest.raises(expected_errors(position, header)):
            try_open(parties, bytes(changed))
