"""Secure aggregation by pairwise additive masking (SecAgg, Bonawitz et al. 2017, CCS).

The aggregator learns the sum of the participants' weighted updates, not one update.

**Encoding.** A participant's contribution (``weight * parameters`` and ``weight``, all vectors
end to end in name order) is encoded in fixed point modulo 2^64 (:class:`FixedPoint`): value
``x`` becomes ``round(x * 2^f)`` as a two's-complement 64-bit integer. With ``f`` fraction bits
(default 24) the precision is ``2^-(f+1)`` per value (3e-8) and, so that the sum of up to
``max_participants`` values never wraps, every value must satisfy
``|x| < 2^(63-f) / max_participants`` (default 2^39 / 100, about 5.5e9): larger values are
refused, never wrapped.

**Masks.** Every pair (i, j), i < j by participant id, shares a 32-byte seed
``s_ij = HKDF-SHA256(secret_ij, info = round, i, j, algorithm)`` where ``secret_ij`` comes from a
key agreement the caller chooses (:class:`KeyAgreement`; :class:`KEMAgreement` runs ML-KEM-768,
or the X25519+ML-KEM-768 hybrid, from :mod:`pqc`: quantum-safe). The seed is expanded with
SHAKE-256 into one 64-bit mask per value; i adds it, j subtracts it. In the sum of everyone's
masked vectors every mask appears once with each sign and cancels exactly (modulo 2^64), and one
masked vector alone is uniformly random to whoever lacks the seeds.

**Dropouts.** If j completes the key exchange but its masked vector never arrives, the survivors'
sum still holds the masks they share with j. The round then has a recovery step
(:class:`MaskedRound`): the aggregator closes collection, names the dropped participants, and each
survivor reveals its pair seeds with them (:meth:`SecAggParticipant.reveal`); the aggregator
removes those masks and learns the sum of the survivors' contributions only (and how many
survived). If a survivor also drops before revealing, the round cannot be unmasked and fails
(:class:`RecoveryIncomplete`); Bonawitz et al. secret-share each seed t-of-n to survive that,
which is not implemented here.

**What the aggregator can still learn.** The sum over the survivors (so also their total weight:
the examples learned by the survivors together); with two rounds whose survivor sets differ by one
participant, the difference of the two sums is close to that participant's contribution. A
participant refuses to reveal when fewer than ``min_survivors`` (default 2) would remain, since
the "sum" of one is an update in clear. **Late arrival:** once the survivors have revealed their
seeds with j, j's masked vector, if it still arrived, could be unmasked *alone* (the aggregator
then knows every mask in it). :class:`MaskedRound` refuses it, but a dishonest aggregator could
claim j dropped, collect the reveals and read j's vector: the protocol's double masking (each
participant also adds a self-mask whose seed is secret-shared, and survivors reveal *either* the
self-mask share or the pair seeds of a participant, never both) is what defends against that; it
is not implemented here, so the aggregator is trusted to follow the protocol honestly
(honest-but-curious) and the roster of public keys must be authenticated by the caller (signed
with each participant's ML-DSA key) or the aggregator could substitute its own keys.

**Secure vs robust.** The aggregator sees only the sum, so strategies that need each update
(FedMedian, FedTrimmedAvg, server-side clipping) are refused at construction
(:class:`~fl.strategies.base.ConfigurationError`). FedAvg works: participants send ``n_i *
params`` and ``n_i`` (both masked), the aggregator divides the sums. Clipping, and DP's clipping,
must then happen on the participants (``DifferentialPrivacy(clip_on="client")``).

>>> import numpy as np
>>> from fl.strategies.fedavg import FedAvg
>>> from fl.update import ModelUpdate
>>> current = {"w": np.zeros(2)}
>>> secure = SecureAggregation(FedAvg())
>>> people = {p: SecAggParticipant(p, KEMAgreement()) for p in ("a", "b", "c")}
>>> updates = {"a": ModelUpdate("a", 1, 10, {"w": [1.0, 2.0]}),
...            "b": ModelUpdate("b", 1, 30, {"w": [3.0, 4.0]}),
...            "c": ModelUpdate("c", 1, 20, {"w": [9.0, 9.0]})}
>>> run_round(secure, 1, current, people, updates, drop={"c"}).parameters
{'w': array([2.5, 3.5])}
>>> from fl.strategies.robust import FedMedian
>>> SecureAggregation(FedMedian())  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
fl.strategies.base.ConfigurationError: secure aggregation ... not both
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl.strategies.base import (
    Aggregate,
    Config,
    ConfigurationError,
    Strategy,
    SumAggregation,
    checked_round,
)
from fl.update import (
    ModelUpdate,
    UpdateFormatError,
    Vectors,
    flatten,
    layout_of,
    read_header,
    unflatten,
)
from pqc.backend import KEM, ML_KEM_768, get_backend

SEED_SIZE = 32
_MASK_DOMAIN = b"qsfraud.fl.secagg.mask.v1"
_SEED_SALT = b"qsfraud.fl.secagg.seed.v1"


class SecAggError(ValueError):
    """A secure-aggregation step that cannot proceed."""


class ValueOutOfRange(SecAggError):
    """A value too large (or not finite) to encode without the sum wrapping."""


class RecoveryIncomplete(SecAggError):
    """A survivor did not reveal its seeds with a dropped participant: the sum stays masked."""


@dataclass(frozen=True)
class FixedPoint:
    """Reals as 64-bit integers modulo 2^64 with ``fraction_bits`` bits after the point.

    >>> codec = FixedPoint(fraction_bits=24, max_participants=100)
    >>> codec.decode(codec.encode(np.array([1.5, -2.25])) + codec.encode(np.array([1.0, 1.0])))
    array([ 2.5 , -1.25])
    >>> codec.encode(np.array([1e10]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fl.strategies.secagg.ValueOutOfRange: ... out of the encodable range (|x| < 5.5e+09 ...)
    """

    fraction_bits: int = 24
    max_participants: int = 100

    def __post_init__(self) -> None:
        if not 0 <= self.fraction_bits <= 52:
            raise ValueError(f"fraction_bits must be in [0, 52], got {self.fraction_bits}")
        if self.max_participants < 1:
            raise ValueError(f"max_participants must be >= 1, got {self.max_participants}")

    @property
    def limit(self) -> float:
        """Values must have ``|x| <`` this so that a sum of ``max_participants`` cannot wrap."""
        return float(2 ** (63 - self.fraction_bits)) / self.max_participants

    @property
    def precision(self) -> float:
        """The largest rounding error of one encoded value."""
        return float(2.0 ** -(self.fraction_bits + 1))

    def encode(self, values: np.ndarray) -> np.ndarray:
        """``values`` as uint64; :class:`ValueOutOfRange` if any is too large or not finite."""
        values = np.asarray(values, dtype=np.float64)
        if values.size:
            worst = float(np.max(np.abs(values)))
            if not np.isfinite(worst) or worst >= self.limit:
                raise ValueOutOfRange(
                    f"a value of magnitude {worst:.2g} is out of the encodable range "
                    f"(|x| < {self.limit:.2g} for {self.max_participants} participants at "
                    f"{self.fraction_bits} fraction bits)"
                )
        scaled = np.rint(np.ldexp(values, self.fraction_bits)).astype(np.int64)
        return scaled.view(np.uint64)

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """The reals of a (summed) encoding."""
        as_signed = np.asarray(encoded, dtype=np.uint64).view(np.int64)
        return np.ldexp(as_signed.astype(np.float64), -self.fraction_bits)


def mask_stream(seed: bytes, round: int, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 from SHAKE-256 over a pair seed and the round.

    >>> mask_stream(bytes(32), 1, 3).dtype, len(mask_stream(bytes(32), 1, 3))
    (dtype('uint64'), 3)
    """
    if len(seed) != SEED_SIZE:
        raise SecAggError(f"a pair seed is {SEED_SIZE} bytes, got {len(seed)}")
    prg = hashlib.shake_256(_MASK_DOMAIN + round.to_bytes(8, "big") + seed)
    return np.frombuffer(prg.digest(8 * length), dtype="<u8").astype(np.uint64)


def pair_seed(secret: bytes, round: int, first: str, second: str, algorithm: str) -> bytes:
    """The pair's mask seed: HKDF-SHA256 of the agreed secret, bound to round, pair, algorithm."""
    info = b"\x00".join(
        [round.to_bytes(8, "big"), first.encode(), second.encode(), algorithm.encode()]
    )
    return HKDF(hashes.SHA256(), SEED_SIZE, _SEED_SALT, info).derive(secret)


class KeyAgreement(ABC):
    """One participant's side of a two-party key agreement run through the aggregator.

    The initiator calls :meth:`initiate` with the peer's public key and sends the returned
    message; the peer calls :meth:`respond` with it. Both get the same secret.
    """

    algorithm: str

    @abstractmethod
    def public_key(self) -> bytes:
        """This participant's public key (to be authenticated by the caller)."""

    @abstractmethod
    def initiate(self, peer_public_key: bytes) -> tuple[bytes, bytes]:
        """``(secret, message for the peer)``."""

    @abstractmethod
    def respond(self, peer_public_key: bytes, message: bytes) -> bytes:
        """The secret in the initiator's ``message``."""


class KEMAgreement(KeyAgreement):
    """A KEM from :mod:`pqc` (default ML-KEM-768): the initiator encapsulates to the peer."""

    def __init__(self, kem: KEM | None = None) -> None:
        self.kem = kem if kem is not None else get_backend().kem(ML_KEM_768)
        self.algorithm = self.kem.algorithm
        self._key = self.kem.keygen()

    def public_key(self) -> bytes:
        return self._key.public_key

    def initiate(self, peer_public_key: bytes) -> tuple[bytes, bytes]:
        return self.kem.encapsulate(peer_public_key)

    def respond(self, peer_public_key: bytes, message: bytes) -> bytes:
        return self.kem.decapsulate(self._key, message)


class X25519Agreement(KeyAgreement):
    """Classical Diffie-Hellman over X25519 (not quantum-safe; for comparison and tests)."""

    algorithm = "X25519"

    def __init__(self) -> None:
        self._key = x25519.X25519PrivateKey.generate()

    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def initiate(self, peer_public_key: bytes) -> tuple[bytes, bytes]:
        return self.respond(peer_public_key, b""), b""

    def respond(self, peer_public_key: bytes, message: bytes) -> bytes:
        peer = x25519.X25519PublicKey.from_public_bytes(peer_public_key)
        return self._key.exchange(peer)  # raises ValueError on an all-zero shared secret


@dataclass(frozen=True, eq=False)
class MaskedUpdate:
    """One participant's masked contribution: uint64 values, meaningless alone."""

    participant: str
    round: int
    values: np.ndarray = field(repr=False)

    def to_wire(self) -> dict[str, Any]:
        """``{"v": 1, "participant", "round", "masked": base64 of little-endian uint64}``."""
        raw = np.asarray(self.values, dtype="<u8").tobytes()
        return {
            "v": 1,
            "participant": self.participant,
            "round": self.round,
            "masked": base64.b64encode(raw).decode("ascii"),
        }

    @classmethod
    def from_wire(cls, wire: Any) -> MaskedUpdate:
        participant, round_ = read_header(wire)
        masked = wire.get("masked")
        if not isinstance(masked, str):
            raise UpdateFormatError("masked", "must be a base64 string")
        try:
            raw = base64.b64decode(masked, validate=True)
        except (binascii.Error, ValueError):
            raise UpdateFormatError("masked", "not valid base64") from None
        if len(raw) % 8:
            raise UpdateFormatError("masked", f"{len(raw)} bytes is not a whole number of uint64")
        return cls(participant, round_, np.frombuffer(raw, dtype="<u8").astype(np.uint64))


class SecAggParticipant:
    """A participant's side of the protocol, for one round at a time (pure, no I/O)."""

    def __init__(
        self,
        participant: str,
        agreement: KeyAgreement,
        codec: FixedPoint | None = None,
        min_survivors: int = 2,
    ) -> None:
        self.participant = participant
        self.agreement = agreement
        self.codec = codec if codec is not None else FixedPoint()
        self.min_survivors = min_survivors
        self.round = -1
        self._roster: dict[str, bytes] = {}
        self._seeds: dict[str, bytes] = {}
        self._masked = False

    def advertise(self) -> bytes:
        """The public key to publish (step 0; authenticate it, e.g. sign it with ML-DSA)."""
        return self.agreement.public_key()

    def share(self, round: int, roster: Mapping[str, bytes]) -> dict[str, bytes]:
        """Starts ``round`` with ``roster`` (id -> public key, self included); returns the
        key-agreement messages for the peers whose id sorts after this one's."""
        if self.participant not in roster:
            raise SecAggError(f"{self.participant} is not in the roster")
        self.round, self._roster, self._seeds, self._masked = round, dict(roster), {}, False
        messages: dict[str, bytes] = {}
        for peer in sorted(roster):
            if peer > self.participant:
                secret, message = self.agreement.initiate(roster[peer])
                self._seeds[peer] = self._seed(secret, peer)
                messages[peer] = message
        return messages

    def receive(self, messages: Mapping[str, bytes]) -> None:
        """Completes the pairs initiated by the peers whose id sorts before this one's."""
        for peer, message in messages.items():
            if peer not in self._roster or peer >= self.participant:
                raise SecAggError(f"unexpected key-agreement message from {peer!r}")
            secret = self.agreement.respond(self._roster[peer], message)
            self._seeds[peer] = self._seed(secret, peer)

    def _seed(self, secret: bytes, peer: str) -> bytes:
        first, second = sorted((self.participant, peer))
        return pair_seed(secret, self.round, first, second, self.agreement.algorithm)

    def mask(self, update: ModelUpdate, strategy: SumAggregation) -> MaskedUpdate:
        """``update``'s contribution (``weight * parameters``, then ``weight``), masked."""
        if update.participant != self.participant or update.round != self.round:
            raise SecAggError(
                f"update of {update.participant} round {update.round} given to "
                f"{self.participant} in round {self.round}"
            )
        if len(self._roster) < self.min_survivors:
            raise SecAggError(
                f"a roster of {len(self._roster)}: the sum would be this update in clear"
            )
        peers = set(self._roster) - {self.participant}
        if set(self._seeds) != peers:
            raise SecAggError(f"no pair seed yet with {sorted(peers - set(self._seeds))}")
        weight = strategy.weight(update)
        plain = np.append(flatten(update.vectors) * weight, weight)
        values = self.codec.encode(plain)
        for peer, seed in self._seeds.items():
            mask = mask_stream(seed, self.round, len(values))
            values = values + mask if self.participant < peer else values - mask
        self._masked = True
        return MaskedUpdate(self.participant, self.round, values)

    def reveal(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, bytes]:
        """The pair seeds with the ``dropped`` participants, so the survivors' sum can be
        unmasked; refused if this participant would help unmask fewer than ``min_survivors``."""
        survivors_set, dropped_set = set(survivors), set(dropped)
        if self.participant not in survivors_set or not self._masked:
            raise SecAggError(f"{self.participant} has not sent a masked update this round")
        if survivors_set & dropped_set or (survivors_set | dropped_set) != set(self._roster):
            raise SecAggError("survivors and dropped must split the round's roster")
        if len(survivors_set) < self.min_survivors:
            raise SecAggError(
                f"only {len(survivors_set)} survivors: revealing would expose their updates"
            )
        return {peer: self._seeds[peer] for peer in sorted(dropped_set)}


class SecureAggregation(Strategy):
    """Runs a sum-only strategy (FedAvg, DP with client-side clipping) on masked updates.

    The aggregator never sees an update: use :class:`MaskedRound` (or :meth:`aggregate_masked`)
    instead of :meth:`aggregate`. Strategies that need each update are refused.
    """

    needs_individual_updates = False
    receives_plain_updates = False

    def __init__(self, inner: Strategy, codec: FixedPoint | None = None) -> None:
        if inner.needs_individual_updates or not isinstance(inner, SumAggregation):
            raise ConfigurationError(
                f"secure aggregation shows the aggregator only the sum of the updates, and "
                f"{inner.name} needs each update on its own: choose secure or robust "
                f"aggregation for a round, not both"
            )
        self.inner = inner
        self.codec = codec if codec is not None else FixedPoint()

    @property
    def name(self) -> str:
        return f"SecureAggregation({self.inner.name})"

    def config(self, round: int) -> Config:
        return {
            **self.inner.config(round),
            "secure_aggregation": True,
            "fraction_bits": self.codec.fraction_bits,
            "max_participants": self.codec.max_participants,
        }

    def aggregate(self, round: int, current: Vectors, updates: Sequence[ModelUpdate]) -> Aggregate:
        """Plain updates are a configuration error under secure aggregation."""
        raise ConfigurationError("secure aggregation receives masked updates: use MaskedRound")

    def aggregate_masked(
        self,
        round: int,
        current: Vectors,
        masked: Sequence[MaskedUpdate],
        roster: Sequence[str],
        revealed: Mapping[str, Mapping[str, bytes]],
    ) -> Aggregate:
        """Unmasks the sum of ``masked`` and lets the inner strategy turn it into parameters.

        ``roster``: everyone who took part in the key agreement; those without a masked update
        dropped, and ``revealed[survivor][dropped]`` must hold each survivor's seed with each.
        """
        layout = layout_of(current)
        length = sum(n for _, n in layout) + 1
        senders = [m.participant for m in masked]
        if len(set(senders)) != len(senders):
            raise SecAggError("two masked updates from one participant")
        if not set(senders) <= set(roster):
            raise SecAggError(
                f"masked updates from outside the roster: {sorted(set(senders) - set(roster))}"
            )
        if len(senders) > self.codec.max_participants:
            raise SecAggError(
                f"{len(senders)} participants exceed the codec's "
                f"{self.codec.max_participants}: the sum could wrap"
            )
        dropped = sorted(set(roster) - set(senders))
        total = np.zeros(length, dtype=np.uint64)
        for update in masked:
            if update.round != round or len(update.values) != length:
                raise SecAggError(
                    f"{update.participant}: round {update.round} with "
                    f"{len(update.values)} values, expected {round} and {length}"
                )
            total = total + update.values
        for survivor in senders:
            seeds = revealed.get(survivor, {})
            for gone in dropped:
                if gone not in seeds:
                    raise RecoveryIncomplete(f"{survivor} did not reveal its seed with {gone}")
                mask = mask_stream(seeds[gone], round, length)
                total = total - mask if survivor < gone else total + mask
        plain = self.codec.decode(total)
        weighted_sum = unflatten(plain[:-1], layout)
        result = self.inner.aggregate_sum(
            round, current, weighted_sum, float(plain[-1]), len(senders)
        )
        return Aggregate(result.parameters, {**result.metrics, "dropped": len(dropped)})


class MaskedRound:
    """The aggregator's state for one secure round: collect, close, recover, aggregate.

    After :meth:`close` no masked update is accepted any more: the dropped participants' seeds
    are about to be revealed, and a late update could then be unmasked on its own.
    """

    def __init__(
        self, strategy: SecureAggregation, round: int, current: Vectors, roster: Sequence[str]
    ) -> None:
        self.strategy, self.round, self.current = strategy, round, current
        self.roster = sorted(roster)
        self.masked: dict[str, MaskedUpdate] = {}
        self.revealed: dict[str, dict[str, bytes]] = {}
        self.closed = False

    def collect(self, update: MaskedUpdate) -> None:
        """Accepts one participant's masked update while the round is open."""
        if self.closed:
            raise SecAggError(
                f"{update.participant}'s masked update arrived after the round "
                f"closed (its pair seeds may be revealed): refused"
            )
        if update.participant not in self.roster or update.participant in self.masked:
            raise SecAggError(f"unexpected or duplicate masked update from {update.participant}")
        self.masked[update.participant] = update

    def close(self) -> tuple[list[str], list[str]]:
        """Stops collecting; ``(survivors, dropped)`` to send to the survivors for recovery."""
        self.closed = True
        survivors = sorted(self.masked)
        return survivors, [p for p in self.roster if p not in self.masked]

    def recover(self, survivor: str, seeds: Mapping[str, bytes]) -> None:
        """Records ``survivor``'s seeds with the dropped participants."""
        if not self.closed or survivor not in self.masked:
            raise SecAggError(f"{survivor} is not a survivor of a closed round")
        self.revealed[survivor] = dict(seeds)

    def aggregate(self) -> Aggregate:
        if not self.closed:
            raise SecAggError("close the round before aggregating")
        return self.strategy.aggregate_masked(
            self.round, self.current, list(self.masked.values()), self.roster, self.revealed
        )


def run_round(
    strategy: SecureAggregation,
    round: int,
    current: Vectors,
    participants: Mapping[str, SecAggParticipant],
    updates: Mapping[str, ModelUpdate],
    drop: set[str] | frozenset[str] = frozenset(),
) -> Aggregate:
    """One whole secure round in memory (simulation and tests): key agreement, masking,
    ``drop`` vanishing after the key agreement, recovery, aggregation."""
    roster = {p: participant.advertise() for p, participant in participants.items()}
    inbox: dict[str, dict[str, bytes]] = {p: {} for p in participants}
    for p, participant in participants.items():
        for peer, message in participant.share(round, roster).items():
            inbox[peer][p] = message
    for p, participant in participants.items():
        participant.receive(inbox[p])
    state = MaskedRound(strategy, round, current, list(participants))
    inner = strategy.inner
    assert isinstance(inner, SumAggregation)
    checked_round(round, current, [u for p, u in updates.items() if p not in drop])
    for p in sorted(participants):
        if p not in drop:
            state.collect(participants[p].mask(updates[p], inner))
    survivors, dropped = state.close()
    if dropped:
        for p in survivors:
            state.recover(p, participants[p].reveal(survivors, dropped))
    return state.aggregate()
