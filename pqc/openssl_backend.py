"""The default backend: ML-KEM-768 and ML-DSA-65 from OpenSSL through ``cryptography`` >= 50.

>>> scheme = openssl_backend().ml_dsa_65
>>> key = scheme.keygen(bytes(32))
>>> signature = scheme.sign(key, b"message", b"qsfraud/v1/doctest")
>>> scheme.verify(key.public_key, b"message", signature, b"qsfraud/v1/doctest")
True
>>> scheme.verify(key.public_key, b"message", signature, b"qsfraud/v1/other")
False
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from pqc.backend import KEM, ML_DSA_65, ML_KEM_768, Backend, PrivateKey, SignatureScheme, check_seed


class OpenSSLMLKEM768(KEM):
    """ML-KEM-768 (FIPS 203) from OpenSSL."""

    algorithm = ML_KEM_768
    seed_size = 64
    public_key_size = 1184
    ciphertext_size = 1088
    shared_secret_size = 32

    def keygen(self, seed: bytes | None = None) -> PrivateKey:
        seed = check_seed(seed, self.seed_size, self.algorithm)
        native = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
        return PrivateKey(self.algorithm, seed, native.public_key().public_bytes_raw(), native)

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        return _mlkem_public(bytes(public_key)).encapsulate()

    def decapsulate(self, private_key: PrivateKey, ciphertext: bytes) -> bytes:
        if not isinstance(private_key.native, mlkem.MLKEM768PrivateKey):
            raise ValueError("not an OpenSSL ML-KEM-768 private key")
        if len(ciphertext) != self.ciphertext_size:
            raise ValueError(f"an ML-KEM-768 ciphertext is {self.ciphertext_size} bytes")
        return private_key.native.decapsulate(ciphertext)


class OpenSSLMLDSA65(SignatureScheme):
    """ML-DSA-65 (FIPS 204, pure, hedged signing) from OpenSSL."""

    algorithm = ML_DSA_65
    seed_size = 32
    public_key_size = 1952
    signature_size = 3309

    def keygen(self, seed: bytes | None = None) -> PrivateKey:
        seed = check_seed(seed, self.seed_size, self.algorithm)
        native = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
        return PrivateKey(self.algorithm, seed, native.public_key().public_bytes_raw(), native)

    def sign(self, private_key: PrivateKey, message: bytes, context: bytes) -> bytes:
        if not isinstance(private_key.native, mldsa.MLDSA65PrivateKey):
            raise ValueError("not an OpenSSL ML-DSA-65 private key")
        return private_key.native.sign(message, context)

    def verify(self, public_key: bytes, message: bytes, signature: bytes, context: bytes) -> bool:
        if len(signature) != self.signature_size or len(context) > 255:
            return False
        try:
            _mldsa_public(bytes(public_key)).verify(signature, message, context)
        except (InvalidSignature, ValueError):
            return False
        return True


@lru_cache(maxsize=256)
def _mlkem_public(public_key: bytes) -> mlkem.MLKEM768PublicKey:
    return mlkem.MLKEM768PublicKey.from_public_bytes(public_key)


@lru_cache(maxsize=256)
def _mldsa_public(public_key: bytes) -> mldsa.MLDSA65PublicKey:
    return mldsa.MLDSA65PublicKey.from_public_bytes(public_key)


def openssl_backend() -> Backend:
    """The ``cryptography`` (OpenSSL) backend."""
    return Backend("cryptography", OpenSSLMLKEM768(), OpenSSLMLDSA65())
