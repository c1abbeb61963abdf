"""Fixtures for the pqc tests: key stores of a retailer, the aggregator and an admin that
trust each other, as after `qsfraud keys init` and `qsfraud keys trust`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pqc.freshness import InMemoryFreshness
from pqc.keys import KeyStore, init_keystore, save_store_registry


@dataclass
class Parties:
    retailer: KeyStore
    other_retailer: KeyStore
    aggregator: KeyStore
    admin: KeyStore
    freshness: InMemoryFreshness

    def all(self) -> list[KeyStore]:
        return [self.retailer, self.other_retailer, self.aggregator, self.admin]


def make_parties(root: Path, kem_algorithm: str = "X25519MLKEM768") -> Parties:
    stores = [
        init_keystore(root / "r1", "retailer-1", "retailer", kem_algorithm),
        init_keystore(root / "r2", "retailer-2", "retailer", kem_algorithm),
        init_keystore(root / "agg", "aggregator", "aggregator", kem_algorithm),
        init_keystore(root / "admin", "admin-1", "admin", kem_algorithm),
    ]
    for store in stores:
        for other in stores:
            if other is not store:
                store.registry.trust(other.public_keys())
        save_store_registry(store)
    return Parties(*stores, freshness=InMemoryFreshness())


@pytest.fixture
def parties(tmp_path: Path) -> Parties:
    return make_parties(tmp_path)


@pytest.fixture(params=["X25519MLKEM768", "ML-KEM-768"])
def parties_any_kem(request: pytest.FixtureRequest, tmp_path: Path) -> Parties:
    return make_parties(tmp_path, request.param)


@pytest.fixture(scope="session")
def shared_parties(tmp_path_factory: pytest.TempPathFactory) -> Parties:
    """Parties shared by a whole session: only for tests that never change their state."""
    return make_parties(tmp_path_factory.mktemp("shared-parties"))
