"""Run a source in a child process, so that decoding rows and writing Kafka use two cores.

Decoding the binlog (pure Python in ``mysql-replication``) costs about as much CPU as mapping,
encoding and producing; in one process both share the GIL. The child rebuilds the source from
the config, runs :meth:`Source.run` from the checkpoint and sends whole
:class:`SourceTransaction` objects over a bounded queue. It stops when asked, and exits by
itself when its parent dies (even by SIGKILL), so a crashed CDC process leaves no reader behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.synchronize
import os
import queue
import threading
import time
from typing import Any

from cdc.source import Position, SourceError

DONE = "done"


def _watch_parent(parent_pid: int, stop: multiprocessing.synchronize.Event,
                  on_stop: Any) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)  # the parent is gone: nobody will read what we produce
        if stop.is_set():
            on_stop()
        time.sleep(0.2)


def run_source(config: dict[str, Any], checkpoint: Position | None, out: Any,
               stop: multiprocessing.synchronize.Event, parent_pid: int) -> None:
    """Child process body: source transactions, then DONE or a SourceError, into ``out``."""
    from cdc.config import CdcConfig

    source = None
    try:
        source = CdcConfig.from_dict(config).build_source()
        threading.Thread(target=_watch_parent, args=(parent_pid, stop, source.stop),
                         daemon=True).start()
        for tx in source.run(checkpoint):
            while not stop.is_set():
                try:
                    out.put(tx, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                break
    except BaseException as exc:
        error = exc if isinstance(exc, SourceError) else SourceError(
            f"{type(exc).__name__}: {exc}")
        out.put(error)
    else:
        out.put(DONE)
    finally:
        if source is not None:
            source.close()
        out.close()
        out.join_thread()


class SourceProcess:
    """The child process and its queue, as seen from the pipeline."""

    def __init__(self, config: dict[str, Any], checkpoint: Position | None,
                 maxsize: int = 2000) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.queue: Any = ctx.Queue(maxsize=maxsize)
        self.stop_event = ctx.Event()
        self.process = ctx.Process(target=run_source, daemon=True, name="cdc-source",
                                   args=(config, checkpoint, self.queue, self.stop_event,
                                         os.getpid()))

    def start(self) -> None:
        self.process.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            # drain, so that a child blocked on a full queue can finish
            with contextlib.suppress(queue.Empty, EOFError, OSError):
                self.queue.get(timeout=0.05)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
