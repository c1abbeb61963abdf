"""What every CDC source gives the sink: changes grouped by source transaction, with positions.

A :class:`Source` first (optionally) snapshots its table, then streams. Both phases yield
:class:`SourceTransaction` objects: the changes of one committed source transaction (or one
snapshot) and the position right after it. The sink writes a transaction's changes and its
position to Kafka atomically, so a restart from the last stored position neither loses nor
repeats a change. A transaction with no changes still moves the position forward.

>>> change = Change(op="c", pk="7", before=None, after={"id": 7}, committed_at=1.5)
>>> SourceTransaction(changes=[change], position={"file": "b.000001", "pos": 120}).size
1
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

Op = Literal["r", "c", "u", "d"]
OPS: Final = ("r", "c", "u", "d")
Position = dict[str, Any]
SNAPSHOT_MODES: Final = ("initial", "never", "when_needed")
HISTORY_LOST_ACTIONS: Final = ("fail", "resnapshot")


class SourceError(RuntimeError):
    """The source cannot go on (bad settings, dropped table, lost connection...)."""


class HistoryLost(SourceError):
    """The stored position is no longer in the source's log (purged binlog, Mongo code 286)."""


@dataclass(frozen=True, slots=True)
class Change:
    """One row change: ``op`` is r (snapshot read), c (create), u (update) or d (delete)."""

    op: Op
    pk: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    committed_at: float
    error: str | None = None  # set when the source could not decode the change itself

    def __reduce__(self) -> tuple[Any, ...]:
        # a plain tuple pickles several times faster than a frozen slots dataclass's state
        # (this crosses the pipe from the reader process once per change)
        return (Change, (self.op, self.pk, self.before, self.after, self.committed_at,
                         self.error))


@dataclass(slots=True)
class SourceTransaction:
    """The changes of one source transaction (or one whole snapshot) and the position after it."""

    changes: list[Change]
    position: Position
    snapshot: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.changes)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SourceTransaction, (self.changes, self.position, self.snapshot, self.meta))


class Source(ABC):
    """Base class of CDC sources: resume from a stored position, snapshot, then stream."""

    kind: str = "source"

    def __init__(self, source_id: str, snapshot_mode: str = "initial",
                 on_history_lost: str = "fail") -> None:
        if snapshot_mode not in SNAPSHOT_MODES:
            raise SourceError(f"snapshot must be one of {', '.join(SNAPSHOT_MODES)}, "
                              f"got {snapshot_mode!r}")
        if on_history_lost not in HISTORY_LOST_ACTIONS:
            raise SourceError(f"on_history_lost must be one of {', '.join(HISTORY_LOST_ACTIONS)}"
                              f", got {on_history_lost!r}")
        self.source_id = source_id
        self.snapshot_mode = snapshot_mode
        self.on_history_lost = on_history_lost
        self.stopping = threading.Event()

    # --- what each source implements ---------------------------------------------------------
    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """``{"connector": ..., "db": ..., "table": ...}`` for the envelope's ``source``."""

    @abstractmethod
    def snapshot(self) -> Iterator[SourceTransaction]:
        """Read the table consistently; the last yielded position is where streaming starts."""

    @abstractmethod
    def current_position(self) -> Position:
        """The position of the source's log now (``snapshot = "never"`` starts here)."""

    @abstractmethod
    def stream(self, position: Position) -> Iterator[SourceTransaction]:
        """Committed transactions after ``position``, until :meth:`stop`; HistoryLost if gone."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""

    def ready(self) -> bool:
        """True when the next transaction is already read and can be had without waiting
        (a hint: the reader hands what is ready over in one go)."""
        return False

    # --- the shared run loop ------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()

    def run(self, checkpoint: Position | None) -> Iterator[SourceTransaction]:
        """Snapshot when the mode asks for it, then stream; handles lost history per config."""
        position: Position
        if checkpoint is not None:
            position = checkpoint
        else:
            if self.snapshot_mode == "never":
                position = self.current_position()
                yield SourceTransaction(changes=[], position=position)
            else:
                position = yield from self._snapshot()
        while not self.stopping.is_set():
            try:
                yield from self.stream(position)
                return
            except HistoryLost as exc:
                if self.on_history_lost != "resnapshot" and self.snapshot_mode != "when_needed":
                    raise HistoryLost(
                        f"{self.source_id}: {exc}; set on_history_lost = \"resnapshot\" to take "
                        "a new snapshot, or remove the stored position to start over"
                    ) from None
                position = yield from self._snapshot()

    def _snapshot(self) -> Generator[SourceTransaction, None, Position]:
        position: Position | None = None
        for tx in self.snapshot():
            position = tx.position
            yield tx
        if position is None:
            raise SourceError(f"{self.source_id}: snapshot produced no position")
        return position
