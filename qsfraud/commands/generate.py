"""``qsfraud generate``: synthetic multi-retailer transactions with fraud scenarios."""

from __future__ import annotations

import argparse
import sys
import time

from fraud.generator import GeneratorConfig, generate, write_rows
from qsfraud.cli import CommandError


def run(args: argparse.Namespace) -> int:
    if not str(args.out).lower().endswith((".csv", ".jsonl")):
        raise CommandError(f"--out must end in .csv or .jsonl, got {args.out!r}")
    for name in ("retailers", "days", "tx_per_day"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1")
    cfg = GeneratorConfig(retailers=args.retailers, days=args.days, seed=args.seed,
                          tx_per_day=args.tx_per_day, fraud_scale=args.fraud_scale)
    started = time.perf_counter()
    try:
        n = write_rows(generate(cfg), args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {n} rows to {args.out} in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generate", help="write synthetic retailer transactions (CSV or JSONL)")
    p.add_argument("--retailers", type=int, default=3, help="number of retailers (default 3)")
    p.add_argument("--days", type=int, default=60, help="days of traffic (default 60)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.add_argument("--tx-per-day", type=int, default=1000,
                   help="legitimate transactions per retailer per day (default 1000)")
    p.add_argument("--fraud-scale", type=float, default=1.0,
                   help="multiply the rate of fraud campaigns (default 1)")
    p.add_argument("--out", required=True, help="output file, .csv or .jsonl")
    p.set_defaults(func=run)
