"""docker-compose.yml cannot run here (no Docker engine): check what it declares instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    return " ".join(command) if isinstance(command, list) else str(command)


def test_kafka_is_3_9_kraft(compose: dict[str, Any]):
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:3.9")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    assert any(p.startswith("9092") for p in kafka["ports"])


def test_mongo_7_single_node_replica_set_with_init(compose: dict[str, Any]):
    services = compose["services"]
    assert services["mongo"]["image"].startswith("mongo:7")
    assert "--replSet" in services["mongo"]["command"]
    init = services["mongo-init"]
    assert "rs.initiate" in command_text(init)
    assert init["depends_on"]["mongo"]["condition"] == "service_healthy"
    assert any(p.startswith("27017") for p in services["mongo"]["ports"])


def test_mysql_8_with_row_binlog(compose: dict[str, Any]):
    mysql = compose["services"]["mysql"]
    assert mysql["image"].startswith("mysql:8")
    flags = set(mysql["command"])
    assert {"--binlog-format=ROW", "--binlog-row-image=FULL",
            "--binlog-row-metadata=FULL"} <= flags
    assert any(f.startswith("--server-id=") for f in flags)
    assert any(p.startswith("3306") for p in mysql["ports"])
    for volume in mysql["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), source


def test_qsfraud_roles_per_retailer(compose: dict[str, Any]):
    services = compose["services"]
    roles = {name: command_text(s) for name, s in services.items() if s.get("build") == "."}
    assert {"worker-acme", "worker-globex", "cdc-acme", "cdc-globex"} <= set(roles)
    assert roles["worker-acme"].startswith("worker --retailer acme")
    for name in ("cdc-acme", "cdc-globex"):
        config = roles[name].split("--config ")[1].split()[0]
        assert (ROOT / config).is_file(), f"{name}: {config} is missing"
    assert (ROOT / "Dockerfile").is_file()


def test_cdc_configs_of_the_compose_roles_are_valid(compose: dict[str, Any]):
    from cdc.config import CdcConfig

    for name in ("cdc-acme", "cdc-globex"):
        path = command_text(compose["services"][name]).split("--config ")[1].split()[0]
        config = CdcConfig.load(ROOT / path)
        assert config.retailer == name.removeprefix("cdc-")
        assert config.kafka["bootstrap_servers"] == "kafka:9092"
