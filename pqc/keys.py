"""Identities, KEM keys, the registry of trusted public keys, and the key store on disk.

A key store is a directory (mode 0700) holding ``identity.json`` (the ML-DSA-65 signing
key), ``kem.json`` (the KEM keys that open envelopes) and ``registry.json`` (trusted public
keys of every party, by role). Private files are written with mode 0600 and refused on load
if group or others can read them. Private keys appear nowhere but in those files: their
``repr`` shows only a fingerprint.

Key ids are fingerprints: ``SHA-256(algorithm || 0x00 || public_key)[:16]``.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "keys")
>>> store = init_keystore(path, "aggregator", "aggregator")
>>> oct(os.stat(os.path.join(path, "identity.json")).st_mode & 0o777)
'0o600'
>>> again = load_keystore(path)
>>> again.identity.key_id == store.identity.key_id
True
>>> again.registry.current_kem_key("aggregator").key_id == store.kem.current.key_id
True
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pqc.backend import ML_DSA_65, X25519_ML_KEM_768, Backend, PrivateKey, get_backend
from pqc.errors import KeyStoreError, UnknownSender

ROLES = ("retailer", "aggregator", "admin")
SIGNATURE = "signature"
KEM_KIND = "kem"
KEY_ID_SIZE = 16
FORMAT_VERSION = 1
IDENTITY_FILE = "identity.json"
KEM_FILE = "kem.json"
REGISTRY_FILE = "registry.json"
DEFAULT_OVERLAP_S = 7 * 24 * 3600.0


def key_id(algorithm: str, public_key: bytes) -> bytes:
    """The 16-byte fingerprint of a public key.

    >>> key_id("ML-DSA-65", b"example").hex()
    '325b1d0f2aab65e87c01abe198696bfa'
    """
    return hashlib.sha256(algorithm.encode("ascii") + b"\x00" + public_key).digest()[:KEY_ID_SIZE]


def check_role(role: str) -> str:
    """``role`` if it is one of :data:`ROLES`, else ValueError."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    return role


def check_name(name: str) -> str:
    """``name`` if it is a usable party name (1-64 printable ASCII, no spaces), else ValueError.

    >>> check_name("retailer-7")
    'retailer-7'
    """
    if not (0 < len(name) <= 64 and name.isascii() and name.isprintable() and " " not in name):
        raise ValueError(f"invalid party name {name!r}: use 1-64 printable ASCII, no spaces")
    return name


@dataclass(frozen=True)
class OwnedKey:
    """A private key we hold, with when it was made and when it stops being usable."""

    private: PrivateKey
    created: float
    expires: float | None = None

    @property
    def key_id(self) -> bytes:
        return key_id(self.private.algorithm, self.private.public_key)

    def valid_at(self, now: float) -> bool:
        return self.expires is None or now < self.expires


@dataclass(frozen=True)
class Identity:
    """A party's signing identity (ML-DSA-65): the current key first, older ones after."""

    name: str
    role: str
    keys: tuple[OwnedKey, ...]
    backend: Backend

    @property
    def current(self) -> OwnedKey:
        return self.keys[0]

    @property
    def key_id(self) -> bytes:
        return self.current.key_id


@dataclass(frozen=True)
class KemKeyring:
    """The KEM keys a party opens envelopes with: the current key first (senders seal to it),
    then older keys that still open envelopes until they expire (the rotation overlap)."""

    name: str
    role: str
    keys: tuple[OwnedKey, ...]
    backend: Backend

    @property
    def current(self) -> OwnedKey:
        return self.keys[0]

    def find(self, wanted: bytes, now: float) -> OwnedKey | None:
        """The unexpired key whose id is ``wanted``, or None."""
        for key in self.keys:
            if key.key_id == wanted and key.valid_at(now):
                return key
        return None


@dataclass(frozen=True)
class TrustedKey:
    """A public key in the registry: whose it is, their role, and until when it is trusted."""

    name: str
    role: str
    kind: str
    algorithm: str
    public_key: bytes = field(repr=False)
    created: float
    expires: float | None = None

    @property
    def key_id(self) -> bytes:
        return key_id(self.algorithm, self.public_key)

    def valid_at(self, now: float) -> bool:
        return self.expires is None or now < self.expires


class Registry:
    """Trusted public keys by key id: signing keys of senders and KEM keys of recipients.

    >>> registry = Registry()
    >>> registry.sender(bytes(16), now=0.0)
    Traceback (most recent call last):
    ...
    pqc.errors.UnknownSender: no trusted signing key 00000000000000000000000000000000
    """

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._keys: dict[bytes, TrustedKey] = {}
        for key in keys:
            self.add(key)

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(sorted(self._keys.values(), key=lambda k: (k.role, k.name, k.kind, k.created)))

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: TrustedKey) -> None:
        """Trust ``key`` (replacing an entry with the same key id)."""
        self._keys[key.key_id] = key

    def trust(self, keys: Iterable[TrustedKey]) -> None:
        """Make ``keys`` the trusted keys of the party they belong to (all one party)."""
        keys = list(keys)
        names = {(k.name, k.role) for k in keys}
        if len(names) != 1:
            raise KeyStoreError("a public-key bundle must hold the keys of exactly one party")
        ((name, _role),) = names
        self._keys = {kid: k for kid, k in self._keys.items() if k.name != name}
        for key in keys:
            self.add(key)

    def sender(self, wanted: bytes, now: float) -> TrustedKey:
        """The trusted, unexpired signing key with id ``wanted``; else UnknownSender."""
        key = self._keys.get(bytes(wanted))
        if key is None or key.kind != SIGNATURE:
            raise UnknownSender(f"no trusted signing key {bytes(wanted).hex()}")
        if not key.valid_at(now):
            raise UnknownSender(f"signing key {key.key_id.hex()} of {key.name} has expired")
        return key

    def current_kem_key(self, name: str, now: float | None = None) -> TrustedKey:
        """The KEM key to seal to for party ``name``: its newest unexpired one."""
        now = time.time() if now is None else now
        keys = [k for k in self._keys.values() if k.name == name and k.kind == KEM_KIND]
        usable = [k for k in keys if k.valid_at(now)]
        if not usable:
            raise KeyStoreError(f"no trusted, unexpired KEM key for {name!r}")
        return max(usable, key=lambda k: (k.expires is None, k.created))

    def party(self, name: str) -> list[TrustedKey]:
        """Every trusted key of party ``name``."""
        return [k for k in self if k.name == name]


@dataclass(frozen=True)
class KeyStore:
    """A loaded key store directory."""

    path: Path
    identity: Identity
    kem: KemKeyring
    registry: Registry

    def public_keys(self, now: float | None = None) -> list[TrustedKey]:
        """This party's own unexpired public keys, as others should trust them."""
        now = time.time() if now is None else now
        out = []
        for kind, owned in ((SIGNATURE, self.identity.keys), (KEM_KIND, self.kem.keys)):
            for key in owned:
                if key.valid_at(now):
                    out.append(_public(self.identity.name, self.identity.role, kind, key))
        return out


def _public(name: str, role: str, kind: str, key: OwnedKey) -> TrustedKey:
    return TrustedKey(
        name, role, kind, key.private.algorithm, key.private.public_key, key.created, key.expires
    )


# ----------------------------------------------------------------------------- files


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise KeyStoreError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyStoreError(f"{what} is not valid base64") from exc


def write_private_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as JSON to ``path`` atomically, mode 0600 from the start."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _is_format_version(value: object) -> bool:
    """True for the integer :data:`FORMAT_VERSION` only (not ``1.0``, not ``true``)."""
    return type(value) is int and value == FORMAT_VERSION


def _read(path: Path, expected_format: str, private: bool) -> dict[str, Any]:
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise KeyStoreError(f"{path} does not exist (run `qsfraud keys init`)") from exc
    if private and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyStoreError(f"{path} is readable by others: chmod 600 it")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyStoreError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != expected_format:
        raise KeyStoreError(f"{path} is not a {expected_format} file")
    if not _is_format_version(document.get("version")):
        raise KeyStoreError(f"{path} has unsupported version {document.get('version')!r}")
    return document


def _time(value: object, what: str, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KeyStoreError(f"{what} must be a number of seconds since the epoch")
    return float(value)


def _owned_to_json(key: OwnedKey) -> dict[str, Any]:
    return {
        "algorithm": key.private.algorithm,
        "key_id": key.key_id.hex(),
        "seed": _b64(key.private.seed),
        "public_key": _b64(key.private.public_key),
        "created": key.created,
        "expires": key.expires,
    }


def _owned_from_json(entry: Any, kind: str, backend: Backend, where: Path) -> OwnedKey:
    if not isinstance(entry, dict):
        raise KeyStoreError(f"{where}: each key must be an object")
    algorithm = entry.get("algorithm")
    try:
        scheme = (
            backend.signature(str(algorithm)) if kind == SIGNATURE else backend.kem(str(algorithm))
        )
        private = scheme.keygen(_unb64(entry.get("seed"), "seed"))
    except ValueError as exc:
        raise KeyStoreError(f"{where}: {exc}") from exc
    if _unb64(entry.get("public_key"), "public_key") != private.public_key:
        raise KeyStoreError(f"{where}: public key does not match the seed")
    owned = OwnedKey(
        private,
        _time(entry.get("created"), "created", optional=False) or 0.0,
        _time(entry.get("expires"), "expires", optional=True),
    )
    if entry.get("key_id") != owned.key_id.hex():
        raise KeyStoreError(f"{where}: key id does not match the public key")
    return owned


def _save_private_keys(
    path: Path, name: str, role: str, kind: str, keys: Iterable[OwnedKey]
) -> None:
    write_private_json(
        path,
        {
            "format": "qsfraud-private-keys",
            "version": FORMAT_VERSION,
            "name": name,
            "role": role,
            "kind": kind,
            "keys": [_owned_to_json(k) for k in keys],
        },
    )


def _load_private_keys(
    path: Path, kind: str, backend: Backend, now: float
) -> tuple[str, str, tuple[OwnedKey, ...]]:
    document = _read(path, "qsfraud-private-keys", private=True)
    if document.get("kind") != kind:
        raise KeyStoreError(f"{path} holds {document.get('kind')!r} keys, not {kind!r}")
    try:
        name = check_name(str(document.get("name")))
        role = check_role(str(document.get("role")))
    except ValueError as exc:
        raise KeyStoreError(f"{path}: {exc}") from exc
    entries = document.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeyStoreError(f"{path} holds no keys")
    keys = [_owned_from_json(e, kind, backend, path) for e in entries]
    current, older = keys[0], [k for k in keys[1:] if k.valid_at(now)]
    return name, role, (current, *older)


def trusted_to_json(key: TrustedKey) -> dict[str, Any]:
    """The JSON object of one trusted public key (as in ``registry.json`` and bundles)."""
    return {
        "name": key.name,
        "role": key.role,
        "kind": key.kind,
        "algorithm": key.algorithm,
        "key_id": key.key_id.hex(),
        "public_key": _b64(key.public_key),
        "created": key.created,
        "expires": key.expires,
    }


def trusted_from_json(entry: Any, backend: Backend | None = None) -> TrustedKey:
    """Parse and check one trusted public key (sizes, key id); KeyStoreError if invalid."""
    backend = backend or get_backend()
    if not isinstance(entry, dict):
        raise KeyStoreError("each trusted key must be an object")
    try:
        kind = str(entry.get("kind"))
        algorithm = str(entry.get("algorithm"))
        if kind == SIGNATURE:
            size = backend.signature(algorithm).public_key_size
        elif kind == KEM_KIND:
            size = backend.kem(algorithm).public_key_size
        else:
            raise ValueError(f"unknown key kind {kind!r}")
        key = TrustedKey(
            check_name(str(entry.get("name"))),
            check_role(str(entry.get("role"))),
            kind,
            algorithm,
            _unb64(entry.get("public_key"), "public_key"),
            _time(entry.get("created"), "created", optional=False) or 0.0,
            _time(entry.get("expires"), "expires", optional=True),
        )
    except ValueError as exc:
        raise KeyStoreError(str(exc)) from exc
    if len(key.public_key) != size:
        raise KeyStoreError(f"a {algorithm} public key is {size} bytes")
    if entry.get("key_id") != key.key_id.hex():
        raise KeyStoreError(f"key id of {key.name}'s {algorithm} key does not match its public key")
    return key


def save_registry(path: str | os.PathLike[str], registry: Registry) -> None:
    """Write ``registry`` to ``path`` (JSON, mode 0600)."""
    write_private_json(
        Path(path),
        {
            "format": "qsfraud-registry",
            "version": FORMAT_VERSION,
            "keys": [trusted_to_json(k) for k in registry],
        },
    )


def load_registry(path: str | os.PathLike[str], backend: Backend | None = None) -> Registry:
    """Read a registry file written by :func:`save_registry`."""
    document = _read(Path(path), "qsfraud-registry", private=False)
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise KeyStoreError(f"{path}: 'keys' must be a list")
    return Registry(trusted_from_json(e, backend) for e in entries)


def public_bundle(store: KeyStore, now: float | None = None) -> dict[str, Any]:
    """The JSON document a party hands to others so they can ``trust`` it."""
    return {
        "format": "qsfraud-public-keys",
        "version": FORMAT_VERSION,
        "keys": [trusted_to_json(k) for k in store.public_keys(now)],
    }


def read_bundle(document: Any, backend: Backend | None = None) -> list[TrustedKey]:
    """The trusted keys in a public-key bundle (see :func:`public_bundle`)."""
    if not isinstance(document, dict) or document.get("format") != "qsfraud-public-keys":
        raise KeyStoreError("not a qsfraud-public-keys bundle")
    if not _is_format_version(document.get("version")):
        raise KeyStoreError(f"unsupported bundle version {document.get('version')!r}")
    entries = document.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeyStoreError("the bundle holds no keys")
    return [trusted_from_json(e, backend) for e in entries]


# ----------------------------------------------------------------------------- key stores


def init_keystore(
    path: str | os.PathLike[str],
    name: str,
    role: str,
    kem_algorithm: str = X25519_ML_KEM_768,
    backend: Backend | None = None,
    now: float | None = None,
) -> KeyStore:
    """Create a key store with a fresh identity and KEM key; refuses to overwrite one."""
    backend = backend or get_backend()
    now = time.time() if now is None else now
    check_name(name)
    check_role(role)
    root = Path(path)
    if (root / IDENTITY_FILE).exists() or (root / KEM_FILE).exists():
        raise KeyStoreError(f"{root} already holds keys (use `qsfraud keys rotate`)")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    identity = Identity(
        name, role, (OwnedKey(backend.signature(ML_DSA_65).keygen(), now),), backend
    )
    kem = KemKeyring(name, role, (OwnedKey(backend.kem(kem_algorithm).keygen(), now),), backend)
    registry = (
        load_registry(root / REGISTRY_FILE, backend)
        if (root / REGISTRY_FILE).exists()
        else Registry()
    )
    store = KeyStore(root, identity, kem, registry)
    registry.trust(store.public_keys(now))
    _save_store(store)
    return store


def load_keystore(
    path: str | os.PathLike[str], backend: Backend | None = None, now: float | None = None,
    role: str | None = None,
) -> KeyStore:
    """Load the key store at ``path``; expired older keys are left out. With ``role``, a store
    of another role is refused with KeyStoreError."""
    backend = backend or get_backend()
    now = time.time() if now is None else now
    root = Path(path)
    name, own_role, signing = _load_private_keys(root / IDENTITY_FILE, SIGNATURE, backend, now)
    kem_name, kem_role, kems = _load_private_keys(root / KEM_FILE, KEM_KIND, backend, now)
    if (kem_name, kem_role) != (name, own_role):
        raise KeyStoreError(f"{root}: identity and KEM keys belong to different parties")
    if role is not None and own_role != role:
        raise KeyStoreError(f"{root}: {name} is {_a(own_role)}, not {_a(role)}")
    registry_path = root / REGISTRY_FILE
    registry = load_registry(registry_path, backend) if registry_path.exists() else Registry()
    return KeyStore(
        root,
        Identity(name, own_role, signing, backend),
        KemKeyring(name, own_role, kems, backend),
        registry,
    )


def _a(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"


def save_store_registry(store: KeyStore) -> None:
    """Write the store's registry back to ``registry.json``."""
    save_registry(store.path / REGISTRY_FILE, store.registry)


def _save_store(store: KeyStore) -> None:
    identity, kem = store.identity, store.kem
    _save_private_keys(
        store.path / IDENTITY_FILE, identity.name, identity.role, SIGNATURE, identity.keys
    )
    _save_private_keys(store.path / KEM_FILE, kem.name, kem.role, KEM_KIND, kem.keys)
    save_store_registry(store)


def rotate_keystore(
    path: str | os.PathLike[str],
    overlap_s: float = DEFAULT_OVERLAP_S,
    backend: Backend | None = None,
    now: float | None = None,
) -> KeyStore:
    """New identity and KEM keys; the old ones stay valid for ``overlap_s`` seconds.

    During the overlap the new KEM key is the one senders seal to, the old one still opens
    envelopes sealed to it, and verifiers that trusted the new bundle accept both signing keys.
    """
    backend = backend or get_backend()
    now = time.time() if now is None else now
    store = load_keystore(path, backend, now)
    until = now + overlap_s

    def rotated(keys: tuple[OwnedKey, ...], fresh: PrivateKey) -> tuple[OwnedKey, ...]:
        older = [replace(k, expires=min(k.expires or until, until)) for k in keys]
        return (OwnedKey(fresh, now), *[k for k in older if k.valid_at(now)])

    identity = replace(
        store.identity,
        keys=rotated(store.identity.keys, backend.signature(ML_DSA_65).keygen()),
    )
    kem_algorithm = store.kem.current.private.algorithm
    kem = replace(store.kem, keys=rotated(store.kem.keys, backend.kem(kem_algorithm).keygen()))
    new = KeyStore(store.path, identity, kem, store.registry)
    new.registry.trust(new.public_keys(now))
    _save_store(new)
    return new
