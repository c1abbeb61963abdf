"""``qsfraud cdc run --config FILE``: stream one database table into Kafka, exactly once."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from cdc.config import CdcConfig
from cdc.mapping import ConfigError
from cdc.pipeline import CdcPipeline
from cdc.source import SourceError
from qsfraud.cli import CommandError


def run(args: argparse.Namespace) -> int:
    try:
        config = CdcConfig.load(Path(args.config))
        if args.metrics_interval is not None:
            config.metrics_interval_s = args.metrics_interval
        pipeline = CdcPipeline(config)
    except (ConfigError, SourceError) as exc:
        raise CommandError(str(exc)) from None

    def graceful(signum: int, frame: FrameType | None) -> None:
        print(f"qsfraud cdc: {signal.Signals(signum).name}: committing and stopping",
              file=sys.stderr, flush=True)
        pipeline.stop()

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    try:
        return pipeline.run()
    except SourceError as exc:
        raise CommandError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cdc", help="change data capture: MySQL binlog / MongoDB change streams "
                                   "into Kafka")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = actions.add_parser("run", help="snapshot then stream one source (stops on SIGTERM/SIGINT)")
    r.add_argument("--config", required=True, help="TOML (or YAML) file, see examples/cdc/")
    r.add_argument("--metrics-interval", type=float, default=None,
                   help="seconds between metrics lines on stderr (default: config or 10)")
    r.set_defaults(func=run)
