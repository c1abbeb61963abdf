"""Run a source in a child process, so that decoding rows and writing Kafka use two cores.

Decoding the binlog (pure Python in ``mysql-replication``) costs about as much CPU as mapping,
encoding and producing; in one process both share the GIL. The child rebuilds the source from
the config, runs :meth:`Source.run` from the checkpoint, maps and encodes each source
transaction (:class:`cdc.encoder.ChangeEncoder`) and sends the encoded transactions (Kafka
keys and values as bytes, with the position) over a bounded queue: bytes cross the pipe far
more cheaply than source rows. It stops when asked, and exits by
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
               stop: multiprocessing.synchronize.Event, parent_pid: int,
               tombstones: bool = False) -> None:
    """Child process body: encoded transactions, then DONE or a SourceError, into ``out``."""
    from cdc.config import CdcConfig
    from cdc.encoder import ChangeEncoder

    source = None
    try:
        cfg = CdcConfig.from_dict(config)
        source = cfg.build_source()
        encoder = ChangeEncoder(cfg.mapper, {**source.describe(), "id": cfg.source_id},
                                key_field=str(cfg.kafka["key"]), tombstones=tombstones)
        threading.Thread(target=_watch_parent, args=(parent_pid, stop, source.stop),
                         daemon=True).start()
        for tx in source.run(checkpoint):
            encoded = encoder.encode(tx)
            while not stop.is_set():
                try:
                    out.put(encoded, timeout=0.2)
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
                 maxsize: int = 2000, tombstones: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.queue: Any = ctx.Queue(maxsize=maxsize)
        self.stop_event = ctx.Event()
        self.process = ctx.Process(target=run_source, daemon=True, name="cdc-source",
                                   args=(config, checkpoint, self.queue, self.stop_event,
                                         os.getpid(), tombstones))

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
