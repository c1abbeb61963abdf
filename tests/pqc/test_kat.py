"""Known-answer tests from cryptography-vectors, through the project's backend interface.

ML-KEM-768 (kat_MLKEM_768.rsp, 1,000 vectors): key generation from the seed d||z gives
``pk``; decapsulating ``ct`` gives ``ss``; decapsulating the invalid ``ct_n`` gives the
implicit-rejection secret ``ss_n``. (Deterministic encapsulation with ``msg`` cannot be
driven: OpenSSL's encapsulate takes no randomness; encapsulation is covered by round trips
and by interop with kyber-py in test_interop.py.)

ML-DSA-65 (kat_MLDSA_65_det_pure.rsp, 100 vectors): key generation from ``xi`` gives ``pk``;
the KAT signature (first 3,309 bytes of ``sm``) verifies over ``msg`` with context ``ctx``
and fails for a changed message or context; a fresh signature by the backend, with the KAT
key, verifies. (Deterministic signing is not exposed by OpenSSL through cryptography, so the
signature bytes themselves cannot be reproduced.)
"""

from __future__ import annotations

import os
from pathlib import Path

import cryptography_vectors
import pytest

from pqc.backend import Backend, find_liboqs, get_backend

VECTORS = Path(os.path.dirname(cryptography_vectors.__file__)) / "asymmetric"


def read_rsp(path: Path) -> list[dict[str, str]]:
    records: list[dict[str, str]] = []
    for line in path.read_text().splitlines():
        if " = " not in line:
            continue
        key, value = line.split(" = ", 1)
        if key == "count":
            records.append({})
        records[-1][key] = value.strip()
    return records


MLKEM = read_rsp(VECTORS / "MLKEM" / "kat_MLKEM_768.rsp")
MLDSA = read_rsp(VECTORS / "MLDSA" / "kat_MLDSA_65_det_pure.rsp")


@pytest.fixture(params=["cryptography", "oqs"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "oqs" and find_liboqs() is None:
        pytest.skip("no liboqs shared library on this machine (OQS_INSTALL_PATH / find_library)")
    return get_backend(request.param)


def test_vector_files_are_complete():
    assert len(MLKEM) == 1000 and len(MLDSA) == 100


def test_mlkem768_known_answers(backend):
    kem = backend.kem("ML-KEM-768")
    for vector in MLKEM:
        seed = bytes.fromhex(vector["d"] + vector["z"])
        key = kem.keygen(seed)
        assert key.public_key == bytes.fromhex(vector["pk"]), vector["count"]
        assert kem.decapsulate(key, bytes.fromhex(vector["ct"])) == bytes.fromhex(vector["ss"])
        rejected = kem.decapsulate(key, bytes.fromhex(vector["ct_n"]))
        assert rejected == bytes.fromhex(vector["ss_n"]), vector["count"]


def test_mldsa65_known_answers(backend):
    scheme = backend.signature("ML-DSA-65")
    for vector in MLDSA:
        key = scheme.keygen(bytes.fromhex(vector["xi"]))
        pk = bytes.fromhex(vector["pk"])
        assert key.public_key == pk, vector["count"]
        message, context = bytes.fromhex(vector["msg"]), bytes.fromhex(vector["ctx"])
        signed = bytes.fromhex(vector["sm"])
        assert len(signed) == scheme.signature_size + len(message)
        signature = signed[: scheme.signature_size]
        assert signed[scheme.signature_size :] == message
        assert scheme.verify(pk, message, signature, context), vector["count"]
        assert not scheme.verify(pk, message + b"\x00", signature, context)
        assert not scheme.verify(pk, message, signature, context + b"\x00")
        ours = scheme.sign(key, message, context)
        assert scheme.verify(pk, message, ours, context)
