"""Signed config verification and application without Kafka."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fraud.schema import SchemaError
from pqc import TimeWindow, sign_document
from pqc.keys import KeyStore, init_keystore
from streams.config_stream import PURPOSE, ConfigApplier, ConfigDocument, sign_config


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyStore]:
    root = tmp_path_factory.mktemp("keys")
    admin = init_keystore(root / "admin", "admin-1", "admin")
    retailer = init_keystore(root / "retailer", "retailer-1", "retailer")
    admin.registry.trust(retailer.public_keys())  # trusted, but not an admin
    return {"admin": admin, "retailer": retailer,
            "stranger": init_keystore(root / "stranger", "admin-x", "admin")}


def doc(version: int, scope: str = "*", **changes: object) -> ConfigDocument:
    return ConfigDocument.default().updated(
        {"thresholds.verify": 0.3, **changes}, version=version, scope=scope, issued_at=1.0)


def test_a_signed_config_is_applied_atomically(stores: dict[str, KeyStore]):
    applied: list[ConfigDocument] = []
    applier = ConfigApplier("acme", stores["admin"].registry, on_apply=applied.append)
    outcome = applier.offer(sign_config(doc(1), stores["admin"].identity), b"*")
    assert outcome.status == "applied" and outcome.signer == "admin-1"
    assert applier.current.version == 1 and applier.current.issued_by == "admin-1"
    assert applied == [applier.current]
    assert applier.current.policy.version == 1  # decisions carry the document's version


@pytest.mark.parametrize("make, reason", [
    (lambda s: json.dumps(doc(2).to_dict()).encode(), "unsigned"),
    (lambda s: sign_config(doc(2), s["stranger"].identity), "untrusted"),
    (lambda s: sign_config(doc(2), s["retailer"].identity), "unauthorized"),
    (lambda s: sign_document(json.dumps(doc(2).to_dict()).encode(), s["admin"].identity,
                             "model-update", seq=2), "wrong-purpose"),
    (lambda s: sign_document(b'{"v": 1, "kind": "qsfraud-config", "version": 2, "policy": '
                             b'{"thresholds": {"verify": 7}}}', s["admin"].identity, PURPOSE,
                             seq=2), "invalid"),
    (lambda s: sign_document(json.dumps(doc(2).to_dict()).encode(), s["admin"].identity,
                             PURPOSE, seq=3), "invalid"),
    (lambda s: sign_config(doc(1), s["admin"].identity), "stale"),
    (lambda s: sign_config(doc(2), s["admin"].identity, now=1.0), "stale"),
    (lambda s: sign_config(doc(2), s["admin"].identity)[:-10], "malformed"),
    (lambda s: None, "empty"),
])
def test_bad_configs_are_rejected_and_the_previous_one_stays(
    stores: dict[str, KeyStore], make, reason: str
):
    applier = ConfigApplier("acme", stores["admin"].registry,
                            window=TimeWindow(max_age_s=3600.0, max_future_s=60.0))
    assert applier.offer(sign_config(doc(1), stores["admin"].identity), b"*").status == "applied"
    outcome = applier.offer(make(stores), b"*")
    assert (outcome.status, outcome.reason) == ("rejected", reason), outcome.error
    assert applier.current.version == 1 and applier.rejected == 1


def test_a_tampered_signature_is_rejected(stores: dict[str, KeyStore]):
    applier = ConfigApplier("acme", stores["admin"].registry)
    blob = bytearray(sign_config(doc(1), stores["admin"].identity))
    blob[-50] ^= 0x01
    assert applier.offer(bytes(blob), b"*").reason == "bad-signature"
    assert applier.current.version == 0


def test_scopes_other_retailers_and_key_mismatch(stores: dict[str, KeyStore]):
    admin = stores["admin"].identity
    applier = ConfigApplier("acme", stores["admin"].registry)
    assert applier.offer(sign_config(doc(1, "other"), admin), b"other").status == "ignored"
    assert applier.offer(sign_config(doc(2, "acme"), admin), b"acme").status == "applied"
    assert applier.offer(sign_config(doc(3, "acme"), admin), b"*").reason == "invalid"
    assert applier.offer(sign_config(doc(4), admin), b"*").status == "applied"


def test_no_trusted_keys_means_every_config_is_rejected(stores: dict[str, KeyStore]):
    applier = ConfigApplier("acme", None)
    assert applier.offer(sign_config(doc(1), stores["admin"].identity), b"*").reason == \
        "untrusted"


def test_document_round_trip_and_validation():
    d = doc(5, "acme", **{"fl.sync_interval_s": 30, "model.l2": 0.01,
                          "block.devices": ["d-bad"]})
    assert ConfigDocument.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    assert d.policy.model.l2 == 0.01 and d.fl_sync_interval_s == 30.0
    for bad in ({"fl.sync_interval_s": 0}, {"thresholds.nope": 1}, {"nothing": 1},
                {"rules": [{"name": "x"}]}):
        with pytest.raises(SchemaError):
            ConfigDocument.default().updated(bad, version=2)
    with pytest.raises(SchemaError):
        ConfigDocument.from_dict({**d.to_dict(), "extra": 1})
    with pytest.raises(SchemaError):
        ConfigDocument.from_dict(replace(d, version=0).to_dict())


def test_config_documents_are_signed_over_canonical_json(stores: dict[str, KeyStore],
                                                          tmp_path: Path):
    blob = sign_config(doc(1), stores["admin"].identity)
    assert blob.startswith(b"QSFE") and b'"kind":"qsfraud-config"' in blob
