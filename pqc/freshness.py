"""Freshness: per-sender increasing sequence numbers and a timestamp window.

The last accepted sequence number is kept per ``(sender, purpose)`` by a
:class:`FreshnessStore`; :class:`InMemoryFreshness` is the default, and a worker that must
survive restarts plugs in its own (two methods).

>>> store = InMemoryFreshness()
>>> store.advance("retailer-1", "model-update", 4)
>>> store.advance("retailer-1", "model-update", 4)
Traceback (most recent call last):
...
pqc.errors.Replay: sequence 4 from retailer-1 (model-update) is not after 4: replay
>>> store.last_sequence("retailer-1", "model-update")
4
>>> TimeWindow(max_age_s=60, max_future_s=5).check(timestamp_ms=1_000_000, now=1_100.0)
Traceback (most recent call last):
...
pqc.errors.OutsideTimeWindow: timestamp 1000.000 is 100.0 s old (at most 60.0 s allowed)
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pqc.errors import FreshnessStateError, OutsideTimeWindow, Replay
from pqc.keys import write_private_json


class FreshnessStore(Protocol):
    """Where the last accepted sequence number per ``(sender, purpose)`` lives."""

    def last_sequence(self, sender: str, purpose: str) -> int | None:
        """The last accepted sequence number, or None if none was accepted yet."""
        ...

    def advance(self, sender: str, purpose: str, sequence: int) -> None:
        """Record ``sequence``, atomically; raise :class:`~pqc.errors.Replay` unless it is
        greater than the last accepted one."""
        ...


class InMemoryFreshness:
    """A thread-safe, process-local :class:`FreshnessStore`."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def last_sequence(self, sender: str, purpose: str) -> int | None:
        with self._lock:
            return self._last.get((sender, purpose))

    def advance(self, sender: str, purpose: str, sequence: int) -> None:
        with self._lock:
            last = self._last.get((sender, purpose))
            if last is not None and sequence <= last:
                raise Replay(
                    f"sequence {sequence} from {sender} ({purpose}) is not after {last}: replay"
                )
            self._record((sender, purpose), sequence)

    def _record(self, key: tuple[str, str], sequence: int) -> None:
        self._last[key] = sequence


class FileFreshness(InMemoryFreshness):
    """A :class:`FreshnessStore` kept in a JSON file (mode 0600), rewritten atomically on
    every accepted sequence number, so a restarted worker still rejects replays.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "freshness.json")
    >>> FileFreshness(path).advance("aggregator", "global-model", 12)
    >>> FileFreshness(path).last_sequence("aggregator", "global-model")
    12
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        if self.path.exists():
            self._last = self._read()

    def _read(self) -> dict[tuple[str, str], int]:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            if document.get("format") != "qsfraud-freshness" or document.get("version") != 1:
                raise ValueError("not a qsfraud-freshness version 1 file")
            return {(e["sender"], e["purpose"]): int(e["sequence"]) for e in document["last"]}
        except (
            OSError,
            UnicodeDecodeError,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
        ) as exc:
            raise FreshnessStateError(f"{self.path}: {exc}") from exc

    def _record(self, key: tuple[str, str], sequence: int) -> None:
        state = {**self._last, key: sequence}
        entries = [{"sender": s, "purpose": p, "sequence": n} for (s, p), n in state.items()]
        write_private_json(
            self.path, {"format": "qsfraud-freshness", "version": 1, "last": entries}
        )
        self._last = state


@dataclass(frozen=True)
class TimeWindow:
    """How old (``max_age_s``) or how far ahead (``max_future_s``) a timestamp may be."""

    max_age_s: float = 900.0
    max_future_s: float = 120.0

    def check(self, timestamp_ms: int, now: float) -> None:
        """Raise :class:`~pqc.errors.OutsideTimeWindow` if ``timestamp_ms`` is outside."""
        stamp = timestamp_ms / 1000.0
        age = now - stamp
        if age > self.max_age_s:
            raise OutsideTimeWindow(
                f"timestamp {stamp:.3f} is {age:.1f} s old (at most {self.max_age_s:.1f} s allowed)"
            )
        if -age > self.max_future_s:
            raise OutsideTimeWindow(
                f"timestamp {stamp:.3f} is {-age:.1f} s in the future "
                f"(at most {self.max_future_s:.1f} s allowed)"
            )


DEFAULT_WINDOW = TimeWindow()
