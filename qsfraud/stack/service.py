"""A locally run service process: PID file, log file, readiness wait, graceful stop.

Each concrete service (Kafka, MariaDB, the MongoDB wire-protocol server) says how to prepare
its data dir, which command to run and how to tell it is healthy; this base class does the
process bookkeeping, so that ``stack up`` is idempotent and ``stack down`` leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


class StackError(Exception):
    """A set-up problem with a clear, actionable message (never shown as a traceback)."""


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) != 0


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel has just handed out as free (for tests and ephemeral stacks), never
    one this process was given before: the kernel can hand the same port out again once the
    probing socket is closed, and a stack once got one port for Kafka and its controller."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise StackError("no free port found that this process was not given already")


def run_setup_command(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """Run a one-off set-up command; its stdout, or a StackError with the output's tail."""
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise StackError(f"{what} failed (exit {result.returncode}):\n"
                         f"{(result.stdout + result.stderr)[-2000:]}")
    return result.stdout


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Service(ABC):
    """One local server process that qsfraud starts, health-checks and stops."""

    name: str
    start_timeout: float = 60.0

    def __init__(self, root: Path, host: str) -> None:
        self.root = root
        self.host = host
        self.data_dir = root / self.name
        self.pid_file = self.data_dir / f"{self.name}.pid"
        self.log_file = self.data_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # --- what each service says -------------------------------------------------------------
    @abstractmethod
    def ports(self) -> dict[str, int]:
        """The ports this service listens on, by role."""

    @abstractmethod
    def prepare(self) -> None:
        """Install or fetch what is missing and initialise the data dir (idempotent)."""

    @abstractmethod
    def command(self) -> list[str]:
        """The server's command line; it must mention ``self.data_dir`` (that marks it as ours)."""

    @abstractmethod
    def healthy(self) -> bool:
        """True when the service answers its own protocol."""

    @abstractmethod
    def endpoint(self) -> dict[str, Any]:
        """How clients reach it (printed by ``stack up``, saved for other commands)."""

    def after_ready(self) -> None:  # noqa: B027 (optional hook)
        """One-time set-up once the server answers (users, grants); idempotent."""

    # --- process bookkeeping -----------------------------------------------------------------
    def running_pid(self) -> int | None:
        """The PID of our running server, or None (a stale PID file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _alive(pid) and str(self.data_dir) in _cmdline(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self) -> bool:
        """Start unless already running; True when this call started it. Waits until healthy."""
        if self.running_pid() is not None:
            if self.wait_healthy(self.start_timeout):
                return False
            raise StackError(f"{self.name} is running but not answering; see {self.log_file}")
        for role, port in self.ports().items():
            if not port_is_free(self.host, port):
                raise StackError(
                    f"{self.name}: port {port} ({role}) on {self.host} is already in use by "
                    f"another process; choose another with {self.port_env_hint(role)}"
                )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.environment(),
                cwd=self.data_dir,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise StackError(
                    f"{self.name} exited with code {self._proc.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if self.healthy():
                self.after_ready()
                return True
            time.sleep(0.1)
        self.stop()
        raise StackError(f"{self.name} did not become ready in {self.start_timeout:.0f} s; "
                         f"see {self.log_file}:\n{self.log_tail()}")

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.healthy():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def stop(self, grace: float = 20.0) -> bool:
        """Stop our server: SIGTERM, then SIGKILL after ``grace`` s. True when one was running."""
        pid = self.running_pid()
        if pid is None:
            self._reap()
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while _alive(pid):
                self._reap()
                time.sleep(0.05)
        self._reap()
        self.pid_file.unlink(missing_ok=True)
        return True

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def environment(self) -> dict[str, str] | None:
        return None

    def port_env_hint(self, role: str) -> str:
        return f"QSFRAUD_{self.name}_{role}".upper()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
