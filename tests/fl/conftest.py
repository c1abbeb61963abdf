"""Key stores of an FL federation: an aggregator, three retailers that trust each other, an
admin (trusted, but not a retailer) and an outsider nobody trusts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pqc.keys import KeyStore, TrustedKey, init_keystore, save_store_registry


@dataclass
class Federation:
    aggregator: KeyStore
    retailers: list[KeyStore]
    admin: KeyStore
    outsider: KeyStore

    @property
    def aggregator_kem(self) -> TrustedKey:
        return self.retailers[0].registry.current_kem_key(self.aggregator.identity.name)


def make_federation(root: Path) -> Federation:
    aggregator = init_keystore(root / "agg", "aggregator", "aggregator")
    retailers = [init_keystore(root / f"r{i}", f"retailer-{i}", "retailer") for i in range(3)]
    admin = init_keystore(root / "admin", "admin-1", "admin")
    outsider = init_keystore(root / "outsider", "retailer-x", "retailer")
    members = [aggregator, *retailers, admin]
    for store in members:
        for other in members:
            if other is not store:
                store.registry.trust(other.public_keys())
        save_store_registry(store)
    # the outsider trusts the aggregator (it can seal to it) but nobody trusts the outsider
    outsider.registry.trust(aggregator.public_keys())
    save_store_registry(outsider)
    return Federation(aggregator, retailers, admin, outsider)


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """Shared by the session: tests must use their own freshness stores."""
    return make_federation(tmp_path_factory.mktemp("federation"))
