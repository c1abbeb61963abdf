"""``qsfraud worker --retailer R``: one faust worker that scores, decides and learns.

Thin shell over :mod:`streams.app`; the broker comes from ``--bootstrap``,
``QSFRAUD_BOOTSTRAP`` or ``.qsfraud/stack.json`` (written by ``qsfraud stack up``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fraud import topics
from fraud.topics import DEFAULT_PARTITIONS
from qsfraud.cli import CommandError
from streams.settings import DEFAULT_TRUST_REGISTRY, WorkerSettings


def default_bootstrap(explicit: str | None) -> str:
    """``--bootstrap``, else ``QSFRAUD_BOOTSTRAP``, else the stack's ``stack.json``."""
    if explicit:
        return explicit
    if os.environ.get("QSFRAUD_BOOTSTRAP"):
        return os.environ["QSFRAUD_BOOTSTRAP"]
    home = Path(os.environ.get("QSFRAUD_HOME", ".qsfraud"))
    try:
        return str(json.loads((home / "stack.json").read_text())["kafka"]["bootstrap_servers"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CommandError(
            "no Kafka: pass --bootstrap HOST:PORT, set QSFRAUD_BOOTSTRAP or run "
            "`qsfraud stack up`"
        ) from None


def run(args: argparse.Namespace) -> int:
    from streams.app import run_worker  # faust is slow to import: only when running

    try:
        settings = WorkerSettings(
            retailer=args.retailer,
            bootstrap=default_bootstrap(args.bootstrap),
            partitions=DEFAULT_PARTITIONS if args.partitions is None else args.partitions,
            adapt_partitions=args.partitions is None,
            web_port=args.web_port,
            web_host=args.web_host,
            datadir=Path(args.datadir),
            trust_registry=Path(args.trust) if args.trust else None,
            config_topic=args.config_topic,
            batch_size=args.batch_size,
            checkpoint_interval_s=args.checkpoint_interval,
            scored_ttl_s=args.scored_ttl,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    from streams.faust_compat import IncompatibleVersions
    from streams.topics import PartitionMismatch

    try:
        return run_worker(settings, loglevel=args.loglevel)
    except (IncompatibleVersions, PartitionMismatch) as exc:
        raise CommandError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", help="run a streams worker: score, decide, learn for a retailer")
    env = os.environ.get
    p.add_argument("--retailer", required=True, help="retailer id (topics <R>.transactions ...)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: stack.json)")
    partitions = env("QSFRAUD_PARTITIONS")
    p.add_argument("--partitions", type=int, default=int(partitions) if partitions else None,
                   help="partitions of the retailer's topics and changelogs; without it, "
                        "those of an existing <R>.transactions (the CDC's), else "
                        f"{DEFAULT_PARTITIONS}")
    p.add_argument("--web-port", type=int, default=int(env("QSFRAUD_WEB_PORT", "6066")),
                   help="HTTP port of /metrics (default 6066)")
    p.add_argument("--web-host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--datadir", default=env("QSFRAUD_STREAMS_DATA", ".qsfraud/streams"))
    p.add_argument("--trust", default=env("QSFRAUD_CONFIG_TRUST", str(DEFAULT_TRUST_REGISTRY)),
                   help="registry of trusted admin keys for signed config "
                        f"(default {DEFAULT_TRUST_REGISTRY})")
    p.add_argument("--config-topic", default=topics.CONFIG)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--checkpoint-interval", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--scored-ttl", type=float, default=7 * 86400.0, metavar="SECONDS",
                   help="how long a scored transaction waits for its label (default 7 days)")
    p.add_argument("--loglevel", default="info", choices=["debug", "info", "warn", "error"])
    p.set_defaults(func=run)
