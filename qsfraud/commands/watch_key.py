"""``qsfraud watch-key --admin DIR NAME=FILE ...``: a new consortium key for the federated
watchlist, sealed to each named retailer (fl/README.md, "Cross-retailer watchlist").

Each retailer's copy is encrypted to its KEM key as the admin's registry trusts it and signed
by the admin, so neither the aggregator nor another retailer can open it. Writing it to
``<retailer key store>/watch-key.sealed`` turns the watchlist on in that retailer's worker
without a flag. Running the command again rotates the key: every retailer needs its new copy,
and the old list no longer matches anything.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from fl.watchlist import new_key, seal_watch_key
from pqc.errors import PqcError
from pqc.keys import load_keystore
from qsfraud.cli import CommandError


def _target(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise CommandError(f"{spec!r}: expected NAME=FILE (the retailer and where its copy goes)")
    return name, Path(path)


def run(args: argparse.Namespace) -> int:
    targets = [_target(spec) for spec in args.copies]
    try:
        admin = load_keystore(args.admin, role="admin")
    except (PqcError, OSError) as exc:
        raise CommandError(f"cannot load the admin key store {args.admin}: {exc}") from None
    recipients = []
    for name, path in targets:
        roles = {k.role for k in admin.registry.party(name)}
        if roles != {"retailer"}:
            raise CommandError(f"{name}: the admin's registry does not trust it as a retailer")
        try:
            recipients.append((name, path, admin.registry.current_kem_key(name)))
        except PqcError as exc:
            raise CommandError(f"{name}: {exc}") from None
    key = new_key()
    sequence = time.time_ns()
    for i, (name, path, kem) in enumerate(recipients):
        blob = seal_watch_key(key, admin.identity, kem, sequence + i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        print(f"{name}: consortium key sealed to {path}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("watch-key", help="federated watchlist: a new consortium key, sealed by "
                                         "an admin to each retailer")
    p.add_argument("--admin", required=True, help="the admin's key store (qsfraud keys init "
                                                  "--role admin); its registry must trust "
                                                  "each retailer")
    p.add_argument("copies", nargs="+", metavar="NAME=FILE",
                   help="a retailer and where its sealed copy goes (<its key store>/"
                        "watch-key.sealed turns the watchlist on in its worker)")
    p.set_defaults(func=run)
