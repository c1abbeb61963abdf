"""docker-compose.yml cannot run here (no Docker engine): check what it declares instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


RETAILERS = ("acme", "globex", "initech")


def flags(args: list[str]) -> set[str]:
    """The option names in a command line (``--metrics=HOST:PORT`` counts as ``--metrics``)."""
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from qsfraud.demo import Demo, DemoSettings, worker_fl_flags

    demo = Demo(DemoSettings(root=tmp_path_factory.mktemp("demo")))
    demo.metrics_ports = {r: 6066 for r in demo.retailers}
    demo.fl_enabled = worker_fl_flags()
    return demo


def test_qsfraud_roles_per_retailer(compose: dict[str, Any]):
    services = compose["services"]
    roles = {name: command_text(s) for name, s in services.items() if s.get("build") == "."}
    assert {"aggregator", "ui", "keys-init"} | {f"{role}-{r}" for r in RETAILERS
                                               for role in ("worker", "cdc")} <= set(roles)
    for r in RETAILERS:
        assert roles[f"worker-{r}"].startswith(f"worker --retailer {r}")
        config = roles[f"cdc-{r}"].split("--config ")[1].split()[0]
        assert (ROOT / config).is_file(), f"cdc-{r}: {config} is missing"
    assert (ROOT / "Dockerfile").is_file()


def test_the_retailers_are_the_demos(demo: Any):
    assert tuple(demo.retailers) == RETAILERS


def test_every_flag_the_demo_gives_a_role_is_in_the_compose_file(compose: dict[str, Any],
                                                                 demo: Any):
    services = compose["services"]
    expected = {"aggregator": demo.aggregator_args("kafka:9092"),
                "ui": demo.ui_args("kafka:9092", 8501),
                **{f"cdc-{r}": demo.cdc_args(Path("x.toml")) for r in RETAILERS},
                **{f"worker-{r}": demo.worker_args(r, "kafka:9092") for r in RETAILERS}}
    for name, args in expected.items():
        command = services[name]["command"]
        assert command[0] == args[0], name
        missing = flags(args) - flags(command)
        # FL flags are given only when the worker has them: then compose must have them too
        assert not missing, f"{name} lacks {sorted(missing)} that the local demo passes"


def test_ports_the_local_stack_serves_are_published_or_reachable(compose: dict[str, Any]):
    services = compose["services"]
    assert any(p.startswith("8501:") for p in services["ui"]["ports"])
    ui = services["ui"]["command"]
    for r in RETAILERS:
        worker = services[f"worker-{r}"]["command"]
        port = worker[worker.index("--web-port") + 1]
        assert worker[worker.index("--web-host") + 1] == "0.0.0.0", r
        assert f"--metrics=worker-{r}:{port}" in ui, r


def test_key_stores_are_made_before_the_roles_start(compose: dict[str, Any]):
    services = compose["services"]
    init = services["keys-init"]
    script = init["entrypoint"][-1]
    assert (ROOT / script).is_file()
    text = (ROOT / script).read_text()
    for party, role in [*((r, "retailer") for r in RETAILERS), ("aggregator", "aggregator"),
                        ("admin", "admin")]:
        assert party in text and role in text
    keys_mount = "./.qsfraud/keys:/app/.qsfraud/keys"
    for name in ("aggregator", "ui", *(f"worker-{r}" for r in RETAILERS)):
        assert services[name]["depends_on"]["keys-init"]["condition"] == \
            "service_completed_successfully", name
        # the paths the roles use are in the mounted key folder
        assert keys_mount in services[name]["volumes"], name
        assert ".qsfraud/keys/" in command_text(services[name]), name


@pytest.mark.integration
def test_key_setup_script_makes_working_stores(tmp_path: Path):
    from fl.watchlist import open_watch_key
    from pqc.freshness import InMemoryFreshness
    from pqc.keys import load_keystore

    bin_dir = Path(sys.executable).parent
    if shutil.which("qsfraud", path=str(bin_dir)) is None:
        pytest.skip("no qsfraud entry point beside this Python")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "QSFRAUD_KEYS_ROOT": str(tmp_path), "QSFRAUD_RETAILERS": "acme"}
    subprocess.run(["sh", str(ROOT / "examples/docker/keys-init.sh")], env=env, check=True,
                   capture_output=True, timeout=300)
    aggregator = load_keystore(tmp_path / "aggregator")
    assert {k.name for k in aggregator.registry} >= {"acme", "aggregator"}
    acme = load_keystore(tmp_path / "acme")
    assert {k.name for k in acme.registry} >= {"acme", "aggregator", "admin"}
    # the watchlist's consortium key, sealed by the admin to the retailer alone
    assert open_watch_key((tmp_path / "acme" / "watch-key.sealed").read_bytes(),
                          acme.kem, acme.registry, InMemoryFreshness())


def test_cdc_configs_of_the_compose_roles_are_valid(compose: dict[str, Any]):
    from cdc.config import CdcConfig

    for name in (f"cdc-{r}" for r in RETAILERS):
        path = command_text(compose["services"][name]).split("--config ")[1].split()[0]
        config = CdcConfig.load(ROOT / path)
        assert config.retailer == name.removeprefix("cdc-")
        assert config.kafka["bootstrap_servers"] == "kafka:9092"


def test_mysql_init_creates_every_mysql_retailers_database(compose: dict[str, Any]):
    from cdc.config import CdcConfig

    init = (ROOT / "examples/docker/mysql-init.sql").read_text()
    for r in RETAILERS:
        path = command_text(compose["services"][f"cdc-{r}"]).split("--config ")[1].split()[0]
        config = CdcConfig.load(ROOT / path)
        if config.source.get("kind") == "mysql":
            db, table = config.source["database"], config.source["table"]
            assert f"{db}.{table}" in init, r
