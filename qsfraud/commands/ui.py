"""``qsfraud ui``: the Streamlit app for analysts and admins (default http://127.0.0.1:8501).

Becomes ``streamlit run ui/app.py`` (exec) with the settings passed in the environment (see
:mod:`ui.runtime`); it stops with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qsfraud.cli import CommandError
from qsfraud.commands.worker import default_bootstrap


def app_path() -> Path:
    import ui

    return Path(ui.__file__).resolve().parent / "app.py"


def streamlit_command(args: argparse.Namespace) -> list[str]:
    # runner.postScriptGC: streamlit runs a full garbage collection after every script run;
    # the live pages rerun every second over tens of thousands of decisions in memory, and
    # with one browser on the feed those collections took the UI from 5 % of a core to 30 %
    # (holding the GIL, so the Kafka reader waited too). Python's own collector still runs.
    return [sys.executable, "-m", "streamlit", "run", str(app_path()),
            "--server.port", str(args.port), "--server.address", args.host,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
            "--runner.postScriptGC", "false"]


def environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["QSFRAUD_BOOTSTRAP"] = default_bootstrap(args.bootstrap)
    if args.retailers:
        env["QSFRAUD_UI_RETAILERS"] = args.retailers
    if args.metrics:
        env["QSFRAUD_WORKER_METRICS"] = ",".join(args.metrics)
    if args.admin_keys:
        env["QSFRAUD_ADMIN_KEYS"] = args.admin_keys
    if args.trust:
        env["QSFRAUD_CONFIG_TRUST"] = args.trust
    return env


def run(args: argparse.Namespace) -> int:
    env = environment(args)
    print(f"qsfraud ui: http://{args.host}:{args.port} (Kafka {env['QSFRAUD_BOOTSTRAP']}"
          + (", admin" if env.get("QSFRAUD_ADMIN_KEYS") else ", analyst") + ")", flush=True)
    command = streamlit_command(args)
    try:  # become streamlit: signals (Ctrl-C, a supervisor's SIGTERM) reach it directly
        os.execve(command[0], command, env)
    except OSError as exc:
        raise CommandError(f"cannot start streamlit: {exc}") from None
    return 0  # not reached


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ui", help="the web app: live feed, review queue, charts, admin")
    p.add_argument("--port", type=int, default=8501, help="HTTP port (default 8501)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: stack.json)")
    p.add_argument("--retailers", help="comma list of retailers to show (default: every one)")
    p.add_argument("--metrics", action="append", metavar="HOST:PORT",
                   help="a worker's /metrics address (repeat; default QSFRAUD_WORKER_METRICS)")
    p.add_argument("--admin-keys", default=os.environ.get("QSFRAUD_ADMIN_KEYS"),
                   help="admin key store: without it the UI cannot change config "
                        "(default QSFRAUD_ADMIN_KEYS)")
    p.add_argument("--trust", help="registry of trusted admin keys (default "
                                   "QSFRAUD_CONFIG_TRUST, else the admin key store's)")
    p.set_defaults(func=run)
