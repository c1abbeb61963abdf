"""``qsfraud demo``: the whole pipeline on a stack of its own, until Ctrl-C (or --duration)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qsfraud.cli import CommandError
from qsfraud.stack import StackError


def run(args: argparse.Namespace) -> int:
    from qsfraud.demo import Demo, DemoError, DemoSettings

    settings = DemoSettings(root=Path(args.root), rate=args.rate, duration=args.duration,
                            days=args.days, tx_per_day=args.tx_per_day, seed=args.seed)
    try:
        return Demo(settings).run()
    except (DemoError, StackError) as exc:
        raise CommandError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on its own local stack")
    p.add_argument("--rate", type=float, default=200.0, help="purchases per second (default 200)")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--days", type=int, default=30, help="days of generated purchases")
    p.add_argument("--tx-per-day", type=int, default=1500, help="purchases per retailer per day")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--root", default=".qsfraud/demo", help="the demo's folder (wiped at start)")
    p.set_defaults(func=run)
