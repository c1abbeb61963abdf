"""The small interface every cryptographic backend implements, and how a backend is chosen.

A backend provides ML-KEM-768 (:class:`KEM`) and ML-DSA-65 (:class:`SignatureScheme`).
Private keys are :class:`PrivateKey` objects built from a seed (the FIPS 203 / FIPS 204
private-key format): the same seed gives the same key in every backend.

>>> backend = get_backend()
>>> backend.name
'cryptography'
>>> kem = backend.kem("X25519MLKEM768")
>>> key = kem.keygen()
>>> secret, ciphertext = kem.encapsulate(key.public_key)
>>> kem.decapsulate(key, ciphertext) == secret
True
>>> "seed" in repr(key)
False
"""

from __future__ import annotations

import ctypes.util
import hashlib
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass

from pqc.errors import BackendUnavailable

ML_KEM_768 = "ML-KEM-768"
X25519_ML_KEM_768 = "X25519MLKEM768"
ML_DSA_65 = "ML-DSA-65"


class PrivateKey:
    """A private key of one algorithm: its seed, its public key and a backend-native handle.

    Its ``repr`` shows the algorithm and a short public fingerprint, never the seed.
    """

    __slots__ = ("_seed", "algorithm", "native", "public_key")

    def __init__(self, algorithm: str, seed: bytes, public_key: bytes, native: object) -> None:
        self.algorithm = algorithm
        self._seed = bytes(seed)
        self.public_key = bytes(public_key)
        self.native = native

    @property
    def seed(self) -> bytes:
        """The private seed; handle with care (it is the whole private key)."""
        return self._seed

    def __repr__(self) -> str:
        short = hashlib.sha256(self.public_key).hexdigest()[:16]
        return f"PrivateKey({self.algorithm}, public sha256 {short}...)"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("private keys are not picklable; store the seed in a key file")


class KEM(ABC):
    """A key-encapsulation mechanism: keygen, encapsulate, decapsulate."""

    algorithm: str
    seed_size: int
    public_key_size: int
    ciphertext_size: int
    shared_secret_size: int

    @abstractmethod
    def keygen(self, seed: bytes | None = None) -> PrivateKey:
        """A new key pair, random or derived from ``seed`` (``seed_size`` bytes)."""

    @abstractmethod
    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """``(shared_secret, ciphertext)`` for ``public_key``; ValueError if it is invalid."""

    @abstractmethod
    def decapsulate(self, private_key: PrivateKey, ciphertext: bytes) -> bytes:
        """The shared secret in ``ciphertext``; ValueError if it has the wrong length."""


class SignatureScheme(ABC):
    """A signature scheme with context strings: keygen, sign, verify."""

    algorithm: str
    seed_size: int
    public_key_size: int
    signature_size: int

    @abstractmethod
    def keygen(self, seed: bytes | None = None) -> PrivateKey:
        """A new key pair, random or derived from ``seed`` (``seed_size`` bytes)."""

    @abstractmethod
    def sign(self, private_key: PrivateKey, message: bytes, context: bytes) -> bytes:
        """A signature over ``message`` under ``context`` (at most 255 bytes)."""

    @abstractmethod
    def verify(self, public_key: bytes, message: bytes, signature: bytes, context: bytes) -> bool:
        """True if ``signature`` is valid; False for any invalid input, never an exception."""


def check_seed(seed: bytes | None, size: int, algorithm: str) -> bytes:
    """``seed``, or ``size`` fresh random bytes; ValueError if ``seed`` has the wrong size.

    >>> len(check_seed(None, 32, "ML-DSA-65"))
    32
    """
    if seed is None:
        return os.urandom(size)
    if len(seed) != size:
        raise ValueError(f"a {algorithm} seed is {size} bytes, got {len(seed)}")
    return bytes(seed)


@dataclass(frozen=True)
class Backend:
    """One implementation of ML-KEM-768 and ML-DSA-65 (X25519MLKEM768 is built on top)."""

    name: str
    ml_kem_768: KEM
    ml_dsa_65: SignatureScheme

    def kem(self, algorithm: str) -> KEM:
        """The KEM called ``algorithm``: ``"ML-KEM-768"`` or ``"X25519MLKEM768"``."""
        if algorithm == ML_KEM_768:
            return self.ml_kem_768
        if algorithm == X25519_ML_KEM_768:
            from pqc.hybrid_kem import X25519MLKEM768

            return X25519MLKEM768(self.ml_kem_768)
        raise ValueError(f"unknown KEM {algorithm!r}")

    def signature(self, algorithm: str) -> SignatureScheme:
        """The signature scheme called ``algorithm``: ``"ML-DSA-65"``."""
        if algorithm == ML_DSA_65:
            return self.ml_dsa_65
        raise ValueError(f"unknown signature scheme {algorithm!r}")


def find_liboqs() -> str | None:
    """The path of an installed liboqs shared library, or None.

    Looks in ``$OQS_INSTALL_PATH/lib*``, then in this Python environment's ``lib`` (where
    ``make`` builds one: ``scripts/build-liboqs``), then asks
    ``ctypes.util.find_library("oqs")``. Only when this finds a library may ``oqs``
    (liboqs-python) be imported: without one, importing it tries to download and build liboqs.
    """
    for root in (os.environ.get("OQS_INSTALL_PATH"), sys.prefix):
        path = _liboqs_under(root) if root else None
        if path is not None:
            return path
    return ctypes.util.find_library("oqs")


def liboqs_install_path(library: str) -> str | None:
    """The ``OQS_INSTALL_PATH`` under which liboqs-python finds ``library`` (None for a
    library on the system's search path)."""
    lib_dir = os.path.dirname(library)
    if os.path.basename(lib_dir) in ("lib", "lib64"):
        return os.path.dirname(lib_dir)
    return None


def _liboqs_under(root: str) -> str | None:
    for lib in ("lib", "lib64"):
        for name in ("liboqs.so", "liboqs.dylib", "oqs.dll"):
            path = os.path.join(root, lib, name)
            if os.path.isfile(path):
                return path
    return None


BACKENDS = ("cryptography", "oqs")
_loaded: dict[str, Backend] = {}


def get_backend(name: str | None = None) -> Backend:
    """The backend called ``name`` (default ``$QSFRAUD_PQC_BACKEND`` or ``"cryptography"``).

    Raises :class:`~pqc.errors.BackendUnavailable` for ``"oqs"`` when no liboqs is installed.
    """
    name = name or os.environ.get("QSFRAUD_PQC_BACKEND") or "cryptography"
    if name in _loaded:
        return _loaded[name]
    if name == "cryptography":
        from pqc.openssl_backend import openssl_backend

        backend = openssl_backend()
    elif name == "oqs":
        if find_liboqs() is None:
            raise BackendUnavailable(
                "no liboqs shared library found (set OQS_INSTALL_PATH or install liboqs)"
            )
        from pqc.oqs_backend import oqs_backend

        backend = oqs_backend()
    else:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _loaded[name] = backend
    return backend
