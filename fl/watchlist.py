"""A federated watchlist: instruments and devices retailers reported, as keyed hashes.

Model parameters say how an attack looks, never *which* card or device is compromised; this
module carries the second, without a raw identifier leaving a retailer:

* **Hashing.** A retailer names an entity by ``HMAC-SHA-256(consortium key, kind || 0x00 ||
  value)``, truncated to 128 bits (:func:`entity_key`). The consortium key is shared by the
  retailers and never given to the aggregator: an admin generates it and seals it to each
  retailer's KEM key with the ``pqc`` envelopes (:func:`seal_watch_key`, purpose
  ``fl.watch-key``, signed by an ``admin``); a retailer opens it with :func:`open_watch_key`
  and keeps it beside its own keys.
* **Reporting** (:class:`Reporter`, the retailer's side): an entity of a row this retailer
  held or blocked (score at or above ``threshold``) is reported in the retailer's next update;
  the retailer remembers what it reported so it can tell "reported by others" from its own.
* **Union** (:class:`WatchlistUnion`, the aggregator's side): keys from each report, at most
  ``max_per_report`` per report and ``max_per_retailer`` live per retailer (a poisoning
  retailer cannot list the world, only its own share), ``max_entries`` in all (the oldest
  go first), each expiring ``horizon_s`` after its last report. It publishes
  ``{key: number of distinct retailers}``.
* **Deciding** (:class:`fraud.decisions.Watchlist`): each retailer's decision step raises a
  transaction naming an entity listed by at least one *other* retailer to ``hold``.
* **New devices** (optional): a retailer also reports each device the first time it sees it
  (:class:`SeenDevices`); the aggregator lists those apart, for hours
  (:data:`NEW_DEVICE_LIMITS`), and a retailer holds a row whose device is new there too and
  that its own model scores at least a floor.

What this reveals is in fl/README.md ("Cross-retailer watchlist").
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from fraud.schema import WATCH_FIELDS
from pqc.envelope import open as open_envelope
from pqc.envelope import seal
from pqc.freshness import FreshnessStore, TimeWindow
from pqc.keys import Identity, KemKeyring, Registry, TrustedKey

WATCH_WIRE_VERSION: Final = 1
KEY_BYTES: Final = 32
KEY_PURPOSE: Final = "fl.watch-key"
HASH_HEX: Final = 32
"""Hex digits of a hashed key kept (128 bits: collisions among 10^9 keys have odds ~1e-21)."""
KEY_WINDOW: Final = TimeWindow(max_age_s=400 * 86400.0, max_future_s=120.0)
"""How old a sealed consortium key may be: it is kept at rest and opened at every start, so
the default envelope window (minutes) would refuse it; an admin re-seals it within a year."""
STATE_VERSION: Final = 1


class WatchFormatError(ValueError):
    """A watchlist report or published watchlist that does not have the required shape."""


def new_key() -> bytes:
    """A fresh consortium key (32 random bytes)."""
    return secrets.token_bytes(KEY_BYTES)


def entity_key(key: bytes, kind: str, value: str) -> str:
    """The keyed hash naming one entity across retailers.

    >>> entity_key(bytes(32), "instrument", "pi-1")
    'e4ef2493418e5758f575c4d2badd9632'
    >>> entity_key(bytes(32), "device", "pi-1") != entity_key(bytes(32), "instrument", "pi-1")
    True
    """
    if kind not in WATCH_FIELDS:
        raise ValueError(f"unknown entity kind {kind!r}; use {', '.join(WATCH_FIELDS)}")
    if len(key) < 16:
        raise ValueError("the consortium key must have at least 16 bytes")
    message = kind.encode() + b"\x00" + value.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:HASH_HEX]


def hasher(key: bytes) -> Callable[[str, str], str]:
    """``entity_key`` bound to ``key``: the ``key_of`` of :class:`fraud.decisions.Watchlist`."""

    def key_of(kind: str, value: str) -> str:
        return entity_key(key, kind, value)

    return key_of


def seal_watch_key(key: bytes, admin: Identity, retailer_kem: TrustedKey, sequence: int, *,
                   now: float | None = None) -> bytes:
    """The consortium key encrypted to one retailer and signed by the admin who made it."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"the consortium key has {KEY_BYTES} bytes, got {len(key)}")
    return seal(key, admin, retailer_kem, KEY_PURPOSE, sequence, now=now)


def open_watch_key(blob: bytes, keyring: KemKeyring, registry: Registry,
                   freshness: FreshnessStore, *, now: float | None = None,
                   window: TimeWindow = KEY_WINDOW) -> bytes:
    """The consortium key from :func:`seal_watch_key`; only an ``admin`` may have sent it.
    ``freshness``: a worker opening the same file at every start passes a fresh in-memory
    store (the file is not a message that could be replayed to it)."""
    key, _ = open_envelope(blob, keyring, registry, freshness=freshness, purpose=KEY_PURPOSE,
                           roles=("admin",), now=now, window=window)
    if len(key) != KEY_BYTES:
        raise WatchFormatError(f"the consortium key has {KEY_BYTES} bytes, got {len(key)}")
    return key


def check_keys(keys: Any, what: str = "watch") -> list[str]:
    """``keys`` if it is a list of hashed keys (:data:`HASH_HEX` lowercase hex digits)."""
    if not isinstance(keys, list | tuple):
        raise WatchFormatError(f"{what}: expected a list of hashed keys")
    for k in keys:
        if not (isinstance(k, str) and len(k) == HASH_HEX
                and all(c in "0123456789abcdef" for c in k)):
            raise WatchFormatError(f"{what}: {k!r} is not a hashed key "
                                   f"({HASH_HEX} lowercase hex digits)")
    return list(keys)


def watchlist_to_wire(listed: Mapping[str, int]) -> dict[str, Any]:
    """The published watchlist as plain data: ``{"v": 1, "listed": {key: retailers}}``."""
    return {"v": WATCH_WIRE_VERSION, "listed": {k: listed[k] for k in sorted(listed)}}


def watchlist_from_wire(wire: Any) -> dict[str, int]:
    if not isinstance(wire, Mapping) or wire.get("v") != WATCH_WIRE_VERSION:
        raise WatchFormatError(f"watchlist: expected version {WATCH_WIRE_VERSION}")
    listed = wire.get("listed")
    if not isinstance(listed, Mapping):
        raise WatchFormatError("watchlist.listed: expected an object")
    check_keys(list(listed), "watchlist.listed")
    for k, n in listed.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise WatchFormatError(f"watchlist.listed.{k}: expected a count >= 1, got {n!r}")
    return dict(listed)


@dataclass(frozen=True, slots=True)
class UnionLimits:
    """Bounds of the aggregator's union (see the module docstring)."""

    horizon_s: float = 86400.0
    max_per_report: int = 200
    max_per_retailer: int = 2000
    max_entries: int = 200_000

    def __post_init__(self) -> None:
        if self.horizon_s <= 0 or min(self.max_per_report, self.max_per_retailer,
                                      self.max_entries) < 1:
            raise ValueError("watchlist limits must be positive")


@dataclass(slots=True)
class WatchlistUnion:
    """The aggregator's union of the retailers' reports."""

    limits: UnionLimits = field(default_factory=UnionLimits)
    entries: dict[str, dict[str, float]] = field(default_factory=dict)
    """hashed key -> {retailer: when it last reported it}"""
    refused: int = 0
    """Keys refused by the per-report cap so far."""

    def add(self, retailer: str, keys: Iterable[str], now: float) -> int:
        """Records ``retailer``'s report at ``now``; returns the keys accepted."""
        wanted = list(dict.fromkeys(keys))
        accepted = wanted[: self.limits.max_per_report]
        self.refused += len(wanted) - len(accepted)
        for k in accepted:
            self.entries.setdefault(k, {})[retailer] = now
        self._cap_retailer(retailer)
        self._cap_total()
        return len(accepted)

    def _cap_retailer(self, retailer: str) -> None:
        mine = [(seen[retailer], k) for k, seen in self.entries.items() if retailer in seen]
        excess = len(mine) - self.limits.max_per_retailer
        if excess > 0:
            for _, k in heapq.nsmallest(excess, mine):
                self._drop(k, retailer)

    def _cap_total(self) -> None:
        excess = len(self.entries) - self.limits.max_entries
        if excess > 0:
            oldest = heapq.nsmallest(excess, self.entries,
                                     key=lambda k: max(self.entries[k].values()))
            for k in oldest:
                del self.entries[k]

    def _drop(self, k: str, retailer: str) -> None:
        seen = self.entries[k]
        del seen[retailer]
        if not seen:
            del self.entries[k]

    def expire(self, now: float) -> None:
        """Forgets each retailer's report older than the horizon."""
        limit = now - self.limits.horizon_s
        for k in [k for k, seen in self.entries.items() if min(seen.values()) < limit]:
            for retailer in [r for r, t in self.entries[k].items() if t < limit]:
                self._drop(k, retailer)

    def published(self, now: float) -> dict[str, int]:
        """``{hashed key: distinct retailers}`` after expiring old reports."""
        self.expire(now)
        return {k: len(seen) for k, seen in self.entries.items()}

    def to_state(self) -> dict[str, Any]:
        """The union as plain data (the aggregator's own state file, never published: it says
        which retailer reported what)."""
        return {"v": STATE_VERSION, "refused": self.refused,
                "entries": {k: dict(sorted(seen.items())) for k, seen in
                            sorted(self.entries.items())}}

    @classmethod
    def from_state(cls, state: Any, limits: UnionLimits | None = None) -> WatchlistUnion:
        """A union from :meth:`to_state` (the limits are the caller's, not the file's)."""
        if not isinstance(state, Mapping) or state.get("v") != STATE_VERSION:
            raise WatchFormatError(f"watchlist state: expected version {STATE_VERSION}")
        entries = state.get("entries")
        refused = state.get("refused", 0)
        if not isinstance(entries, Mapping) or isinstance(refused, bool) or not isinstance(
                refused, int):
            raise WatchFormatError("watchlist state: expected entries and a refused count")
        check_keys(list(entries), "watchlist state")
        union = cls(limits or UnionLimits(), refused=refused)
        for k, seen in entries.items():
            if not isinstance(seen, Mapping) or not seen or not all(
                    isinstance(r, str) and isinstance(t, int | float) and not isinstance(t, bool)
                    and math.isfinite(t) for r, t in seen.items()):
                raise WatchFormatError(f"watchlist state: {k}: expected {{retailer: time}}")
            union.entries[k] = {r: float(t) for r, t in seen.items()}
        return union

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes :meth:`to_state` to ``path`` atomically (a crash leaves the old file)."""
        _write_atomically(Path(path), self.to_state())

    @classmethod
    def load(cls, path: str | os.PathLike[str],
             limits: UnionLimits | None = None) -> WatchlistUnion:
        """The union saved at ``path``; an empty one if there is no file yet."""
        target = Path(path)
        if not target.exists():
            return cls(limits or UnionLimits())
        return cls.from_state(json.loads(target.read_text(encoding="utf-8")), limits)


def _write_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(slots=True)
class Reporter:
    """A retailer's side: which entities it reports, and which of the listed ones are its own."""

    key_of: Callable[[str, str], str]
    threshold: float = 0.8
    horizon_s: float = 86400.0
    kinds: tuple[str, ...] = tuple(WATCH_FIELDS)
    margin_s: float = 3600.0
    pending: dict[str, None] = field(default_factory=dict)
    own: dict[str, float] = field(default_factory=dict)

    def observe(self, tx: Mapping[str, Any], score: float, now: float) -> None:
        """A scored row: its instrument and device are reported if it was held or blocked."""
        if score >= self.threshold:
            self.report(tx, now)

    def report(self, tx: Mapping[str, Any], now: float, most: int | None = None) -> None:
        """Reports ``tx``'s entities with the next update, whatever its score (at most
        ``most`` pending: :meth:`pend`)."""
        for kind in self.kinds:
            value = tx.get(WATCH_FIELDS[kind])
            if value:
                self.pend(self.key_of(kind, str(value)), most)

    def pend(self, key: str, most: int | None = None) -> None:
        """Reports the hashed ``key`` with the next update; at most ``most`` pending (the
        oldest dropped first)."""
        self.pending[key] = None
        if most is not None:
            while len(self.pending) > most:
                del self.pending[next(iter(self.pending))]

    def take(self, now: float) -> list[str]:
        """The keys to send with the next update, sent at ``now`` (then no longer pending)."""
        keys = list(self.pending)
        self.sent(keys, now)
        return keys

    def sent(self, keys: Iterable[str], now: float) -> None:
        """``keys`` (from :attr:`pending`) went out at ``now``: no longer pending, now own.
        A worker reads :attr:`pending` when it seals an update and calls this once the update
        is written, so a failed send keeps them for the next one."""
        for k in keys:
            self.pending.pop(k, None)
            self.own[k] = now

    def own_to_state(self) -> dict[str, Any]:
        """The retailer's own reports as plain data: a restarted worker must still tell its
        own reports from other retailers'."""
        return {"v": STATE_VERSION, "own": dict(sorted(self.own.items()))}

    def restore_own(self, state: Any) -> None:
        if not isinstance(state, Mapping) or state.get("v") != STATE_VERSION or not isinstance(
                state.get("own"), Mapping):
            raise WatchFormatError(f"own reports: expected version {STATE_VERSION}")
        own = state["own"]
        check_keys(list(own), "own reports")
        if not all(isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
                   for t in own.values()):
            raise WatchFormatError("own reports: expected {key: time}")
        self.own.update({k: float(t) for k, t in own.items()})

    def save_own(self, path: str | os.PathLike[str]) -> None:
        _write_atomically(Path(path), self.own_to_state())

    def others(self, listed: Mapping[str, int], now: float) -> dict[str, int]:
        """``listed`` as counts of *other* retailers (own reports taken off; entries only this
        retailer reported dropped). Its own reports are remembered ``margin_s`` longer than
        the union keeps them: the union dates a report from the round's close, a little
        after it was sent, and an own report must never count as another retailer's."""
        limit = now - self.horizon_s - self.margin_s
        for k in [k for k, t in self.own.items() if t < limit]:
            del self.own[k]
        out = {}
        for k, n in listed.items():
            n -= 1 if k in self.own else 0
            if n > 0:
                out[k] = n
        return out


NEW_DEVICE_LIMITS: Final = UnionLimits(horizon_s=6 * 3600.0, max_per_report=1000,
                                       max_per_retailer=20_000)
"""The aggregator's union of new-device reports: listed 6 hours after the last report (the
generator's campaigns reach their next retailer 0.5 to 6 hours later), with caps sized for a
retailer's new devices in one sync interval rather than its holds."""
NEW_HERE_S: Final = 3600.0
"""A device is new *here* if this retailer first saw it at most this long ago (a campaign's
rows at one retailer come minutes apart)."""


@dataclass(slots=True)
class SeenDevices:
    """The devices a retailer has seen, as keyed hashes with their first sighting: which ones
    are new here (reported as new, and one half of the new-device rule). Bounded: past
    ``max_entries`` the device seen least recently is forgotten (seen again, it is new again).
    """

    max_entries: int = 200_000
    first_seen: dict[str, float] = field(default_factory=dict)
    changed: bool = False

    def sight(self, key: str, now: float) -> float:
        """Records a sighting of ``key`` at ``now``; its age here in seconds (0: first seen
        now).

        >>> seen = SeenDevices()
        >>> seen.sight("d1", 100.0), seen.sight("d1", 160.0)
        (0.0, 60.0)
        """
        first = self.first_seen.pop(key, None)
        if first is None:
            first = now
            self.changed = True
            while len(self.first_seen) >= self.max_entries:
                del self.first_seen[next(iter(self.first_seen))]
        self.first_seen[key] = first  # re-inserted: the order is that of the last sighting
        return now - first

    def to_state(self) -> dict[str, Any]:
        """As plain data, least recently seen first (a restarted worker must not take every
        device it knew for a new one)."""
        return {"v": STATE_VERSION, "seen": [[k, t] for k, t in self.first_seen.items()]}

    def restore(self, state: Any) -> None:
        if not isinstance(state, Mapping) or state.get("v") != STATE_VERSION or not isinstance(
                state.get("seen"), list):
            raise WatchFormatError(f"seen devices: expected version {STATE_VERSION}")
        pairs = state["seen"]
        if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[1], int | float)
                   and not isinstance(p[1], bool) and math.isfinite(p[1]) for p in pairs):
            raise WatchFormatError("seen devices: expected [[key, time], ...]")
        check_keys([p[0] for p in pairs], "seen devices")
        for k, t in pairs[-self.max_entries:]:
            self.first_seen[k] = float(t)

    def save(self, path: str | os.PathLike[str]) -> None:
        _write_atomically(Path(path), self.to_state())
        self.changed = False


# ----------------------------------------------------------------------------- simulation

Signal = Literal["hold", "verify", "block", "review", "label"]
SIGNALS: Final[tuple[Signal, ...]] = ("hold", "verify", "block", "review", "label")


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    """How :func:`replay` runs: which rows are reported, and how often reports are exchanged.

    ``signal``: ``hold`` (score >= 0.8, at once), ``verify`` (score >= 0.5, the step-up
    band, at once), ``block`` (score >= 0.95, at once),
    ``review`` (score >= 0.8 and the row is fraud, ``review_s`` later: an analyst confirmed the
    hold) or ``label`` (a fraud label, ``label_delay_s`` later: a chargeback).
    """

    signal: Signal = "review"
    exchange_every_s: float = 300.0
    review_s: float = 3600.0
    label_delay_s: float = 604800.0
    hold: float = 0.8
    block: float = 0.95
    verify: float = 0.5
    report_at: float | None = None
    """For ``hold``, ``verify`` and ``block``: report rows scoring at least this instead of
    the signal's band (an experiment: no policy band says so)."""
    kinds: tuple[str, ...] = tuple(WATCH_FIELDS)
    """The entity kinds reported."""
    limits: UnionLimits = field(default_factory=UnionLimits)


def _exchange(union: WatchlistUnion, reporters: Mapping[str, Reporter],
              t: float) -> dict[str, dict[str, int]]:
    """One exchange at ``t``: every retailer's pending reports into the union, and what each
    then sees listed by the others."""
    for who, reporter in reporters.items():
        union.add(who, reporter.take(t), t)
    listed = union.published(t)
    return {who: r.others(listed, t) for who, r in reporters.items()}


def replay(times: Sequence[float], retailers: Sequence[str],
           entities: Sequence[Mapping[str, Any]], scores: Sequence[float],
           labels: Sequence[bool], settings: ReplaySettings, key: bytes) -> list[int]:
    """For each row in time order, how many *other* retailers had listed one of its entities
    when it arrived (0: none), with reports exchanged every ``exchange_every_s`` seconds.

    The watchlist changes decisions, not scores or what a model learns, so it can be replayed
    over a run's scores afterwards: the result is the one it would have had live.
    """
    if not len(times) == len(retailers) == len(entities) == len(scores) == len(labels):
        raise ValueError("times, retailers, entities, scores and labels differ in length")
    key_of = hasher(key)
    threshold = {"block": settings.block, "verify": settings.verify}.get(settings.signal,
                                                                         settings.hold)
    if settings.report_at is not None and settings.signal in ("hold", "verify", "block"):
        threshold = settings.report_at
    union = WatchlistUnion(settings.limits)
    reporters: dict[str, Reporter] = {}
    delayed: list[tuple[float, int]] = []  # (when the report is due, row)
    views: dict[str, dict[str, int]] = {}
    next_exchange = None
    hits: list[int] = []
    for i, (t, name) in enumerate(zip(times, retailers, strict=True)):
        if next_exchange is None:
            next_exchange = t + settings.exchange_every_s
        while delayed and delayed[0][0] <= t:
            due, j = heapq.heappop(delayed)
            reporters[retailers[j]].report(entities[j], due)
        if t >= next_exchange:
            views = _exchange(union, reporters, t)
            while next_exchange <= t:
                next_exchange += settings.exchange_every_s
        if name not in reporters:
            reporters[name] = Reporter(key_of, threshold, settings.limits.horizon_s,
                                      settings.kinds)
        reporter = reporters[name]
        view = views.get(name)
        count = 0
        if view:
            for kind, field_name in WATCH_FIELDS.items():
                value = entities[i].get(field_name)
                if value:
                    count = max(count, view.get(key_of(kind, str(value)), 0))
        hits.append(count)
        score = float(scores[i])
        if settings.signal in ("hold", "verify", "block"):
            # the model's own holds only: re-reporting what the watchlist held would keep an
            # entry alive by itself (a victim's card held at B, reported, held at A, ...)
            reporter.observe(entities[i], score, t)
        elif settings.signal == "review" and (score >= settings.hold or count) and labels[i]:
            # an analyst confirmed the hold (whatever raised it): confirmation breaks the loop
            heapq.heappush(delayed, (t + settings.review_s, i))
        elif settings.signal == "label" and labels[i]:
            heapq.heappush(delayed, (t + settings.label_delay_s, i))
    return hits


def replay_new_devices(times: Sequence[float], retailers: Sequence[str],
                       entities: Sequence[Mapping[str, Any]], key: bytes, *,
                       exchange_every_s: float = 300.0,
                       limits: UnionLimits = NEW_DEVICE_LIMITS,
                       new_here_s: float = NEW_HERE_S) -> list[int]:
    """For each row in time order, how many *other* retailers had listed its device as new
    when it arrived (each reports a device the first time it sees it; the union lists it
    ``limits.horizon_s``), if the device is new here too (first seen here at most
    ``new_here_s`` ago); else 0. Reports are exchanged every ``exchange_every_s`` seconds.
    With :func:`replay`'s counts, this is what the worker's ``--fl-watch-new-devices`` does.
    """
    if not len(times) == len(retailers) == len(entities):
        raise ValueError("times, retailers and entities differ in length")
    key_of = hasher(key)
    union = WatchlistUnion(limits)
    reporters: dict[str, Reporter] = {}
    seen: dict[str, SeenDevices] = {}
    views: dict[str, dict[str, int]] = {}
    next_exchange = None
    hits: list[int] = []
    field_name = WATCH_FIELDS["device"]
    for i, (t, name) in enumerate(zip(times, retailers, strict=True)):
        if next_exchange is None:
            next_exchange = t + exchange_every_s
        if t >= next_exchange:
            views = _exchange(union, reporters, t)
            while next_exchange <= t:
                next_exchange += exchange_every_s
        if name not in reporters:
            reporters[name] = Reporter(key_of, horizon_s=limits.horizon_s, kinds=("device",))
            seen[name] = SeenDevices(max_entries=10**9)
        value = entities[i].get(field_name)
        count = 0
        if value:
            k = key_of("device", str(value))
            age = seen[name].sight(k, t)
            if age == 0.0:
                reporters[name].pend(k)
            if age <= new_here_s:
                count = views.get(name, {}).get(k, 0)
        hits.append(count)
    return hits
