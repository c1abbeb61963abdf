"""``qsfraud stack up | down | status``: the local stack of real services."""

from __future__ import annotations

import argparse
import json
import time

from qsfraud.cli import CommandError
from qsfraud.stack import Stack, StackConfig, StackError


def _stack() -> Stack:
    try:
        return Stack(StackConfig.load())
    except StackError as exc:
        raise CommandError(str(exc)) from None


def up(args: argparse.Namespace) -> int:
    stack = _stack()
    t0 = time.monotonic()
    try:
        for service in stack.select(args.services):
            t = time.monotonic()
            started = stack.up([service.name])[service.name]
            verb = "started" if started else "already running"
            where = ", ".join(f"{k}={v}" for k, v in service.endpoint().items()
                              if "password" not in k)
            print(f"{service.name:8} {verb} in {time.monotonic() - t:5.1f} s  {where}", flush=True)
    except StackError as exc:
        raise CommandError(str(exc)) from None
    print(f"stack ready in {time.monotonic() - t0:.1f} s; endpoints in {stack.endpoints_file}")
    return 0


def down(args: argparse.Namespace) -> int:
    try:
        stopped = _stack().down(args.services)
    except StackError as exc:
        raise CommandError(str(exc)) from None
    for name, was_running in stopped.items():
        print(f"{name:8} {'stopped' if was_running else 'was not running'}")
    return 0


def status(args: argparse.Namespace) -> int:
    stack = _stack()
    try:
        health = stack.status(args.services)
    except StackError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(json.dumps({"healthy": health, "endpoints": stack.endpoints()}))
    else:
        for name, ok in health.items():
            pid = stack.services[name].running_pid()
            print(f"{name:8} {'healthy' if ok else 'NOT healthy'}"
                  f"{f' (pid {pid})' if pid else ' (not running)'}")
    return 0 if all(health.values()) else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stack", help="start, stop or check the local Kafka/MariaDB/MongoDB stack")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, func, text in (("up", up, "start the services (idempotent) and wait until ready"),
                             ("down", down, "stop the services this stack started"),
                             ("status", status, "exit 0 only when every service is healthy")):
        a = actions.add_parser(name, help=text)
        a.add_argument("services", nargs="*", help="kafka, mariadb, mongo (default: all)")
        if name == "status":
            a.add_argument("--json", action="store_true", help="machine-readable output")
        a.set_defaults(func=func)
