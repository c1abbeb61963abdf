"""Helpers for the CDC tests: run ``qsfraud cdc run`` as a process, read its topic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parents[2]


def create_topics(bootstrap: str, *topics: tuple[str, int]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, p, 1) for n, p in topics]).values():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    return json.dumps(value)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """A TOML file from nested dicts (tables of tables are written as [a.b])."""
    lines: list[str] = []

    def table(prefix: str, data: dict[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict) or k == "producer"
                   or (prefix.endswith("fields"))}
        nested = {k: v for k, v in data.items() if k not in scalars}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in scalars.items())
        for k, v in nested.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", config)
    path.write_text("\n".join(lines) + "\n")
    return path


class CdcProcess:
    """``python -m qsfraud cdc run --config FILE`` that tests kill and restart."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qsfraud", "cdc", "run", "--config", str(self.config),
                 "--metrics-interval", "2"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class TopicReader:
    """A read_committed consumer in a thread, collecting (key, envelope) of a topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.records: list[tuple[str | None, dict[str, Any] | None, int]] = []
        self._stop = threading.Event()
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"test-{topic}-{time.time()}",
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
            "isolation.level": "read_committed",
        })
        self._consumer.subscribe([topic])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(1000, 0.2):
                if msg.error() is None:
                    key = msg.key().decode() if msg.key() is not None else None
                    value = json.loads(msg.value()) if msg.value() is not None else None
                    self.records.append((key, value, msg.partition()))
        self._consumer.close()

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        return len(self.records) >= n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def cdc_process(tmp_path: Path) -> Iterator[Any]:
    """A factory of CdcProcess objects; all are stopped at teardown."""
    procs: list[CdcProcess] = []

    def make(config: Path) -> CdcProcess:
        p = CdcProcess(config, tmp_path / f"cdc-{len(procs)}.log")
        procs.append(p)
        return p

    yield make
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.terminate(10)


@pytest.fixture
def topic_reader() -> Iterator[Any]:
    readers: list[TopicReader] = []

    def make(bootstrap: str, topic: str) -> TopicReader:
        r = TopicReader(bootstrap, topic)
        readers.append(r)
        return r

    yield make
    for r in readers:
        r.close()


@pytest.fixture
def harness() -> SimpleNamespace:
    """Plain helpers (test modules cannot import each other under importlib mode)."""
    return SimpleNamespace(create_topics=create_topics, write_config=write_config)
