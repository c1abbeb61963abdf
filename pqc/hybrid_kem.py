"""X25519MLKEM768: ML-KEM-768 and X25519 together, as TLS 1.3's hybrid group of that name.

Byte order follows TLS (ML-KEM first): public key ``mlkem_pk || x25519_pk`` (1,216 B),
ciphertext ``mlkem_ct || x25519_ephemeral_pk`` (1,120 B), shared secret
``mlkem_ss || x25519_ss`` (64 B, to be fed to a KDF), seed ``mlkem_seed || x25519_private``
(96 B). The secret stays safe while either ML-KEM-768 or X25519 stands. An X25519 exchange
whose result is all zero (a low-order peer key) raises ValueError on both sides.

>>> from pqc.openssl_backend import OpenSSLMLKEM768
>>> kem = X25519MLKEM768(OpenSSLMLKEM768())
>>> key = kem.keygen(bytes(96))
>>> len(key.public_key), kem.ciphertext_size, kem.shared_secret_size
(1216, 1120, 64)
>>> secret, ciphertext = kem.encapsulate(key.public_key)
>>> kem.decapsulate(key, ciphertext) == secret
True
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import x25519

from pqc.backend import KEM, X25519_ML_KEM_768, PrivateKey, check_seed

X25519_SIZE = 32


class X25519MLKEM768(KEM):
    """The hybrid KEM over any ML-KEM-768 implementation (X25519 always from OpenSSL)."""

    algorithm = X25519_ML_KEM_768

    def __init__(self, ml_kem_768: KEM) -> None:
        self.ml_kem = ml_kem_768
        self.seed_size = ml_kem_768.seed_size + X25519_SIZE
        self.public_key_size = ml_kem_768.public_key_size + X25519_SIZE
        self.ciphertext_size = ml_kem_768.ciphertext_size + X25519_SIZE
        self.shared_secret_size = ml_kem_768.shared_secret_size + X25519_SIZE

    def keygen(self, seed: bytes | None = None) -> PrivateKey:
        seed = check_seed(seed, self.seed_size, self.algorithm)
        split = self.ml_kem.seed_size
        pq = self.ml_kem.keygen(seed[:split])
        classic = x25519.X25519PrivateKey.from_private_bytes(seed[split:])
        public = pq.public_key + classic.public_key().public_bytes_raw()
        return PrivateKey(self.algorithm, seed, public, (pq, classic))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        if len(public_key) != self.public_key_size:
            raise ValueError(f"an {self.algorithm} public key is {self.public_key_size} bytes")
        split = self.ml_kem.public_key_size
        pq_secret, pq_ciphertext = self.ml_kem.encapsulate(public_key[:split])
        peer = x25519.X25519PublicKey.from_public_bytes(public_key[split:])
        ephemeral = self._ephemeral()
        classic_secret = ephemeral.exchange(peer)  # ValueError if all zero (low-order point)
        ciphertext = pq_ciphertext + ephemeral.public_key().public_bytes_raw()
        return pq_secret + classic_secret, ciphertext

    def _ephemeral(self) -> x25519.X25519PrivateKey:
        """A fresh ephemeral X25519 key (the test vectors' subclass fixes it instead)."""
        return x25519.X25519PrivateKey.generate()

    def decapsulate(self, private_key: PrivateKey, ciphertext: bytes) -> bytes:
        if len(ciphertext) != self.ciphertext_size:
            raise ValueError(f"an {self.algorithm} ciphertext is {self.ciphertext_size} bytes")
        native = private_key.native
        if not (isinstance(native, tuple) and len(native) == 2):
            raise ValueError(f"not an {self.algorithm} private key")
        pq, classic = native
        split = self.ml_kem.ciphertext_size
        pq_secret = self.ml_kem.decapsulate(pq, ciphertext[:split])
        peer = x25519.X25519PublicKey.from_public_bytes(ciphertext[split:])
        # OpenSSL refuses an all-zero X25519 secret (RFC 7748 section 6.1): ValueError
        return bytes(pq_secret + classic.exchange(peer))
