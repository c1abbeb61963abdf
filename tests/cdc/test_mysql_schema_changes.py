"""The binlog reader follows ALTER TABLE mid-stream (it caches table maps by table id).

The server gives a table a new table id whenever its definition changes (also for
``ALGORITHM=INSTANT``), so rows written after an ALTER are decoded with the new columns.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import mysql.connector

from cdc.mysql_source import MySQLBinlogSource
from qsfraud.stack import APP_USER, CDC_USER, DATABASE, MariaDBService


def test_rows_after_alter_table_have_the_new_columns(mariadb: MariaDBService,
                                                     unique_name: str) -> None:
    conn = mysql.connector.connect(host=mariadb.host, port=mariadb.port, user=APP_USER.user,
                                   password=APP_USER.password, database=DATABASE)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {unique_name} (id INT PRIMARY KEY, a VARCHAR(10))")
    conn.commit()
    source = MySQLBinlogSource(unique_name, host=mariadb.host, port=mariadb.port,
                               user=CDC_USER.user, password=CDC_USER.password,
                               database=DATABASE, table=unique_name, heartbeat_s=0.2)
    start = source.current_position()
    statements = [
        "INSERT INTO {t} VALUES (1, 'x')",
        "INSERT INTO {t} VALUES (2, 'y')",
        "ALTER TABLE {t} ADD COLUMN b INT DEFAULT 7, ALGORITHM=INSTANT",
        "INSERT INTO {t} VALUES (3, 'z', 9)",
        "ALTER TABLE {t} MODIFY a VARCHAR(20), ALGORITHM=INSTANT",
        "INSERT INTO {t} VALUES (4, 'a-longer-text', 10)",
        "ALTER TABLE {t} DROP COLUMN a",
        "INSERT INTO {t} VALUES (5, 11)",
        "ALTER TABLE {t} ADD COLUMN c DECIMAL(5,2) FIRST, ALGORITHM=INSTANT",
        "INSERT INTO {t} VALUES (1.5, 6, 12)",
        "UPDATE {t} SET b = 13 WHERE id = 6",
    ]
    for sql in statements:
        cur.execute(sql.format(t=unique_name))
        conn.commit()
    conn.close()
    seen: list[tuple[str, dict[str, Any] | None]] = []

    def read() -> None:
        for tx in source.run(start):
            seen.extend((c.op, c.after) for c in tx.changes)
            if len(seen) >= 7:
                source.stop()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while len(seen) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    source.stop()
    reader.join(10)
    assert seen == [
        ("c", {"id": 1, "a": "x"}),
        ("c", {"id": 2, "a": "y"}),
        ("c", {"id": 3, "a": "z", "b": 9}),
        ("c", {"id": 4, "a": "a-longer-text", "b": 10}),
        ("c", {"id": 5, "b": 11}),
        ("c", {"c": Decimal("1.50"), "id": 6, "b": 12}),
        ("u", {"c": Decimal("1.50"), "id": 6, "b": 13}),
    ]
