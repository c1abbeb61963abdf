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
from fraud.schema import DEFAULT_BOUNDS, InputBounds
from fraud.topics import DEFAULT_PARTITIONS
from qsfraud.cli import CommandError
from streams.settings import DEFAULT_TRUST_REGISTRY, INPUT_FORMATS, WorkerSettings


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
    from cdc.debezium import DebeziumDecoder
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
            input_format=args.input_format,
            mapping=Path(args.mapping) if args.mapping else None,
            state_horizon_s=args.state_horizon,
            input_bounds=InputBounds(max_record_bytes=args.max_record_bytes,
                                     max_amount=args.max_amount, max_age_s=args.max_event_age,
                                     max_future_s=args.max_event_future),
            fl_identity=Path(args.fl_identity) if args.fl_identity else None,
            fl_aggregator=Path(args.fl_aggregator) if args.fl_aggregator else None,
            fl_trust=Path(args.fl_trust) if args.fl_trust else None,
            fl_sync_labels=args.fl_sync_labels,
            fl_updates_topic=args.fl_updates_topic,
            fl_global_topic=args.fl_global_topic,
            fl_watch_key=Path(args.fl_watch_key) if args.fl_watch_key else None,
            fl_watch_min_score=args.fl_watch_min_score,
            fl_watch_report=args.fl_watch_report,
            fl_watch_new_devices=args.fl_watch_new_devices,
            fl_watch_new_min_score=args.fl_watch_new_min_score,
            api_tokens=Path(args.api_tokens) if args.api_tokens else None,
            api_cert=Path(args.api_cert) if args.api_cert else None,
            api_key=Path(args.api_key) if args.api_key else None,
            api_url=args.api_url,
            api_max_wait_ms=args.api_max_wait_ms,
            api_default_wait_ms=min(2000, args.api_max_wait_ms),
        )
        if settings.fl_enabled:  # unusable key files stop the command here, with one line
            from streams.fl_sync import load_fl_keys, load_watch_key

            load_watch_key(settings, load_fl_keys(*(Path(p) for p in (
                args.fl_identity, args.fl_aggregator, args.fl_trust))))
        # a bad mapping file stops the command here, with one line, not in the worker
        DebeziumDecoder.load(settings.retailer, settings.mapping)
    except ValueError as exc:  # also cdc.mapping.ConfigError
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
                   help="HTTP port of /metrics and the API (default 6066)")
    p.add_argument("--web-host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--datadir", default=env("QSFRAUD_STREAMS_DATA", ".qsfraud/streams"))
    p.add_argument("--trust", default=env("QSFRAUD_CONFIG_TRUST", str(DEFAULT_TRUST_REGISTRY)),
                   help="registry of trusted admin keys for signed config "
                        f"(default {DEFAULT_TRUST_REGISTRY})")
    p.add_argument("--config-topic", default=topics.CONFIG)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--checkpoint-interval", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--scored-ttl", type=float, default=7 * 86400.0, metavar="SECONDS",
                   help="the label delay: how long after a transaction its label may come "
                        "(default 7 days; --state-horizon must exceed it)")
    p.add_argument("--state-horizon", type=float, default=8 * 86400.0, metavar="SECONDS",
                   help="entity state and scored transactions expire this long after their "
                        "last event, in event time (default 8 days; must exceed 1 day, the "
                        "longest feature window, and --scored-ttl)")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                   help="auto: qsfraud CDC envelopes, bare transactions and Debezium change "
                        "events by their shape; debezium: Debezium events only, tombstones "
                        "skipped as deletes (default auto)")
    p.add_argument("--mapping", metavar="FILE",
                   help="TOML/YAML file whose [mapping] table (as in a qsfraud CDC config) "
                        "maps Debezium rows to transactions (default: rows have canonical "
                        "field names)")
    b = DEFAULT_BOUNDS
    p.add_argument("--max-record-bytes", type=int, default=b.max_record_bytes, metavar="BYTES",
                   help="larger input records are dead-lettered (default %(default)s)")
    p.add_argument("--max-amount", type=float, default=b.max_amount,
                   help="larger amounts are dead-lettered (default %(default)g)")
    p.add_argument("--max-event-age", type=float, default=b.max_age_s, metavar="SECONDS",
                   help="older timestamps are dead-lettered (default 10 years)")
    p.add_argument("--max-event-future", type=float, default=b.max_future_s, metavar="SECONDS",
                   help="timestamps further ahead of now are dead-lettered (default 1 day)")
    fl = p.add_argument_group("federated learning (on with all three key flags, off with none)")
    fl.add_argument("--fl-identity", metavar="PATH", default=env("QSFRAUD_FL_IDENTITY"),
                    help="the retailer's key store (qsfraud keys init --role retailer)")
    fl.add_argument("--fl-aggregator", metavar="FILE", default=env("QSFRAUD_FL_AGGREGATOR"),
                    help="the aggregator's public-key bundle (qsfraud keys show --export)")
    fl.add_argument("--fl-trust", metavar="FILE", default=env("QSFRAUD_FL_TRUST"),
                    help="registry of trusted keys that verifies the aggregator's global models")
    fl.add_argument("--fl-sync-labels", type=int, metavar="N",
                    default=int(env("QSFRAUD_FL_SYNC_LABELS", "500")),
                    help="send an update after N learned labels, or after the live config's "
                         "fl.sync_interval_s seconds (default 500)")
    fl.add_argument("--fl-updates-topic", default=topics.FL_UPDATES)
    fl.add_argument("--fl-global-topic", default=topics.FL_GLOBAL)
    fl.add_argument("--fl-watch-key", default=env("QSFRAUD_FL_WATCH_KEY"), metavar="FILE",
                    help="the watchlist's consortium key sealed to this retailer by an admin "
                         "(default: <fl-identity>/watch-key.sealed if it exists; without a key "
                         "the cross-retailer watchlist is off)")
    fl.add_argument("--fl-watch-min-score", type=float, metavar="S",
                    default=float(env("QSFRAUD_FL_WATCH_MIN_SCORE", "0")),
                    help="hold a watch-listed transaction only if the own model scores it at "
                         "least S (default 0: every one)")
    fl.add_argument("--fl-watch-report", choices=("hold", "verify"),
                    default=env("QSFRAUD_FL_WATCH_REPORT", "hold"),
                    help="report the instrument and device of rows this retailer held or "
                         "blocked (hold, default) or also sent to step-up (verify)")
    fl.add_argument("--fl-watch-new-devices", action="store_true",
                    default=env("QSFRAUD_FL_WATCH_NEW_DEVICES", "") == "1",
                    help="also report devices seen here for the first time, and hold a "
                         "transaction whose device is new here and was new at another retailer "
                         "in the last hours (fl/README.md, 'New devices')")
    fl.add_argument("--fl-watch-new-min-score", type=float, metavar="S",
                    default=float(env("QSFRAUD_FL_WATCH_NEW_MIN_SCORE", "0.2")),
                    help="... if the own model scores it at least S (default 0.2)")
    p.add_argument("--api-tokens", default=env("QSFRAUD_API_TOKENS"), metavar="FILE",
                   help="the HTTP API's tokens: SHA-256 digests per retailer, re-read when the "
                        "file changes (docs/api/README.md); without it the API refuses every "
                        "request but /health")
    p.add_argument("--api-cert", metavar="PEM",
                   help="TLS certificate chain: /metrics and the API over HTTPS only")
    p.add_argument("--api-key", metavar="PEM", help="the --api-cert's private key")
    p.add_argument("--api-url", metavar="URL",
                   help="where the other workers reach this one's API (default "
                        "http(s)://--web-host:--web-port)")
    p.add_argument("--api-max-wait-ms", type=int, default=5000, metavar="MS",
                   help="the longest wait_ms a request may ask for (default %(default)s)")
    p.add_argument("--loglevel", default="info", choices=["debug", "info", "warn", "error"])
    p.set_defaults(func=run)
