"""``qsfraud aggregator --keys DIR --bootstrap HOST:PORT``: run federated rounds over Kafka."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from fl.aggregator import STRATEGIES, Aggregator, AggregatorSettings
from pqc.errors import PqcError
from pqc.keys import load_keystore
from qsfraud.cli import CommandError


def run(args: argparse.Namespace) -> int:
    try:
        keys = load_keystore(args.keys, role="aggregator")
    except (PqcError, OSError) as exc:
        raise CommandError(f"cannot load the key store {args.keys}: {exc}") from None
    settings = AggregatorSettings(
        bootstrap=args.bootstrap, quorum=args.quorum, deadline_s=args.deadline,
        strategy=args.strategy, max_update_bytes=args.max_update_bytes,
        updates_topic=args.updates_topic, global_topic=args.global_topic,
        group_id=args.group_id, transactional_id=args.transactional_id,
        session_timeout_ms=args.session_timeout_ms, metrics_interval_s=args.metrics_interval,
        freshness_path=args.freshness, watchlist_path=args.watchlist_state,
    )
    aggregator = Aggregator(settings, keys)

    def graceful(signum: int, frame: FrameType | None) -> None:
        print(f"qsfraud aggregator: {signal.Signals(signum).name}: stopping", file=sys.stderr,
              flush=True)
        aggregator.stop()

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    return aggregator.run(rounds=args.rounds)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = AggregatorSettings(bootstrap="")
    p = sub.add_parser("aggregator", help="federated learning: open sealed updates, publish "
                                          "signed global models (one leader per group)")
    p.add_argument("--keys", required=True, help="the aggregator's key store (qsfraud keys init)")
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default=defaults.strategy)
    p.add_argument("--quorum", type=int, default=defaults.quorum,
                   help="updates that close a round at once")
    p.add_argument("--deadline", type=float, default=defaults.deadline_s,
                   help="seconds after a round's first update when it closes with what it has")
    p.add_argument("--max-update-bytes", type=int, default=defaults.max_update_bytes)
    p.add_argument("--updates-topic", default=defaults.updates_topic)
    p.add_argument("--global-topic", default=defaults.global_topic)
    p.add_argument("--group-id", default=defaults.group_id)
    p.add_argument("--transactional-id", default=defaults.transactional_id)
    p.add_argument("--session-timeout-ms", type=int, default=defaults.session_timeout_ms)
    p.add_argument("--metrics-interval", type=float, default=defaults.metrics_interval_s,
                   help="seconds between JSON metrics lines on stderr")
    p.add_argument("--freshness", default=None,
                   help="file of the last sequence number per retailer (kept across restarts)")
    p.add_argument("--watchlist-state", default=None,
                   help="file keeping the watchlist union across restarts (default: memory "
                        "only; it says which retailer reported which hashed key)")
    p.add_argument("--rounds", type=int, default=None, help="stop after this many rounds")
    p.set_defaults(func=run)
