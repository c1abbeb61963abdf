"""``qsfraud config show | set KEY=VALUE... | history``: the signed live configuration.

``set`` starts from the configuration now in effect for the scope, applies the changes,
validates, signs with the admin identity of ``--keys`` (``qsfraud keys init --role admin``)
and publishes it on the compacted config topic, keyed by scope. ``show``/``history`` verify
every record with the registry of ``--trust``, as workers do.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from qsfraud.cli import CommandError
from qsfraud.commands.worker import default_bootstrap
from streams.settings import CONFIG_TOPIC, DEFAULT_ADMIN_KEYS, DEFAULT_TRUST_REGISTRY

if TYPE_CHECKING:
    from streams.config_history import ConfigReplay


def _registry(path: str) -> Any:
    from pqc import PqcError
    from pqc.keys import load_registry

    try:
        return load_registry(path)
    except (OSError, PqcError) as exc:
        raise CommandError(f"cannot load the trust registry {path}: {exc}") from None


def _replay(args: argparse.Namespace, scope: str) -> ConfigReplay:
    """The config topic replayed for ``scope`` (see :mod:`streams.config_history`)."""
    from streams.config_history import read_config_records, replay

    registry = _registry(args.trust)
    bootstrap = default_bootstrap(args.bootstrap)
    try:
        records = read_config_records(bootstrap, args.topic)
    except Exception as exc:  # Kafka unreachable, timeouts
        raise CommandError(f"cannot read {args.topic} at {bootstrap}: {exc}") from None
    return replay(records, scope, registry)


def show(args: argparse.Namespace) -> int:
    current = _replay(args, args.scope).current
    if args.json:
        print(json.dumps(current.to_dict(), indent=2, sort_keys=True))
    else:
        print(current.summary() + (f" signed by {current.issued_by}" if current.issued_by else
                                   " (built-in defaults: no signed config yet)"))
        print(json.dumps(current.to_dict()["policy"], indent=2, sort_keys=True))
    return 0


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_(args: argparse.Namespace) -> int:
    from confluent_kafka import Producer

    from fraud.schema import SchemaError
    from pqc import PqcError
    from pqc.keys import load_keystore
    from streams.config_stream import sign_config

    changes = {}
    for item in args.assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"expected KEY=VALUE, got {item!r}")
        changes[key.strip()] = _parse_value(value)
    try:
        store = load_keystore(args.keys, role="admin")
    except (OSError, PqcError) as exc:
        raise CommandError(f"cannot load the admin key store {args.keys}: {exc}") from None
    replayed = _replay(args, args.scope)
    try:
        doc = replayed.current.updated(changes, version=replayed.next_version, scope=args.scope,
                              issued_by=store.identity.name)
    except SchemaError as exc:
        raise CommandError(f"invalid config: {exc}") from None
    blob = sign_config(doc, store.identity)
    producer = Producer({"bootstrap.servers": default_bootstrap(args.bootstrap)})
    producer.produce(args.topic, key=args.scope.encode(), value=blob)
    if producer.flush(30):
        raise CommandError(f"could not publish to {args.topic}")
    print(f"published {doc.summary()} signed by {store.identity.name}")
    return 0


def history(args: argparse.Namespace) -> int:
    entries = _replay(args, args.scope).entries
    if not entries:
        print(f"{args.topic} is empty")
    for entry in entries:
        offset, key, outcome = entry.offset, entry.key, entry.outcome
        doc = outcome.document
        what = doc.summary() if doc is not None else f"v{outcome.version or '?'}"
        signer = f" by {outcome.signer}" if outcome.signer else ""
        note = f" ({outcome.reason}: {outcome.error})" if outcome.status == "rejected" else ""
        if outcome.status == "ignored":
            note = f" (scope {key}, not {args.scope})"
        print(f"@{offset:<6} key={key:<12} {outcome.status:<8} {what}{signer}{note}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="show, set or list the signed live configuration")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        q = actions.add_parser(name, help=text)
        q.add_argument("--bootstrap", help="Kafka bootstrap servers (default: stack.json)")
        q.add_argument("--topic", default=CONFIG_TOPIC)
        q.add_argument("--scope", default="*", help="'*' (every retailer) or a retailer id")
        q.add_argument("--trust", default=os.environ.get("QSFRAUD_CONFIG_TRUST",
                                                         str(DEFAULT_TRUST_REGISTRY)),
                       help=f"trusted admin keys (default {DEFAULT_TRUST_REGISTRY})")
        return q

    q = add("show", "the configuration in effect for --scope")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=show)
    q = add("set", "sign and publish a new version with KEY=VALUE changes")
    q.add_argument("assignments", nargs="+", metavar="KEY=VALUE",
                   help="e.g. thresholds.verify=0.6 fl.sync_interval_s=60 "
                        "'rules=[{\"name\":\"big\",\"field\":\"amount\",\"op\":\">\","
                        "\"value\":5000,\"action\":\"hold\"}]' (values are JSON, else text)")
    q.add_argument("--keys", default=os.environ.get("QSFRAUD_ADMIN_KEYS",
                                                    str(DEFAULT_ADMIN_KEYS)),
                   help=f"admin key store (default {DEFAULT_ADMIN_KEYS})")
    q.set_defaults(func=set_)
    q = add("history", "every record on the config topic, verified")
    q.set_defaults(func=history)

