"""``qsfraud demo``: the whole system on a stack of its own, until Ctrl-C (or --duration)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qsfraud.cli import CommandError
from qsfraud.stack import StackError


def run(args: argparse.Namespace) -> int:
    from qsfraud.demo import Demo, DemoError, DemoSettings

    if args.rate <= 0:
        raise CommandError("--rate must be positive")
    if (args.faults or args.hostile) and not args.duration:
        raise CommandError("--faults and --hostile need --duration (they are timed by it)")
    settings = DemoSettings(root=Path(args.root), rate=args.rate, duration=args.duration,
                            days=args.days, tx_per_day=args.tx_per_day, seed=args.seed,
                            report_every=args.report_every, fl_interval_s=args.fl_interval,
                            headless=args.headless, faults=args.faults,
                            hostile=args.hostile, partitions=args.partitions,
                            drain_s=120.0 if args.faults else 30.0,
                            ui_port=None if args.headless else args.ui_port)
    try:
        return Demo(settings).run()
    except (DemoError, StackError) as exc:
        raise CommandError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = _defaults()
    p = sub.add_parser("demo", help="run three retailers, federated learning and the UI on "
                                    "a local stack of their own")
    p.add_argument("--rate", type=float, default=defaults["rate"],
                   help=f"purchases per second per retailer (default {defaults['rate']:g})")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop writing after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--headless", action="store_true",
                   help="no UI; the last line of output is a JSON summary")
    p.add_argument("--faults", action="store_true",
                   help="kill -9 acme's CDC, globex's worker and the aggregator once each and "
                        "restart the broker once during --duration; roles that exit are "
                        "started again (audit.json lists what happened)")
    p.add_argument("--hostile", action="store_true",
                   help="15 %% into --duration: malformed rows in every database, garbage "
                        "and oversized records on the retailers' topics, unsigned and "
                        "untrusted config (audit.json: where each one ended)")
    p.add_argument("--days", type=int, default=defaults["days"],
                   help="days of generated purchases")
    p.add_argument("--tx-per-day", type=int, default=defaults["tx_per_day"],
                   help="purchases per retailer per generated day (sets how fast the "
                        "replayed clock runs, hence when labels come)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--partitions", type=int, default=defaults["partitions"],
                   help="partitions of each retailer's topics (default "
                        f"{defaults['partitions']:g}: the demo runs one worker a retailer)")
    p.add_argument("--report-every", type=float, default=defaults["report_every"],
                   help="seconds between status lines")
    p.add_argument("--fl-interval", type=float, default=defaults["fl_interval_s"],
                   help="fl.sync_interval_s in the signed config the demo publishes")
    p.add_argument("--ui-port", type=int, default=8501,
                   help="the UI's port (a free one if taken; default 8501)")
    p.add_argument("--root", default=".qsfraud/demo", help="the demo's folder (wiped at start)")
    p.set_defaults(func=run)


def _defaults() -> dict[str, float]:
    # the settings' defaults without importing the demo (and its heavy imports) at start-up
    return {"rate": 100.0, "days": 365, "tx_per_day": 500, "report_every": 5.0,
            "fl_interval_s": 10.0, "partitions": 1}
