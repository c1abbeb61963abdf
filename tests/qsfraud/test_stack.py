"""``qsfraud stack``: configuration, idempotent up, clean down, and clear set-up errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qsfraud.stack import Stack, StackConfig, StackError, free_port
from qsfraud.stack import mariadb as mariadb_module


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qsfraud", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def ports_env(root: Path) -> dict[str, str]:
    return {**os.environ, "QSFRAUD_HOME": str(root), "QSFRAUD_KAFKA_PORT": str(free_port()),
            "QSFRAUD_KAFKA_CONTROLLER_PORT": str(free_port()),
            "QSFRAUD_MARIADB_PORT": str(free_port()), "QSFRAUD_MONGO_PORT": str(free_port())}



def test_free_port_never_hands_one_process_the_same_port_twice():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)

def test_config_precedence_env_over_file_over_defaults(tmp_path: Path):
    cfg_file = tmp_path / "qsfraud.toml"
    cfg_file.write_text('[stack]\nkafka_port = 29092\nmongo_port = 27018\n')
    cfg = StackConfig.load(cfg_file, env={"QSFRAUD_MONGO_PORT": "27019"})
    assert (cfg.kafka_port, cfg.mongo_port, cfg.mariadb_port) == (29092, 27019, 13306)


@pytest.mark.parametrize("bad", ["0", "70000", "abc"])
def test_config_rejects_bad_ports(bad: str):
    with pytest.raises(StackError, match="must be a port number"):
        StackConfig.load(Path("/nonexistent"), env={"QSFRAUD_KAFKA_PORT": bad})


def test_config_rejects_unknown_settings(tmp_path: Path):
    cfg_file = tmp_path / "qsfraud.toml"
    cfg_file.write_text('[stack]\nkafak_port = 1\n')
    with pytest.raises(StackError, match="unknown stack settings: kafak_port"):
        StackConfig.load(cfg_file, env={})


def test_up_status_down_leaves_no_process(tmp_path: Path):
    env = ports_env(tmp_path / "stack")
    try:
        check_up_status_down(env, tmp_path)
    finally:
        run_cli("stack", "down", env=env)  # whatever failed above, leave nothing running


def check_up_status_down(env: dict[str, str], tmp_path: Path) -> None:
    up = run_cli("stack", "up", env=env)
    assert up.returncode == 0, up.stderr
    assert "stack ready" in up.stdout
    again = run_cli("stack", "up", env=env)
    assert again.stdout.count("already running") == 3, again.stdout
    status = run_cli("stack", "status", env=env)
    assert status.returncode == 0, status.stdout
    for name in ("kafka", "mariadb", "mongo"):
        assert (tmp_path / "stack" / name / f"{name}.pid").read_text().strip().isdigit()
    down = run_cli("stack", "down", env=env)
    assert down.returncode == 0 and down.stdout.count("stopped") == 3, down.stdout
    assert our_processes(tmp_path) == []
    assert run_cli("stack", "status", env=env).returncode == 1


def test_stale_pid_file_is_cleaned(tmp_path: Path):
    stack = Stack(StackConfig.ephemeral(tmp_path))
    stack.mongo.data_dir.mkdir(parents=True)
    stack.mongo.pid_file.write_text("999999\n")
    assert stack.mongo.running_pid() is None
    assert not stack.mongo.pid_file.exists()


def test_port_taken_is_a_clear_message(tmp_path: Path):
    env = ports_env(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(env["QSFRAUD_MONGO_PORT"])))
        squatter.listen()
        result = run_cli("stack", "up", "mongo", env=env)
    assert result.returncode == 2
    assert "already in use" in result.stderr and "QSFRAUD_MONGO_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_service_failing_stops_the_others_started_beside_it(tmp_path: Path):
    env = ports_env(tmp_path / "stack")
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", int(env["QSFRAUD_MONGO_PORT"])))
            squatter.listen()
            result = run_cli("stack", "up", env=env)  # Kafka and MariaDB start beside it
        assert result.returncode == 2 and "already in use" in result.stderr, result.stderr
        assert our_processes(tmp_path) == []
    finally:
        run_cli("stack", "down", env=env)


def our_processes(tmp_path: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True)
    return [line for line in ps.stdout.splitlines()
            if str(tmp_path) in line and not line.split()[1].startswith("Z")]


def test_java_missing_is_a_clear_message(tmp_path: Path):
    env = ports_env(tmp_path)
    env["PATH"] = str(Path(sys.executable).parent)
    result = run_cli("stack", "up", "kafka", env=env)
    assert result.returncode == 2
    assert "Java 17 or newer is needed" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_service_is_a_clear_message(tmp_path: Path):
    result = run_cli("stack", "status", "postgres", env=ports_env(tmp_path))
    assert result.returncode == 2 and "unknown service 'postgres'" in result.stderr


def test_mariadb_missing_without_apt_is_a_clear_message(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mariadb_module, "SERVER_CANDIDATES", ("no-such-mariadbd",))
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StackError, match="apt-get is not available"):
        mariadb_module.ensure_mariadb_installed()
