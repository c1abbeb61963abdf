"""What one UI process shares across its sessions: settings, the store, the Kafka reader, the
metrics poller and the verdict publisher (built once per settings by ``st.cache_resource``).

Settings come from the environment, which ``qsfraud ui`` fills from its options:
``QSFRAUD_BOOTSTRAP`` (else ``.qsfraud/stack.json``), ``QSFRAUD_UI_RETAILERS`` (comma list;
empty: every retailer found), ``QSFRAUD_WORKER_METRICS`` (comma list of ``/metrics`` URLs or
``host:port``), ``QSFRAUD_ADMIN_KEYS`` (an admin key store: only then can this process change
config) and ``QSFRAUD_CONFIG_TRUST`` (the registry config records are verified with).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from ui.kafka_reader import KafkaReader, ReaderSettings, VerdictPublisher
from ui.store import Store
from ui.worker_metrics import MetricsPoller


@dataclass(frozen=True)
class UiSettings:
    bootstrap: str | None
    retailers: tuple[str, ...] = ()
    metrics_urls: tuple[str, ...] = ()
    admin_keys: str | None = None
    trust: str | None = None
    tail: int = 2_000
    refresh_s: float = 1.0
    bootstrap_error: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> UiSettings:
        from qsfraud.cli import CommandError
        from qsfraud.commands.worker import default_bootstrap
        from streams.settings import DEFAULT_TRUST_REGISTRY

        e = dict(os.environ if env is None else env)

        def listed(name: str) -> tuple[str, ...]:
            return tuple(x.strip() for x in e.get(name, "").split(",") if x.strip())

        try:
            bootstrap: str | None = default_bootstrap(e.get("QSFRAUD_BOOTSTRAP") or None)
            error = ""
        except CommandError as exc:
            bootstrap, error = None, str(exc)
        urls = tuple(u if "://" in u else f"http://{u}/metrics"
                     for u in listed("QSFRAUD_WORKER_METRICS"))
        return cls(
            bootstrap=bootstrap,
            retailers=listed("QSFRAUD_UI_RETAILERS"),
            metrics_urls=urls,
            admin_keys=e.get("QSFRAUD_ADMIN_KEYS") or None,
            trust=e.get("QSFRAUD_CONFIG_TRUST") or str(DEFAULT_TRUST_REGISTRY),
            tail=int(e.get("QSFRAUD_UI_TAIL", "2000")),
            bootstrap_error=error,
        )


class Runtime:
    """The process-wide parts; ``stop`` ends its threads."""

    def __init__(self, settings: UiSettings) -> None:
        self.settings = settings
        self.store = Store()
        self.reader: KafkaReader | None = None
        self.publisher: VerdictPublisher | None = None
        if settings.bootstrap:
            self.reader = KafkaReader(
                ReaderSettings(settings.bootstrap, settings.retailers, settings.tail),
                self.store).start()
            self.publisher = VerdictPublisher(settings.bootstrap, self.store)
        self.metrics = MetricsPoller(settings.metrics_urls).start()
        self.publish_lock = threading.Lock()
        """Serialises config publishing in this process (one next version at a time)."""

    def stop(self) -> None:
        if self.reader is not None:
            self.reader.stop()
        self.metrics.stop()


_RUNNING: list[Runtime] = []


def _release(runtime: Any) -> None:
    runtime.stop()


@st.cache_resource(show_spinner=False, on_release=_release)
def _runtime(key: str, _settings: UiSettings) -> Runtime:
    runtime = Runtime(_settings)
    _RUNNING.append(runtime)
    return runtime


def current() -> Runtime:
    """The runtime of this process for the settings in the environment."""
    settings = UiSettings.from_env()
    return _runtime(repr(settings), settings)


def stop_all() -> None:
    """Stop every runtime this process started (tests; the app runs until the process ends)."""
    _runtime.clear()
    while _RUNNING:
        _RUNNING.pop().stop()


def admin_store(settings: UiSettings) -> tuple[Any | None, str]:
    """(the admin key store, "") when this process may change config, else (None, why not)."""
    from pqc import PqcError
    from pqc.keys import load_keystore

    if not settings.admin_keys:
        return None, ("this is an analyst session: the UI was started without an admin key "
                      "(set QSFRAUD_ADMIN_KEYS or pass --admin-keys to `qsfraud ui`)")
    try:
        store = load_keystore(settings.admin_keys, role="admin")
    except (OSError, PqcError) as exc:
        return None, f"the admin key store {settings.admin_keys} cannot be used: {exc}"
    return store, ""


def trust_registry(settings: UiSettings, admin: Any | None) -> tuple[Any | None, str]:
    """The registry config records are verified with (the admin store's, failing the file)."""
    from pqc import PqcError
    from pqc.keys import load_registry

    if settings.trust and Path(settings.trust).is_file():
        try:
            return load_registry(settings.trust), ""
        except (OSError, PqcError) as exc:
            if admin is None:
                return None, f"cannot load the trust registry {settings.trust}: {exc}"
    if admin is not None:
        return admin.registry, ""
    return None, f"no trust registry at {settings.trust}: every config record shows as untrusted"
