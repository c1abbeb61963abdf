"""MariaDB from Debian's packages, with the ROW binlog that log-based CDC reads."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsfraud.stack.service import Service, StackError, run_setup_command

SERVER_CANDIDATES = ("mariadbd", "/usr/sbin/mariadbd", "mysqld", "/usr/sbin/mysqld")
INSTALL_DB_CANDIDATES = ("mariadb-install-db", "/usr/bin/mariadb-install-db",
                         "mysql_install_db", "/usr/bin/mysql_install_db")
DEBIAN_PACKAGES = ("mariadb-server", "mariadb-client")


@dataclass(frozen=True)
class DatabaseUser:
    user: str
    password: str


APP_USER = DatabaseUser("qsfraud_app", "qsfraud_app")
CDC_USER = DatabaseUser("qsfraud_cdc", "qsfraud_cdc")
DATABASE = "shop"


def _find(candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        path = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK)
                                      else None)
        if path:
            return path
    return None


def ensure_mariadb_installed() -> tuple[str, str]:
    """Paths of the server and of install-db, installing Debian's packages when missing."""
    server, install_db = _find(SERVER_CANDIDATES), _find(INSTALL_DB_CANDIDATES)
    if server and install_db:
        return server, install_db
    apt = shutil.which("apt-get")
    if apt is None:
        raise StackError(
            "MariaDB is not installed and apt-get is not available to install it; install "
            "MariaDB 10.6+ (server and client) so that `mariadbd` and `mariadb-install-db` "
            "are on PATH"
        )
    if os.geteuid() != 0:
        raise StackError(
            "MariaDB is not installed; run as root or install it yourself: "
            "sudo apt-get install -y --no-install-recommends mariadb-server mariadb-client"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-qq"],
                [apt, "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES]):
        run_setup_command(cmd, f"`{' '.join(cmd)}`", env=env)
    server, install_db = _find(SERVER_CANDIDATES), _find(INSTALL_DB_CANDIDATES)
    if not (server and install_db):
        raise StackError("apt-get installed MariaDB but mariadbd/mariadb-install-db are not found")
    return server, install_db


class MariaDBService(Service):
    """A MariaDB server with ROW binlog, a CDC user and an application user."""

    name = "mariadb"
    start_timeout = 60.0

    def __init__(self, root: Path, host: str, port: int) -> None:
        super().__init__(root, host)
        self.port = port
        self.datadir = self.data_dir / "data"
        self.socket = self.data_dir / "mariadb.sock"

    def ports(self) -> dict[str, int]:
        return {"port": self.port}

    def endpoint(self) -> dict[str, Any]:
        return {
            "host": self.host, "port": self.port, "database": DATABASE,
            "app_user": APP_USER.user, "app_password": APP_USER.password,
            "cdc_user": CDC_USER.user, "cdc_password": CDC_USER.password,
        }

    def prepare(self) -> None:
        _, install_db = ensure_mariadb_installed()
        if (self.datadir / "mysql").is_dir():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        run_setup_command(
            [install_db, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            "mariadb-install-db",
        )

    def command(self) -> list[str]:
        server, _ = ensure_mariadb_installed()
        return [
            server, "--no-defaults", "--user=root", f"--datadir={self.datadir}",
            f"--socket={self.socket}", f"--port={self.port}", f"--bind-address={self.host}",
            f"--pid-file={self.data_dir / 'mariadbd.pid'}", "--skip-name-resolve",
            "--server-id=1", f"--log-bin={self.datadir / 'mysql-bin'}", "--binlog-format=ROW",
            "--binlog-row-image=FULL", "--binlog-row-metadata=FULL", "--log-slave-updates",
            "--innodb-buffer-pool-size=128M", "--innodb-flush-log-at-trx-commit=2",
            "--sync-binlog=0", "--max-connections=200", "--character-set-server=utf8mb4",
            "--expire-logs-days=7",
        ]

    def healthy(self) -> bool:
        import mysql.connector

        try:
            conn = mysql.connector.connect(unix_socket=str(self.socket), user="root",
                                           connection_timeout=1)
        except mysql.connector.Error:
            return False
        conn.close()
        return True

    def after_ready(self) -> None:
        import mysql.connector

        conn = mysql.connector.connect(unix_socket=str(self.socket), user="root")
        try:
            cur = conn.cursor()
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{DATABASE}`")
            for host in ("127.0.0.1", "localhost", "%"):
                for u in (APP_USER, CDC_USER):
                    cur.execute(f"CREATE USER IF NOT EXISTS '{u.user}'@'{host}' "
                                f"IDENTIFIED BY '{u.password}'")
                cur.execute(f"GRANT ALL PRIVILEGES ON *.* TO '{APP_USER.user}'@'{host}'")
                cur.execute(
                    "GRANT SELECT, RELOAD, REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR "
                    f"ON *.* TO '{CDC_USER.user}'@'{host}'"
                )
            cur.execute("FLUSH PRIVILEGES")
        finally:
            conn.close()
