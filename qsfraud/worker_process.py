"""``qsfraud worker`` as a child process: start, wait until it has partitions, read its
metrics, stop (SIGTERM) or kill (SIGKILL). Used by the benchmarks, the tests and the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fraud.topics import RetailerTopics
from qsfraud.stack import free_port

ROOT = Path(__file__).resolve().parents[1]


def worker_metrics(port: int) -> str:
    """The ``/metrics`` page (Prometheus text) of the worker serving it on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def worker_ready(port: int, retailer: str) -> bool:
    """Whether the worker on ``port`` holds partitions of ``retailer``'s transactions (its
    consumer-lag gauge appears then)."""
    try:
        return f'topic="{RetailerTopics(retailer).transactions}"' in worker_metrics(port)
    except OSError:  # not serving yet
        return False


class WorkerProcessError(RuntimeError):
    """The worker exited or did not get ready; the message ends with its log."""


class WorkerProcess:
    """One worker of ``retailer`` with its own log file (one per start) and metrics port.

    ``extra`` are more ``qsfraud worker`` flags. Each :meth:`start` picks a free port for
    the metrics page, which is also how readiness is seen: the consumer-lag gauge of
    ``<retailer>.transactions`` appears once the worker holds partitions.
    """

    def __init__(self, bootstrap: str, retailer: str, workdir: Path, *extra: str) -> None:
        self.bootstrap = bootstrap
        self.retailer = retailer
        self.workdir = workdir
        self.extra = list(extra)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"worker-{self.retailer}-{self.starts}.log"

    def start(self, wait: bool = True) -> WorkerProcess:
        self.starts += 1
        self.port = free_port()
        cmd = [sys.executable, "-m", "qsfraud", "worker", "--retailer", self.retailer,
               "--bootstrap", self.bootstrap, "--web-port", str(self.port),
               "--datadir", str(self.workdir / "data"), *self.extra]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait:
            self.wait_ready()
        return self

    def metrics(self) -> str:
        """The worker's ``/metrics`` page (Prometheus text)."""
        return worker_metrics(self.port)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the worker has its partitions (the lag gauge appears)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None, "start() first"
            if self.proc.poll() is not None:
                raise WorkerProcessError(f"worker exited:\n{self.log_tail()}")
            if worker_ready(self.port, self.retailer):
                return
            time.sleep(0.3)
        raise WorkerProcessError(f"worker not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
