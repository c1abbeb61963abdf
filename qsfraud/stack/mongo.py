"""A MongoDB wire-protocol server with change streams: SecantusDB as a single-node replica set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from qsfraud.stack.service import Service, StackError

REPLICA_SET = "secantus"


class MongoService(Service):
    """``python -m secantus`` on loopback, data under the stack's folder."""

    name = "mongo"
    start_timeout = 60.0

    def __init__(self, root: Path, host: str, port: int) -> None:
        super().__init__(root, host)
        self.port = port
        self.storage = self.data_dir / "data"

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?replicaSet={REPLICA_SET}"

    def ports(self) -> dict[str, int]:
        return {"port": self.port}

    def endpoint(self) -> dict[str, Any]:
        return {"uri": self.uri}

    def prepare(self) -> None:
        if importlib.util.find_spec("secantus") is None:
            raise StackError(
                "the MongoDB-compatible server `secantusdb` is not installed in this Python "
                f"({sys.executable}); run `make install` (it is in the dev extra)"
            )
        self.storage.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "secantus", "--host", self.host, "--port", str(self.port),
                "--storage-path", str(self.storage)]

    def healthy(self) -> bool:
        import pymongo
        import pymongo.errors

        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
        )
        try:
            client.admin.command("ping")
        except pymongo.errors.PyMongoError:
            return False
        finally:
            client.close()
        return True
