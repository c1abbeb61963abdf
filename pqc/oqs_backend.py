"""The liboqs backend, through liboqs-python (``oqs``); used only when liboqs is installed.

Import this module only after :func:`pqc.backend.find_liboqs` found a library (importing
``oqs`` without one makes it try to download and build liboqs). liboqs-python derives ML-KEM
keys from a seed (``generate_keypair_seed``, liboqs-python >= 0.14) but not ML-DSA keys, so
ML-DSA-65 seeds are expanded to the FIPS 204 secret key with ``dilithium-py`` once per key.
``make`` builds a library into the venv (``scripts/build-liboqs``): ML-DSA-65 signs ~6x faster
there than in OpenSSL (AVX2 code).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from pqc.backend import (
    KEM,
    ML_DSA_65,
    ML_KEM_768,
    Backend,
    PrivateKey,
    SignatureScheme,
    check_seed,
    find_liboqs,
    liboqs_install_path,
)
from pqc.errors import BackendUnavailable


def _oqs() -> Any:
    library = find_liboqs()
    if library is None:
        raise BackendUnavailable("no liboqs shared library found")
    root = liboqs_install_path(library)
    if root is not None:
        os.environ["OQS_INSTALL_PATH"] = root  # where liboqs-python looks: the same library
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # its import logs to stdout through a handler of its own
    try:
        with warnings.catch_warnings():
            # scripts/build-liboqs builds 0.13 with the one 0.14 function liboqs-python needs
            warnings.filterwarnings("ignore", "liboqs version", UserWarning)
            import oqs  # type: ignore[import-not-found,unused-ignore]
    except (ImportError, RuntimeError, OSError) as exc:
        raise BackendUnavailable(f"liboqs-python is not usable: {exc}") from exc
    finally:
        logging.disable(previous)
    own = logging.getLogger("oqs.oqs")  # its later records go where the application's go
    for handler in list(own.handlers):
        own.removeHandler(handler)
    own.setLevel(logging.NOTSET)
    return oqs


class OqsMLKEM768(KEM):
    """ML-KEM-768 from liboqs."""

    algorithm = ML_KEM_768
    seed_size = 64
    public_key_size = 1184
    ciphertext_size = 1088
    shared_secret_size = 32

    def __init__(self) -> None:
        self.oqs = _oqs()

    def keygen(self, seed: bytes | None = None) -> PrivateKey:
        seed = check_seed(seed, self.seed_size, self.algorithm)
        native = self.oqs.KeyEncapsulation(self.algorithm)
        public = native.generate_keypair_seed(seed)
        return PrivateKey(self.algorithm, seed, public, native)

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        # liboqs-python zero-pads a short public key: check the length here.
        if len(public_key) != self.public_key_size:
            raise ValueError(f"an ML-KEM-768 public key is {self.public_key_size} bytes")
        with self.oqs.KeyEncapsulation(self.algorithm) as kem:
            ciphertext, secret = kem.encap_secret(bytes(public_key))
        return bytes(secret), bytes(ciphertext)

    def decapsulate(self, private_key: PrivateKey, ciphertext: bytes) -> bytes:
        if len(ciphertext) != self.ciphertext_size:
            raise ValueError(f"an ML-KEM-768 ciphertext is {self.ciphertext_size} bytes")
        native: Any = private_key.native
        return bytes(native.decap_secret(bytes(ciphertext)))


class OqsMLDSA65(SignatureScheme):
    """ML-DSA-65 from liboqs (pure, with context strings)."""

    algorithm = ML_DSA_65
    seed_size = 32
    public_key_size = 1952
    signature_size = 3309

    def __init__(self) -> None:
        self.oqs = _oqs()

    def keygen(self, seed: bytes | None = None) -> PrivateKey:
        seed = check_seed(seed, self.seed_size, self.algorithm)
        try:
            from dilithium_py.ml_dsa import ML_DSA_65 as reference
        except ImportError as exc:
            raise BackendUnavailable(
                "the oqs backend expands ML-DSA seeds with dilithium-py, which is not installed"
            ) from exc
        public, secret = reference.key_derive(seed)
        native = self.oqs.Signature(self.algorithm, secret)
        return PrivateKey(self.algorithm, seed, public, native)

    def sign(self, private_key: PrivateKey, message: bytes, context: bytes) -> bytes:
        native: Any = private_key.native
        return bytes(native.sign_with_ctx_str(bytes(message), bytes(context)))

    def verify(self, public_key: bytes, message: bytes, signature: bytes, context: bytes) -> bool:
        if (
            len(public_key) != self.public_key_size
            or len(signature) != self.signature_size
            or len(context) > 255
        ):
            return False
        with self.oqs.Signature(self.algorithm) as scheme:
            return bool(
                scheme.verify_with_ctx_str(
                    bytes(message), bytes(signature), bytes(context), bytes(public_key)
                )
            )


def oqs_backend() -> Backend:
    """The liboqs backend; BackendUnavailable if liboqs or liboqs-python is missing."""
    return Backend("oqs", OqsMLKEM768(), OqsMLDSA65())
