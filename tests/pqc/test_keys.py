"""Key stores: file modes, loading checks, registry trust, rotation with an overlap window."""

from __future__ import annotations

import base64
import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from pqc import envelope
from pqc.backend import find_liboqs, get_backend
from pqc.errors import BackendUnavailable, KeyStoreError, UnknownSender, WrongRecipient
from pqc.freshness import InMemoryFreshness
from pqc.keys import (
    init_keystore,
    load_keystore,
    public_bundle,
    read_bundle,
    rotate_keystore,
    save_store_registry,
    trusted_from_json,
)

NOW = 1_750_000_000.0
DAY = 86_400.0


def test_files_and_directory_are_private(tmp_path):
    path = tmp_path / "keys"
    init_keystore(path, "retailer-1", "retailer")
    assert os.stat(path).st_mode & 0o777 == 0o700
    for name in ("identity.json", "kem.json", "registry.json"):
        assert os.stat(path / name).st_mode & 0o777 == 0o600


def test_private_material_never_shows_in_reprs(tmp_path):
    store = init_keystore(tmp_path / "k", "retailer-1", "retailer")
    for key in (store.identity.current, store.kem.current):
        seed = key.private.seed
        for text in (repr(store), repr(key), repr(key.private), str(store.identity)):
            assert seed.hex() not in text and base64.b64encode(seed).decode() not in text
            assert repr(seed) not in text


def test_keys_cannot_be_pickled(tmp_path):
    import pickle

    store = init_keystore(tmp_path / "k", "retailer-1", "retailer")
    with pytest.raises(TypeError):
        pickle.dumps(store.identity.current.private)


def test_load_round_trip_and_key_ids_are_fingerprints(tmp_path):
    store = init_keystore(tmp_path / "k", "aggregator", "aggregator")
    again = load_keystore(tmp_path / "k")
    assert again.identity.key_id == store.identity.key_id
    assert again.kem.current.private.public_key == store.kem.current.private.public_key
    kinds = sorted(k.kind for k in again.registry.party("aggregator"))
    assert kinds == ["kem", "signature"]


def test_load_with_a_role_refuses_another_roles_store(tmp_path):
    init_keystore(tmp_path / "k", "acme", "retailer")
    assert load_keystore(tmp_path / "k", role="retailer").identity.name == "acme"
    with pytest.raises(KeyStoreError, match="acme is a retailer, not an admin"):
        load_keystore(tmp_path / "k", role="admin")


def test_init_refuses_to_overwrite(tmp_path):
    init_keystore(tmp_path / "k", "retailer-1", "retailer")
    with pytest.raises(KeyStoreError, match="already holds keys"):
        init_keystore(tmp_path / "k", "retailer-1", "retailer")


def test_refuses_readable_private_files(tmp_path):
    init_keystore(tmp_path / "k", "retailer-1", "retailer")
    os.chmod(tmp_path / "k" / "identity.json", 0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        load_keystore(tmp_path / "k")


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["keys"][0].update(public_key=base64.b64encode(b"x" * 1952).decode()),
        lambda d: d["keys"][0].update(key_id="00" * 16),
        lambda d: d["keys"][0].update(seed="***"),
        lambda d: d["keys"][0].update(seed=base64.b64encode(b"short").decode()),
        lambda d: d.update(version=99),
        lambda d: d.update(role="king"),
        lambda d: d.update(keys=[]),
    ],
)
def test_corrupt_key_files_are_refused(tmp_path, edit):
    init_keystore(tmp_path / "k", "retailer-1", "retailer")
    path = tmp_path / "k" / "identity.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(KeyStoreError):
        load_keystore(tmp_path / "k")


def test_bundle_round_trip_and_bad_bundles(tmp_path):
    store = init_keystore(tmp_path / "k", "retailer-1", "retailer")
    keys = read_bundle(json.loads(json.dumps(public_bundle(store))))
    assert {k.key_id for k in keys} == {store.identity.key_id, store.kem.current.key_id}
    bad = public_bundle(store)
    bad["keys"][0]["public_key"] = base64.b64encode(b"y" * 10).decode()
    with pytest.raises(KeyStoreError):
        read_bundle(bad)
    with pytest.raises(KeyStoreError):
        read_bundle({"format": "something-else"})


def _unpadded(entry):
    entry["public_key"] = entry["public_key"].rstrip("=")
    assert len(entry["public_key"]) % 4  # the ML-DSA-65 key (1,952 B) needs padding


def _urlsafe(entry):
    raw = base64.b64decode(entry["public_key"])
    entry["public_key"] = base64.urlsafe_b64encode(raw).decode()
    assert entry["public_key"] != base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda e: e.update(key_id=e["key_id"].upper()), id="upper-case hex key id"),
        pytest.param(_unpadded, id="base64 without padding"),
        pytest.param(_urlsafe, id="url-safe base64"),
        pytest.param(
            lambda e: e.update(public_key=e["public_key"][:64] + "\n" + e["public_key"][64:]),
            id="base64 with a line break",
        ),
        pytest.param(lambda e: e.update(name="retailer 1"), id="name with a space"),
        pytest.param(lambda e: e.update(name="r" * 65), id="name of 65 characters"),
        pytest.param(lambda e: e.update(name="retailer-\u00e9"), id="non-ASCII name"),
        pytest.param(lambda e: e.update(name=""), id="empty name"),
        pytest.param(lambda e: e.update(role="auditor"), id="unknown role"),
        pytest.param(lambda e: e.update(kind="kem"), id="kind does not fit the algorithm"),
        pytest.param(lambda e: e.update(created="2026-01-01"), id="created not a number"),
        pytest.param(lambda e: e.update(created=True), id="created a boolean"),
        pytest.param(lambda e: e.update(expires="never"), id="expires neither null nor number"),
    ],
)
def test_bundle_entry_format_rules(tmp_path, edit):
    """The format rules docs/envelope.md states for key files and bundles."""
    store = init_keystore(tmp_path / "k", "retailer-1", "retailer")
    entry = public_bundle(store)["keys"][0]
    assert entry["kind"] == "signature"
    assert trusted_from_json(dict(entry)).key_id == store.identity.key_id
    edit(entry)
    with pytest.raises(KeyStoreError):
        trusted_from_json(entry)


def test_bundle_entry_name_rules_accept_printable_ascii(tmp_path):
    store = init_keystore(tmp_path / "k", "retailer-1", "retailer")
    entry = public_bundle(store)["keys"][0]
    for name in ("r" * 64, "Shop_7/Paris+EU", "a"):
        assert trusted_from_json({**entry, "name": name}).name == name
    without_expiry = {k: v for k, v in entry.items() if k != "expires"}
    assert trusted_from_json(without_expiry).expires is None  # a missing expires is null


@pytest.mark.parametrize("version", [1.0, True, "1", None])
def test_format_version_is_the_integer_1(tmp_path, version):
    store = init_keystore(tmp_path / "k", "retailer-1", "retailer")
    with pytest.raises(KeyStoreError, match="version"):
        read_bundle({**public_bundle(store), "version": version})
    path = tmp_path / "k" / "identity.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": version}))
    with pytest.raises(KeyStoreError, match="version"):
        load_keystore(tmp_path / "k")


def test_a_bundle_holds_one_party(tmp_path):
    one = public_bundle(init_keystore(tmp_path / "a", "retailer-1", "retailer"))
    two = public_bundle(init_keystore(tmp_path / "b", "retailer-2", "retailer"))
    mixed = {**one, "keys": one["keys"] + two["keys"]}
    store = init_keystore(tmp_path / "c", "aggregator", "aggregator")
    with pytest.raises(KeyStoreError, match="exactly one party"):
        store.registry.trust(read_bundle(mixed))


def test_rotation_overlap(tmp_path):
    retailer = init_keystore(tmp_path / "r", "retailer-1", "retailer", now=NOW)
    agg = init_keystore(tmp_path / "a", "aggregator", "aggregator", now=NOW)
    retailer.registry.trust(agg.public_keys(NOW))
    agg.registry.trust(retailer.public_keys(NOW))
    save_store_registry(agg)

    # envelopes sealed to the old aggregator key and signed with the old retailer key
    old_recipient = retailer.registry.current_kem_key("aggregator", NOW)
    in_flight = envelope.seal(b"old", retailer.identity, old_recipient, "model-update", 1, now=NOW)

    agg2 = rotate_keystore(tmp_path / "a", overlap_s=DAY, now=NOW + 10)
    retailer2 = rotate_keystore(tmp_path / "r", overlap_s=DAY, now=NOW + 10)
    assert agg2.kem.current.key_id != agg.kem.current.key_id
    assert len(agg2.kem.keys) == 2 and agg2.kem.keys[1].expires == NOW + 10 + DAY
    # each side trusts the other's new bundle (old keys carry their expiry)
    retailer2.registry.trust(agg2.public_keys(NOW + 20))
    agg2.registry.trust(retailer2.public_keys(NOW + 20))

    new_recipient = retailer2.registry.current_kem_key("aggregator", NOW + 20)
    assert new_recipient.key_id == agg2.kem.current.key_id  # the new key seals
    fresh = envelope.seal(
        b"new", retailer2.identity, new_recipient, "model-update", 2, now=NOW + 20
    )
    seen = InMemoryFreshness()
    payload, _ = envelope.open(in_flight, agg2.kem, agg2.registry, freshness=seen, now=NOW + 30)
    assert payload == b"old"  # the old key still opens, the old signing key still verifies
    payload, _ = envelope.open(fresh, agg2.kem, agg2.registry, freshness=seen, now=NOW + 30)
    assert payload == b"new"

    # after the overlap the old keys are gone
    late = NOW + 20 + DAY
    with pytest.raises(WrongRecipient):
        envelope.open(in_flight, agg2.kem, agg2.registry, freshness=InMemoryFreshness(), now=late)
    reloaded = load_keystore(tmp_path / "a", now=late)
    assert len(reloaded.kem.keys) == 1
    with pytest.raises(UnknownSender, match="expired"):
        agg2.registry.sender(retailer.identity.key_id, late)


def test_oqs_backend_is_detected_not_imported():
    """Without a liboqs library the oqs backend is unavailable and liboqs-python is never
    imported (it would try to download and build liboqs)."""
    code = (
        "import sys\n"
        "sys.prefix = '/nonexistent'\n"  # as if this environment had no liboqs built into it
        "from pqc.backend import get_backend, find_liboqs\n"
        "from pqc.errors import BackendUnavailable\n"
        "assert find_liboqs() is None\n"
        "try:\n"
        "    get_backend('oqs')\n"
        "except BackendUnavailable as exc:\n"
        "    print(exc)\n"
        "assert 'oqs' not in sys.modules\n"
    )
    if ctypes.util.find_library("oqs") is not None:
        pytest.skip("a liboqs library is installed system-wide here")
    env = {k: v for k, v in os.environ.items() if k != "OQS_INSTALL_PATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "no liboqs shared library" in out.stdout


def test_oqs_backend_round_trip_when_installed(tmp_path):
    if find_liboqs() is None:
        pytest.skip("no liboqs shared library on this machine (OQS_INSTALL_PATH / find_library)")
    backend = get_backend("oqs")
    store = init_keystore(tmp_path / "k", "aggregator", "aggregator", backend=backend)
    recipient = store.registry.current_kem_key("aggregator")
    blob = envelope.seal(b"x", store.identity, recipient, "model-update", 1)
    payload, _ = envelope.open(blob, store.kem, store.registry, freshness=InMemoryFreshness())
    assert payload == b"x"


def test_unknown_backend():
    with pytest.raises(BackendUnavailable):
        get_backend("nope")
