"""``qsfraud bench NAME``: run ``bench/NAME.py``; its last printed line is a JSON object."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from qsfraud.cli import CommandError

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def run(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"{args.name}.py"
    if not script.is_file():
        raise CommandError(f"no benchmark {args.name!r}; available: {', '.join(available())}")
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (last line: JSON figures)")
    p.add_argument("name", help="benchmark name, e.g. core, pqc, cdc, streams, state, fl, api")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    p.set_defaults(func=run)
