"""Log-based CDC from the MySQL/MariaDB ROW binlog, with a consistent initial snapshot.

Snapshot: ``START TRANSACTION WITH CONSISTENT SNAPSHOT`` and, on MariaDB, the binlog position
of exactly that snapshot from ``SHOW STATUS LIKE 'binlog_snapshot_%'``; on MySQL 8, the same
under a brief ``FLUSH TABLES WITH READ LOCK``. Streaming then starts at that position, so no
change is missed or repeated. Positions are ``{"file", "pos"}`` taken after each ``XidEvent``
(a transaction boundary) and resumed with ``is_mariadb=False`` + ``log_file``/``log_pos``,
which works on both servers. The server needs ``binlog_format=ROW``,
``binlog_row_image=FULL`` and (for column names) ``binlog_row_metadata=FULL``.
``committed_at``: the binlog keeps whole seconds, so it is the latest time the commit can have
been: the end of its second, or the moment the event was read if that is sooner. Read live, that
is the binlog's read delay (milliseconds) after the commit; the bare second was up to 1 s before
it, and every commit -> decision latency showed half a second too much.
"""

from __future__ import annotations

import select
import time
import zlib
from collections.abc import Iterator
from typing import Any

import mysql.connector
import pymysql
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import (
    HeartbeatLogEvent,
    MariadbGtidEvent,
    QueryEvent,
    RotateEvent,
    XidEvent,
)
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from cdc.source import Change, HistoryLost, Position, Source, SourceError, SourceTransaction

SNAPSHOT_CHUNK = 5000
BINLOG_GONE_ERRORS = frozenset({1236})  # ER_MASTER_FATAL_ERROR_READING_BINLOG
# A transaction with no change of the table (another table's or database's, when several
# share the server: the demo's two MariaDB shops) only moves the position: the first after
# one of the table's own is handed on (the reader sends what it holds on seeing it), then one
# a second (the pipeline checkpoints an idle source about that often anyway); the rest are
# dropped, and the last is handed on at the next heartbeat if the stream goes quiet. Handing
# every one on cost the reader and the pipeline as much as the table's own changes when the
# other database was as busy.
EMPTY_POSITION_EVERY_S = 1.0


def commit_time(binlog_second: int, read_at: float) -> float:
    """The latest the commit in ``binlog_second`` can have been, read at ``read_at`` (kept in
    that second when the clocks of the reader and the server disagree).

    >>> commit_time(100, 100.012), commit_time(100, 250.0), commit_time(100, 99.0)
    (100.012, 101.0, 100.0)
    """
    return max(float(binlog_second), min(binlog_second + 1.0, read_at))


class MySQLBinlogSource(Source):
    """One table of a MySQL 8 or MariaDB 10.6+ database, snapshot then binlog stream."""

    kind = "mysql"

    def __init__(self, source_id: str, *, host: str, port: int, user: str, password: str,
                 database: str, table: str, server_id: int | None = None,
                 primary_key: list[str] | None = None, snapshot_mode: str = "initial",
                 on_history_lost: str = "fail", heartbeat_s: float = 1.0) -> None:
        super().__init__(source_id, snapshot_mode, on_history_lost)
        self.host, self.port, self.user, self.password = host, port, user, password
        self.database, self.table = database, table
        # A replica's server_id must be unique on the server; derive a stable one from the id.
        self.server_id = server_id or 100_000 + zlib.crc32(source_id.encode()) % 1_000_000_000
        self._primary_key = primary_key
        self.heartbeat_s = heartbeat_s
        self._stream: BinLogStreamReader | None = None

    def describe(self) -> dict[str, Any]:
        return {"connector": self.kind, "db": self.database, "table": self.table}

    def _connect(self) -> Any:
        try:
            return mysql.connector.connect(host=self.host, port=self.port, user=self.user,
                                           password=self.password, database=self.database,
                                           connection_timeout=10)
        except mysql.connector.Error as exc:
            raise SourceError(f"cannot connect to MySQL at {self.host}:{self.port}: {exc}") \
                from None

    def primary_key(self, cur: Any) -> list[str]:
        if self._primary_key:
            return list(self._primary_key)
        cur.execute(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA=%s "
            "AND TABLE_NAME=%s AND CONSTRAINT_NAME='PRIMARY' ORDER BY ORDINAL_POSITION",
            (self.database, self.table),
        )
        columns = [str(r[0]) for r in cur.fetchall()]
        if not columns:
            raise SourceError(f"table {self.database}.{self.table} has no primary key; "
                              "set source.primary_key in the config")
        self._primary_key = columns
        return columns

    def pk_of(self, row: dict[str, Any]) -> str:
        keys = self._primary_key or []
        return "|".join(str(row.get(k)) for k in keys) if keys else ""

    def ready(self) -> bool:
        """More of the binlog has arrived: in the client's read buffer or the socket. The
        reader then hands what it decodes over together: a shop's checkouts come in bursts,
        and one pipe message (and one Kafka transaction) for a burst instead of one for its
        first purchase and another for the rest saves both processes and the broker work."""
        conn = getattr(self._stream, "_stream_connection", None)
        sock, rfile = getattr(conn, "_sock", None), getattr(conn, "_rfile", None)
        if sock is None or rfile is None:
            return False
        if select.select([sock], [], [], 0)[0]:
            return True
        # peek() reads the socket only when the buffer is empty: not blocking, it cannot wait
        timeout = sock.gettimeout()
        try:
            sock.setblocking(False)
            return bool(rfile.peek(1))
        except OSError:
            return False
        finally:
            sock.settimeout(timeout)

    # --- positions ----------------------------------------------------------------------------
    @staticmethod
    def _master_status(cur: Any) -> tuple[str, int]:
        for statement in ("SHOW BINARY LOG STATUS", "SHOW MASTER STATUS"):
            try:
                cur.execute(statement)
            except mysql.connector.Error:
                continue
            row = cur.fetchone()
            if row:
                return str(row[0]), int(row[1])
        raise SourceError("the binlog is off: start the server with log_bin and binlog_format=ROW")

    def current_position(self) -> Position:
        conn = self._connect()
        try:
            log_file, log_pos = self._master_status(conn.cursor())
        finally:
            conn.close()
        return {"file": log_file, "pos": log_pos}

    def _check_available(self, position: Position) -> None:
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute("SHOW BINARY LOGS")
            files = [str(r[0]) for r in cur.fetchall()]
        finally:
            conn.close()
        if position["file"] not in files:
            oldest = files[0] if files else "none"
            raise HistoryLost(f"binlog {position['file']} has been purged from the server "
                              f"(oldest kept: {oldest})")

    # --- snapshot -----------------------------------------------------------------------------
    def snapshot(self) -> Iterator[SourceTransaction]:
        conn = self._connect()
        try:
            cur = conn.cursor()
            pk = self.primary_key(cur)
            cur.execute("SELECT VERSION()")
            version = str(cur.fetchone()[0])
            cur.execute("SET SESSION time_zone = '+00:00'")
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            if "mariadb" in version.lower():
                cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                cur.execute("SHOW STATUS LIKE 'binlog_snapshot_%'")
                status = {str(k).lower(): str(v) for k, v in cur.fetchall()}
                position = {"file": status["binlog_snapshot_file"],
                            "pos": int(status["binlog_snapshot_position"])}
            else:  # MySQL: hold the global read lock only while the snapshot starts
                cur.execute("FLUSH TABLES WITH READ LOCK")
                try:
                    cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                    log_file, log_pos = self._master_status(cur)
                finally:
                    cur.execute("UNLOCK TABLES")
                position = {"file": log_file, "pos": log_pos}
            started = time.time()
            order = ", ".join(f"`{c}`" for c in pk)
            rows = conn.cursor(dictionary=True)
            rows.execute(f"SELECT * FROM `{self.database}`.`{self.table}` ORDER BY {order}")
            chunk: list[Change] = []
            while True:
                batch = rows.fetchmany(SNAPSHOT_CHUNK)
                for row in batch:
                    chunk.append(Change(op="r", pk=self.pk_of(row), before=None, after=row,
                                        committed_at=started))
                if len(batch) < SNAPSHOT_CHUNK:
                    break
                if len(chunk) >= SNAPSHOT_CHUNK:
                    yield SourceTransaction(changes=chunk, position=position, snapshot=True,
                                            meta={"complete": False})
                    chunk = []
            conn.rollback()
            yield SourceTransaction(changes=chunk, position=position, snapshot=True)
        finally:
            conn.close()

    # --- stream -------------------------------------------------------------------------------
    def stream(self, position: Position) -> Iterator[SourceTransaction]:
        self._check_available(position)
        if not self._primary_key:
            conn = self._connect()
            try:
                self.primary_key(conn.cursor())
            finally:
                conn.close()
        self._stream = stream = BinLogStreamReader(
            connection_settings={"host": self.host, "port": self.port, "user": self.user,
                                 "passwd": self.password},
            server_id=self.server_id, blocking=True, resume_stream=True,
            log_file=position["file"], log_pos=int(position["pos"]), is_mariadb=False,
            only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent, XidEvent, QueryEvent,
                         MariadbGtidEvent, RotateEvent, HeartbeatLogEvent],
            only_schemas=[self.database], only_tables=[self.table],
            slave_heartbeat=self.heartbeat_s, enable_logging=False,
            # A TableMapEvent precedes every row event; re-decoding it (with its column
            # metadata) is about a fifth of the reader's work per small transaction. The
            # server assigns a table a new table id whenever its definition changes (ALTER
            # TABLE, also ALGORITHM=INSTANT), and the map is cleared at each binlog rotation
            # (server restart), so a table map cached by id is always the current one
            # (tests/cdc/test_mysql_schema_changes.py).
            freeze_schema=True,
        )
        pending: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]] = []
        gtid: str | None = None
        # the position after the last transaction without a change of this table (another
        # table's, another database's) that was not handed on; see EMPTY_POSITION_EVERY_S
        skipped: Position | None = None
        empty_due = 0.0
        after_change = False  # the last transaction handed on had changes
        try:
            for event in stream:
                if self.stopping.is_set():
                    return
                if isinstance(event, HeartbeatLogEvent):
                    if skipped is not None:  # the stream is idle: hand the position on now
                        yield SourceTransaction(changes=[], position=skipped)
                        skipped = None
                    continue
                if isinstance(event, WriteRowsEvent):
                    pending.extend(("c", None, r["values"]) for r in event.rows)
                elif isinstance(event, UpdateRowsEvent):
                    pending.extend(("u", r["before_values"], r["after_values"])
                                   for r in event.rows)
                elif isinstance(event, DeleteRowsEvent):
                    pending.extend(("d", r["values"], None) for r in event.rows)
                elif isinstance(event, MariadbGtidEvent):
                    gtid = str(event.gtid)
                elif isinstance(event, XidEvent) or (
                    isinstance(event, QueryEvent) and _query_text(event) != "BEGIN"
                ):
                    committed_at = commit_time(event.timestamp, time.time())
                    changes = [
                        Change(op=op, pk=self.pk_of(after or before or {}),  # type: ignore[arg-type]
                               before=before, after=after, committed_at=committed_at)
                        for op, before, after in pending
                    ]
                    pending = []
                    here: Position = {"file": stream.log_file, "pos": stream.log_pos}
                    if gtid:
                        here["gtid"] = gtid
                    if not changes:
                        # the first after one of ours goes on at once: it tells the reader
                        # that what it holds is all there is for now (source_process)
                        now = time.monotonic()
                        if not after_change and now < empty_due:
                            skipped = here
                            continue
                        empty_due = now + EMPTY_POSITION_EVERY_S
                    skipped = None
                    after_change = bool(changes)
                    yield SourceTransaction(changes=changes, position=here)
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] in BINLOG_GONE_ERRORS:
                raise HistoryLost(f"the server cannot send binlog {position['file']}: "
                                  f"{exc.args[-1]}") from None
            if self.stopping.is_set():
                return
            raise SourceError(f"binlog stream failed: {exc}") from None
        finally:
            stream.close()
            self._stream = None

    def close(self) -> None:
        self.stop()


def _query_text(event: QueryEvent) -> str:
    query = event.query
    text = query.decode(errors="replace") if isinstance(query, bytes) else str(query)
    return text.strip().upper()
