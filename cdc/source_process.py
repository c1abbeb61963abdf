"""Run a source in a child process, so that decoding rows and writing Kafka use two cores.

Decoding the binlog (pure Python in ``mysql-replication``) costs about as much CPU as mapping,
encoding and producing; in one process both share the GIL. The child rebuilds the source from
the config, runs :meth:`Source.run` from the checkpoint, maps and encodes each source
transaction (:class:`cdc.encoder.ChangeEncoder`) and sends the encoded transactions (Kafka
keys and values as bytes, with the position) over a pipe (bounded: backpressure): bytes cross
it far more cheaply than source rows. It stops when asked, and exits by
itself when its parent dies (even by SIGKILL), so a crashed CDC process leaves no reader behind.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.synchronize
import os
import pickle
import queue
import threading
import time
from pathlib import Path
from typing import Any

from cdc.encoder import EncodedTransaction
from cdc.source import Position, SourceError

fcntl: Any
try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

DONE = "done"
PIPE_BYTES = 1 << 20  # reader run-ahead: ~1,700 encoded changes
BATCH_MAX = 200  # changes per pipe message: at ~130 us per change, the first waits <= ~26 ms


def _watch_parent(parent_pid: int, stop: multiprocessing.synchronize.Event,
                  on_stop: Any) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)  # the parent is gone: nobody will read what we produce
        if stop.is_set():
            on_stop()
        time.sleep(0.2)


def _send(out: Any, item: Any) -> None:
    out.send_bytes(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))


def run_source(config: dict[str, Any], checkpoint: Position | None, out: Any,
               stop: multiprocessing.synchronize.Event, parent_pid: int,
               tombstones: bool = False) -> None:
    """Child process body: encoded transactions, then DONE or a SourceError, into ``out``.

    ``out`` is the write end of a pipe: each item is pickled and written by the reading
    thread itself (a ``multiprocessing.Queue`` would hand every item to a feeder thread, two
    thread switches per source transaction). A full pipe blocks the reader: backpressure.
    """
    from cdc.config import CdcConfig

    source = None
    try:
        cfg = CdcConfig.from_dict(config)
        source = cfg.build_source()
        encoder = cfg.change_encoder(source, tombstones)
        threading.Thread(target=_watch_parent, args=(parent_pid, stop, source.stop),
                         daemon=True).start()
        batch: list[EncodedTransaction] = []
        changes = 0
        for tx in source.run(checkpoint):
            encoded = encoder.encode(tx)
            # consecutive single-change transactions (a change stream without multi-document
            # transactions) travel as one
            if not (batch and batch[-1].absorb(encoded)):
                batch.append(encoded)
            changes += len(tx.changes)
            # one pipe message for what was read without waiting: pickling, the pipe and the
            # parent's loop cost per message, and a change stream delivers ~200 at a time.
            # A transaction without changes goes at once: a binlog source hands on another
            # table's only after its own (MySQLBinlogSource), and while it reads past the rest
            # of them, which can take until the table's next change, nothing would be sent
            if (changes >= BATCH_MAX or len(batch) >= BATCH_MAX or not tx.changes
                    or not source.ready()):
                _send(out, batch[0] if len(batch) == 1 else batch)
                batch, changes = [], 0
            if stop.is_set():
                break
        if batch:
            _send(out, batch[0] if len(batch) == 1 else batch)
    except BaseException as exc:
        error = exc if isinstance(exc, SourceError) else SourceError(
            f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(OSError):
            _send(out, error)
    else:
        with contextlib.suppress(OSError):
            _send(out, DONE)
    finally:
        if source is not None:
            source.close()
        out.close()


def _grow_pipe(conn: Any, size: int = PIPE_BYTES) -> None:
    """Let the reader run ahead (while a Kafka commit is in flight) by up to ``size`` bytes."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if set_size is None:
        return
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        limit = size
    with contextlib.suppress(OSError):
        fcntl.fcntl(conn.fileno(), set_size, min(size, limit))


class PipeQueue:
    """The parent's end of the pipe, with the two queue methods the pipeline uses.

    A message is one item or a list of encoded transactions, handed out one by one.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._ready: collections.deque[Any] = collections.deque()

    def get(self, timeout: float) -> Any:
        if self._ready:
            return self._ready.popleft()
        if not self.conn.poll(timeout):
            raise queue.Empty
        try:
            data = self.conn.recv_bytes()
        except EOFError:
            raise SourceError("the reader process exited without a word (killed?)") from None
        item = pickle.loads(data)
        if type(item) is list:
            self._ready.extend(item)
            return self._ready.popleft()
        return item

    def empty(self) -> bool:
        return not self._ready and not self.conn.poll(0)


class SourceProcess:
    """The child process and the pipe it writes to, as seen from the pipeline."""

    def __init__(self, config: dict[str, Any], checkpoint: Position | None,
                 tombstones: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        reader, self._writer = ctx.Pipe(duplex=False)
        _grow_pipe(self._writer)
        self.queue = PipeQueue(reader)
        self.stop_event = ctx.Event()
        self.process = ctx.Process(target=run_source, daemon=True, name="cdc-source",
                                   args=(config, checkpoint, self._writer, self.stop_event,
                                         os.getpid(), tombstones))

    def start(self) -> None:
        self.process.start()
        self._writer.close()  # the child holds it now: EOF here means the child is gone

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            # drain, so that a child blocked on a full pipe can finish
            with contextlib.suppress(queue.Empty, EOFError, OSError, SourceError):
                self.queue.get(timeout=0.05)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.queue.conn.close()
