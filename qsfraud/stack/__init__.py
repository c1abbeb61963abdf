"""The local stack of real services: Kafka (KRaft), MariaDB (ROW binlog), a MongoDB server.

``qsfraud stack up | down | status`` and the test suite's session fixtures both use
:class:`Stack`: one implementation. Ports come from the environment (``QSFRAUD_KAFKA_PORT``,
``QSFRAUD_KAFKA_CONTROLLER_PORT``, ``QSFRAUD_MARIADB_PORT``, ``QSFRAUD_MONGO_PORT``) or the
``[stack]`` table of ``qsfraud.toml``; data, logs and PID files live under ``.qsfraud/``.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsfraud.stack.kafka import KafkaService
from qsfraud.stack.mariadb import APP_USER, CDC_USER, DATABASE, MariaDBService
from qsfraud.stack.mongo import MongoService
from qsfraud.stack.service import Service, StackError, free_port, port_is_free

__all__ = [
    "APP_USER", "CDC_USER", "DATABASE", "KafkaService", "MariaDBService", "MongoService",
    "Service", "Stack", "StackConfig", "StackError", "ephemeral_kafka", "free_port",
    "port_is_free",
]

DEFAULT_PORTS = {"kafka_port": 19092, "kafka_controller_port": 19093,
                 "mariadb_port": 13306, "mongo_port": 17017}
SERVICE_NAMES = ("kafka", "mariadb", "mongo")


@dataclass
class StackConfig:
    """Where the stack keeps its files and which loopback ports it uses."""

    root: Path = field(default_factory=lambda: Path(".qsfraud").resolve())
    host: str = "127.0.0.1"
    kafka_port: int = DEFAULT_PORTS["kafka_port"]
    kafka_controller_port: int = DEFAULT_PORTS["kafka_controller_port"]
    mariadb_port: int = DEFAULT_PORTS["mariadb_port"]
    mongo_port: int = DEFAULT_PORTS["mongo_port"]
    kafka_full_jit: bool = False
    """The broker's JVM with both JIT compilers (see :class:`KafkaService`): for long runs
    under load, such as benchmarks; the quick (C1-only) JIT suits short-lived stacks."""

    @classmethod
    def load(
        cls, config_file: Path | None = None, env: dict[str, str] | None = None
    ) -> StackConfig:
        """Defaults, overridden by ``qsfraud.toml`` ``[stack]``, overridden by the environment."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        path = config_file or Path(env.get("QSFRAUD_CONFIG", "qsfraud.toml"))
        if path.is_file():
            try:
                values.update(tomllib.loads(path.read_text()).get("stack", {}))
            except tomllib.TOMLDecodeError as exc:
                raise StackError(f"{path}: {exc}") from None
        for key in DEFAULT_PORTS:
            if f"QSFRAUD_{key.upper()}" in env:
                values[key] = env[f"QSFRAUD_{key.upper()}"]
        if "QSFRAUD_HOME" in env:
            values["root"] = env["QSFRAUD_HOME"]
        unknown = set(values) - {*DEFAULT_PORTS, "root", "host"}
        if unknown:
            raise StackError(f"unknown stack settings: {', '.join(sorted(unknown))}")
        cfg = cls()
        for key, value in values.items():
            if key == "root":
                cfg.root = Path(value).resolve()
            elif key == "host":
                cfg.host = str(value)
            else:
                try:
                    port = int(value)
                except (TypeError, ValueError):
                    raise StackError(f"{key} must be a port number, got {value!r}") from None
                if not 0 < port < 65536:
                    raise StackError(f"{key} must be a port number, got {value!r}")
                setattr(cfg, key, port)
        return cfg

    @classmethod
    def ephemeral(cls, root: Path, kafka_full_jit: bool = False) -> StackConfig:
        """Free loopback ports and a private folder: for tests and throw-away stacks."""
        return cls(root=root.resolve(), kafka_port=free_port(), kafka_controller_port=free_port(),
                   mariadb_port=free_port(), mongo_port=free_port(),
                   kafka_full_jit=kafka_full_jit)


class Stack:
    """The three services, started and stopped together or one at a time."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig.load()
        c = self.config
        self.kafka = KafkaService(c.root, c.host, c.kafka_port, c.kafka_controller_port,
                                  full_jit=c.kafka_full_jit)
        self.mariadb = MariaDBService(c.root, c.host, c.mariadb_port)
        self.mongo = MongoService(c.root, c.host, c.mongo_port)
        self.services: dict[str, Service] = {
            "kafka": self.kafka, "mariadb": self.mariadb, "mongo": self.mongo
        }
        self.endpoints_file = c.root / "stack.json"

    def select(self, names: list[str] | None) -> list[Service]:
        names = names or list(SERVICE_NAMES)
        unknown = [n for n in names if n not in self.services]
        if unknown:
            raise StackError(f"unknown service {unknown[0]!r}; known: {', '.join(SERVICE_NAMES)}")
        return [self.services[n] for n in names]

    def up(self, names: list[str] | None = None) -> dict[str, bool]:
        """Start what is not running, side by side (on a fresh machine Kafka's download and
        MariaDB's install overlap); returns {service: started_now}. Writes ``stack.json``.
        When one fails, or on Ctrl-C, every start is let finish and what it started stopped."""
        self.config.root.mkdir(parents=True, exist_ok=True)
        services = self.select(names)
        failure: BaseException | None = None
        with ThreadPoolExecutor(len(services), thread_name_prefix="stack-up") as pool:
            futures = {s.name: pool.submit(s.start) for s in services}
            try:
                wait(futures.values())
            except BaseException as exc:  # Ctrl-C: leaving the pool waits for every start
                failure = exc
        started = {name: f.result() for name, f in futures.items()
                   if not f.cancelled() and f.exception() is None}
        failure = failure or next((f.exception() for f in futures.values()
                                   if not f.cancelled() and f.exception() is not None), None)
        if failure is not None:
            for name, now in started.items():
                if now:
                    self.services[name].stop()
            raise failure
        self.write_endpoints()
        return started

    def down(self, names: list[str] | None = None) -> dict[str, bool]:
        """Stop our services (reverse order); returns {service: was_running}."""
        return {s.name: s.stop() for s in reversed(self.select(names))}

    def status(self, names: list[str] | None = None) -> dict[str, bool]:
        return {s.name: s.running_pid() is not None and s.healthy() for s in self.select(names)}

    def endpoints(self) -> dict[str, dict[str, Any]]:
        return {name: s.endpoint() for name, s in self.services.items()}

    def write_endpoints(self) -> None:
        self.endpoints_file.write_text(json.dumps(self.endpoints(), indent=2) + "\n")


@contextmanager
def ephemeral_kafka(root: Path, *, full_jit: bool = False) -> Iterator[KafkaService]:
    """A Kafka broker of its own under ``root`` (free ports), stopped on exit: what a
    benchmark runs against when it is not given ``--bootstrap``. ``full_jit``: the JVM's
    full JIT, for a broker under minutes of load."""
    stack = Stack(StackConfig.ephemeral(root / "stack", kafka_full_jit=full_jit))
    try:
        stack.up(["kafka"])
        yield stack.kafka
    finally:
        stack.down()
