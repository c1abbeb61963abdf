"""``qsfraud keys init | show | trust | rotate``: the quantum-safe key store of one party.

A key store directory holds ``identity.json`` (ML-DSA-65 signing key), ``kem.json`` (KEM keys
that open envelopes) and ``registry.json`` (trusted public keys of the other parties). Nothing
here prints private material: ``show`` prints public fingerprints only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pqc.backend import ML_KEM_768, X25519_ML_KEM_768, get_backend
from pqc.errors import PqcError
from pqc.keys import (
    DEFAULT_OVERLAP_S,
    ROLES,
    KeyStore,
    TrustedKey,
    init_keystore,
    load_keystore,
    public_bundle,
    read_bundle,
    rotate_keystore,
    save_store_registry,
)
from qsfraud.cli import CommandError

DEFAULT_DIR = os.environ.get("QSFRAUD_KEYS", ".qsfraud/keys")


def _describe(key: TrustedKey, now: float) -> str:
    if key.expires is None:
        state = "current"
    elif key.valid_at(now):
        state = f"expires {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(key.expires))}"
    else:
        state = "expired"
    return f"  {key.kind:<9} {key.algorithm:<14} {key.key_id.hex()}  {state}"


def _print_store(store: KeyStore, now: float) -> None:
    print(f"{store.identity.name} ({store.identity.role}) in {store.path}")
    for key in store.public_keys(now):
        print(_describe(key, now))
    others = [k for k in store.registry if k.name != store.identity.name]
    print(f"trusted keys of other parties: {len(others)}")
    for key in others:
        print(f"  {key.role:<10} {key.name:<20}" + _describe(key, now).lstrip())


def init(args: argparse.Namespace) -> int:
    try:
        store = init_keystore(args.dir, args.name, args.role, args.kem, get_backend(args.backend))
    except (PqcError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    _print_store(store, time.time())
    print("next: `qsfraud keys show --export FILE` and hand FILE to the other parties")
    return 0


def show(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        store = load_keystore(args.dir, get_backend(args.backend), now)
    except PqcError as exc:
        raise CommandError(str(exc)) from exc
    if args.export is None:
        _print_store(store, now)
        return 0
    text = json.dumps(public_bundle(store, now), indent=2, sort_keys=True) + "\n"
    if args.export == "-":
        sys.stdout.write(text)
    else:
        Path(args.export).write_text(text, encoding="utf-8")
        print(f"public keys of {store.identity.name} written to {args.export}")
    return 0


def trust(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        backend = get_backend(args.backend)
        store = load_keystore(args.dir, backend, now)
        try:
            document = json.loads(Path(args.bundle).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CommandError(f"cannot read {args.bundle}: {exc}") from exc
        keys = read_bundle(document, backend)
        if args.fingerprint is not None:
            ids = {k.key_id.hex() for k in keys if k.kind == "signature" and k.expires is None}
            if args.fingerprint.lower() not in ids:
                raise CommandError(
                    "the bundle's current signing key does not have fingerprint "
                    f"{args.fingerprint}: refusing to trust it"
                )
        if keys[0].name == store.identity.name:
            raise CommandError("that bundle is this key store's own; nothing to trust")
        store.registry.trust(keys)
        save_store_registry(store)
    except PqcError as exc:
        raise CommandError(str(exc)) from exc
    print(f"trusted {keys[0].name} ({keys[0].role}):")
    for key in keys:
        print(_describe(key, now))
    return 0


def rotate(args: argparse.Namespace) -> int:
    if args.overlap_hours < 0:
        raise CommandError("--overlap-hours must not be negative")
    try:
        store = rotate_keystore(args.dir, args.overlap_hours * 3600.0, get_backend(args.backend))
    except PqcError as exc:
        raise CommandError(str(exc)) from exc
    _print_store(store, time.time())
    print(
        f"old keys stay valid for {args.overlap_hours:g} h: export the new bundle "
        "(`qsfraud keys show --export FILE`) and have every party `trust` it before then"
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="quantum-safe identities, KEM keys and trusted registry")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        q = actions.add_parser(name, help=help_text)
        q.add_argument("--dir", default=DEFAULT_DIR, help=f"key store (default {DEFAULT_DIR})")
        q.add_argument("--backend", choices=["cryptography", "oqs"], default=None)
        return q

    q = add("init", "create this party's identity and KEM key")
    q.add_argument("--name", required=True, help="party name, e.g. retailer-7")
    q.add_argument("--role", required=True, choices=ROLES)
    q.add_argument("--kem", choices=[X25519_ML_KEM_768, ML_KEM_768], default=X25519_ML_KEM_768)
    q.set_defaults(func=init)

    q = add("show", "print public fingerprints, or export the public-key bundle")
    q.add_argument("--export", metavar="FILE", help="write the public bundle ('-': stdout)")
    q.set_defaults(func=show)

    q = add("trust", "trust another party's public-key bundle (replaces its older entry)")
    q.add_argument("bundle", help="a file written by `qsfraud keys show --export`")
    q.add_argument("--fingerprint", help="expected signing key id, checked out of band")
    q.set_defaults(func=trust)

    q = add("rotate", "new keys; old ones keep opening/verifying during the overlap")
    q.add_argument(
        "--overlap-hours", type=float, default=DEFAULT_OVERLAP_S / 3600.0, help="default 168"
    )
    q.set_defaults(func=rotate)
