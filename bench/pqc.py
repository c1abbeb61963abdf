"""Seal and open times of quantum-safe envelopes next to plain AES-256-GCM (same payloads).

Run with ``qsfraud bench pqc [--kem X25519MLKEM768|ML-KEM-768] [--backend NAME]``. Seal and
AES-256-GCM encryption are timed alternately (as are open and decryption), so both see the
same machine load; figures are medians in milliseconds. The last printed line is a JSON
object with ``seal_1mb_ms``, ``open_1mb_ms``, ``aesgcm_1mb_ms`` (encryption) and
``pq_overhead_ms`` (the larger of seal and open, minus AES-256-GCM, for 1 MiB), plus the
other figures and a breakdown of the 1 MiB overhead. Where the other backend is installed too
(liboqs: ``make`` builds it), its 1 MiB row follows, under keys prefixed with its name
(``oqs_pq_overhead_1mb_ms``). From 64 KiB on (with two or more
CPUs), ``seal`` hashes the payload's 256 KiB chunks on two threads, runs the KEM as the
hashing ends, then signs while a helper thread runs AES-GCM; ``open`` hashes the decrypted
payload on two threads. ``seal_inline_1mb_ms`` is the same seal with everything in one
thread (timed alternately with the normal one), to show what the overlap saves on this
machine at this load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Run as `python bench/pqc.py`, this file's folder comes first on sys.path and this file
# (named like the package it measures) would shadow the `pqc` package.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

from pqc import envelope
from pqc.backend import BACKENDS, ML_DSA_65, X25519_ML_KEM_768, Backend, get_backend
from pqc.errors import BackendUnavailable
from pqc.freshness import InMemoryFreshness
from pqc.keys import init_keystore

SIZES = {"10kb": 10 * 1024, "1mb": 1024 * 1024, "10mb": 10 * 1024 * 1024}
ROUNDS = {"10kb": 300, "1mb": 100, "10mb": 15}


def alternate(
    first: Callable[[int], object], second: Callable[[int], object], rounds: int
) -> tuple[float, float]:
    """Median ms of ``first`` and of ``second``, timed one after the other each round."""
    first(0), second(0)  # warm up
    a, b = [], []
    for i in range(1, rounds + 1):
        start = time.perf_counter_ns()
        first(i)
        middle = time.perf_counter_ns()
        second(i)
        b.append(time.perf_counter_ns() - middle)
        a.append(middle - start)
    return statistics.median(a) / 1e6, statistics.median(b) / 1e6


def median_ms(run: Callable[[], object], rounds: int) -> float:
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        run()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6


class Parties:
    """A sender and a recipient (the aggregator) with keys made by one backend."""

    def __init__(self, backend: Backend, kem: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self.sender = init_keystore(Path(tmp) / "s", "retailer-1", "retailer", backend=backend)
            self.receiver = init_keystore(
                Path(tmp) / "r", "aggregator", "aggregator", kem, backend=backend
            )
        self.sender.registry.trust(self.receiver.public_keys())
        self.receiver.registry.trust(self.sender.public_keys())
        self.recipient = self.sender.registry.current_kem_key("aggregator")


def payload_row(parties: Parties, label: str, prefix: str = "") -> dict[str, float]:
    """Seal/open of one payload size next to AES-256-GCM; prints the table row."""
    aead, nonce, aad = AESGCM(os.urandom(32)), os.urandom(12), os.urandom(80)
    payload, rounds = os.urandom(SIZES[label]), ROUNDS[label]
    sender, receiver = parties.sender, parties.receiver

    def seal(i: int) -> bytes:
        return envelope.seal(payload, sender.identity, parties.recipient, "model-update", i)

    def encrypt(_i: int) -> bytes:
        return aead.encrypt(nonce, payload, aad)

    seal_ms, enc_ms = alternate(seal, encrypt, rounds)
    blobs = [seal(i) for i in range(rounds + 1)]
    sealed = encrypt(0)
    seen = InMemoryFreshness()

    def open_(i: int) -> bytes:
        return envelope.open(blobs[i], receiver.kem, receiver.registry, freshness=seen)[0]

    def decrypt(_i: int) -> bytes:
        return aead.decrypt(nonce, sealed, aad)

    open_ms, dec_ms = alternate(open_, decrypt, rounds)
    overhead = max(seal_ms, open_ms) - enc_ms
    print(
        f"{prefix + label:>8} {seal_ms:8.3f} {open_ms:8.3f} {enc_ms:12.3f} {dec_ms:12.3f}"
        f" {overhead:12.3f} {len(blobs[0]):15,d}"
    )
    return {
        f"seal_{label}_ms": round(seal_ms, 3),
        f"open_{label}_ms": round(open_ms, 3),
        f"aesgcm_{label}_ms": round(enc_ms, 3),
        f"aesgcm_decrypt_{label}_ms": round(dec_ms, 3),
        f"pq_overhead_{label}_ms": round(overhead, 3),
    }


def other_backend(chosen: Backend) -> Backend | None:
    """The first other backend installed here (liboqs is optional), or None."""
    for name in BACKENDS:
        if name == chosen.name:
            continue
        try:
            return get_backend(name)
        except BackendUnavailable:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qsfraud bench pqc", description=__doc__)
    parser.add_argument(
        "--kem", default=X25519_ML_KEM_768, choices=["X25519MLKEM768", "ML-KEM-768"]
    )
    parser.add_argument("--backend", default=None, help="cryptography (default) or oqs")
    args = parser.parse_args(argv)
    backend = get_backend(args.backend)
    parties = Parties(backend, args.kem)
    sender, recipient = parties.sender, parties.recipient

    load = os.getloadavg()[0]
    print(
        f"backend {backend.name}, KEM {args.kem}, signature ML-DSA-65, "
        f"{os.cpu_count()} CPUs, load average {load:.2f}"
    )
    print(
        f"{'payload':>8} {'seal':>8} {'open':>8} {'AES-GCM enc':>12} {'AES-GCM dec':>12}"
        f" {'PQ overhead':>12} {'envelope bytes':>15}   (ms, medians)"
    )
    figures: dict[str, float] = {}
    for label in SIZES:
        figures.update(payload_row(parties, label))
    other = other_backend(backend)
    if other is not None:
        row = payload_row(Parties(other, args.kem), "1mb", prefix=f"{other.name} ")
        figures.update({f"{other.name}_{key}": value for key, value in row.items()})

    payload = os.urandom(SIZES["1mb"])

    def seal_inline(i: int) -> bytes:
        threshold = envelope.PARALLEL_MIN
        envelope.PARALLEL_MIN = 1 << 62  # everything in this thread
        try:
            return envelope.seal(payload, sender.identity, recipient, "model-update", i)
        finally:
            envelope.PARALLEL_MIN = threshold

    def seal_overlapped(i: int) -> bytes:
        return envelope.seal(payload, sender.identity, recipient, "model-update", i)

    inline_ms, overlapped_ms = alternate(seal_inline, seal_overlapped, ROUNDS["1mb"])
    print(
        f"1 MiB seal in one thread {inline_ms:.3f} ms, on two (chunks hashed by both, AES-GCM"
        f" while signing) {overlapped_ms:.3f} ms ({envelope.usable_cpus()} CPUs usable)"
    )
    figures["seal_inline_1mb_ms"] = round(inline_ms, 3)
    figures["seal_overlapped_1mb_ms"] = round(overlapped_ms, 3)

    scheme, kem = backend.signature(ML_DSA_65), backend.kem(args.kem)
    message = os.urandom(1300)
    breakdown = {
        "mldsa65_sign_ms": median_ms(
            lambda: scheme.sign(sender.identity.current.private, message, b"qsfraud/v1/x"), 200
        ),
        "mldsa65_verify_ms": median_ms(
            lambda: scheme.verify(
                sender.identity.current.private.public_key,
                message,
                bytes(scheme.signature_size),
                b"qsfraud/v1/x",
            ),
            200,
        ),
        "sha256_1mb_ms": median_ms(lambda: hashlib.sha256(payload).digest(), 100),
        "chunked_sha256_1mb_ms": median_ms(lambda: envelope._digest(payload), 100),
        "kem_encapsulate_ms": median_ms(lambda: kem.encapsulate(recipient.public_key), 200),
    }
    print(
        "1 MiB seal, by part: "
        + ", ".join(f"{name.removesuffix('_ms')} {ms:.3f}" for name, ms in breakdown.items())
        + "; chunked_sha256 (sha256 on two threads), then kem_encapsulate, then the signature"
        " while a helper runs AES-GCM"
    )
    figures.update({k: round(v, 3) for k, v in breakdown.items()})
    figures["pq_overhead_ms"] = figures["pq_overhead_1mb_ms"]
    overheads = [f"{figures['pq_overhead_ms']:.3f} ms with {backend.name}"]
    if other is not None:
        overheads.append(f"{figures[f'{other.name}_pq_overhead_1mb_ms']:.3f} ms with {other.name}")
    print(f"post-quantum overhead per 1 MiB envelope: {', '.join(overheads)} (target < 2 ms)")
    result = {
        "seal_1mb_ms": figures["seal_1mb_ms"],
        "open_1mb_ms": figures["open_1mb_ms"],
        "aesgcm_1mb_ms": figures["aesgcm_1mb_ms"],
        "pq_overhead_ms": figures["pq_overhead_ms"],
        "backend": backend.name,
        "kem": args.kem,
        "load_average": round(load, 2),
        **figures,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
