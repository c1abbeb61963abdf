"""Session fixtures: the real services, started once per test session on free loopback ports.

They use :class:`qsfraud.stack.Stack`, the same code as ``qsfraud stack up``; each service
starts on first use and is stopped when the session ends, whatever happened.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from qsfraud.stack import KafkaService, MariaDBService, MongoService, Stack, StackConfig


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An ephemeral stack (nothing started yet); stops whatever was started at session end."""
    s = Stack(StackConfig.ephemeral(tmp_path_factory.mktemp("stack")))
    try:
        yield s
    finally:
        s.down()


def _start(stack: Stack, name: str) -> None:
    stack.up([name])


@pytest.fixture(scope="session")
def kafka(stack: Stack) -> KafkaService:
    _start(stack, "kafka")
    return stack.kafka


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka: KafkaService) -> str:
    return kafka.bootstrap


@pytest.fixture(scope="session")
def mariadb(stack: Stack) -> MariaDBService:
    _start(stack, "mariadb")
    return stack.mariadb


@pytest.fixture(scope="session")
def mongo(stack: Stack) -> MongoService:
    _start(stack, "mongo")
    return stack.mongo


@pytest.fixture(scope="session")
def mongo_uri(mongo: MongoService) -> str:
    return mongo.uri


@pytest.fixture(scope="session")
def real_mongod_uri() -> str:
    """A real mongod replica set, for behaviour only mongod has; skip unless MONGO_URI is set."""
    uri = os.environ.get("MONGO_URI")
    if not uri:
        pytest.skip("needs a real mongod replica set: set MONGO_URI to run")
    return uri


_UNIQUE_NAMES = itertools.count()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A topic/table/collection name unique to this test."""
    base = "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    # a counter, not id(request): an object's id is reused once it is freed, and two
    # parametrized cases share the truncated base (they then read each other's topics)
    return f"t_{base}_{os.getpid()}_{next(_UNIQUE_NAMES)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    services = {"kafka", "kafka_bootstrap", "mariadb", "mongo", "mongo_uri", "stack"}
    for item in items:
        if services & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
