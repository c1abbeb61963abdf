"""Streaming features: per-entity state in a key-value store, O(1) amortised work per event.

:class:`FeatureExtractor` turns one transaction into a flat ``dict[str, float]`` computed from
what happened *before* it, then folds the transaction into the state. The state lives behind
:class:`KeyValueState` (``get`` and item assignment on string keys with plain JSON-able values),
so the same code runs on a ``dict`` here and on a faust ``Table`` in the workers. Values are
always re-assigned after a change, so stores that persist on assignment see every update.

Per entity (customer ``c:``, payment instrument ``p:``, device ``d:``, IP ``i:``, coupon ``k:``)
the state holds the timestamps and amounts of its last 24 h of events, capped at
:data:`MAX_EVENTS` (beyond that the window counts saturate), so 10 min / 1 h / 24 h counts and
amount sums are exact sliding windows. Timestamps that go backwards are treated as the entity's
last timestamp, so results depend only on the order of events: same order, same features.

Label history (what fraud systems lean on most): :meth:`FeatureExtractor.learn_label` folds a
label into the customer, instrument and device state when the label becomes *known* (a delayed
chargeback arrives weeks later), and each transaction then gets, per entity, the count and the
smoothed rate of frauds among the labelled events of the last 14 and 60 days: only labels known
before the transaction count.

>>> fx = FeatureExtractor()
>>> state: dict = {}
>>> tx = {"occurred_at": 1000.0, "amount": 20.0, "customer_id": "c1",
...       "payment_instrument": "p1", "device_id": "d1", "ip": "10.0.0.1"}
>>> first = fx.extract(tx, state)
>>> first["customer_new"], first["customer_n_1h"], first["customer_new_device"]
(1.0, 0.0, 1.0)
>>> second = fx.extract({**tx, "occurred_at": 1030.0, "amount": 25.0}, state)
>>> second["customer_n_10m"], second["customer_new_device"], second["customer_since_last_log"]
(1.0, 0.0, 3.4339872044851463)
>>> sorted(state)
['c:c1', 'd:d1', 'i:10.0.0.1', 'p:p1']
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_right, insort
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol

import orjson

from fraud.schema import Transaction, parse_timestamp

WINDOWS: Final = ((600.0, "10m"), (3600.0, "1h"), (86400.0, "24h"))
HORIZON: Final = 86400.0
MAX_EVENTS: Final = 256
MAX_DISTINCT: Final = 32
MAX_COUPONS: Final = 8
NEVER_SEEN_GAP: Final = 30 * 86400.0
LABEL_WINDOWS: Final = ((14 * 86400.0, "14d"), (60 * 86400.0, "60d"))
LABEL_HORIZON: Final = 60 * 86400.0
MAX_LABELS: Final = 512


class KeyValueState(Protocol):
    """Where feature state lives: a ``dict``, a faust ``Table``, anything with these two.

    Values are plain data (dicts of lists/floats/strings), JSON- and msgpack-safe.
    """

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def __setitem__(self, key: str, value: Any, /) -> None: ...


def _feature_names() -> tuple[str, ...]:
    def entity(name: str) -> list[str]:
        return [*(f"{name}_n_{w}" for _, w in WINDOWS), *(f"{name}_amt_{w}" for _, w in WINDOWS),
                f"{name}_since_last_log"]

    return (
        "amount_log", "item_count", "address_mismatch", "channel_web", "channel_app",
        "channel_pos", "has_coupon", "hour_sin", "hour_cos",
        *entity("customer"), "customer_amount_z", "customer_new", "customer_new_device",
        "customer_devices", "customer_new_ip",
        *entity("instrument"),
        *entity("device"), "device_instruments", "device_customers", "coupon_reuse_rate",
        *entity("ip"),
        "coupon_n_1h", "coupon_n_24h",
        *(f"{name}_{kind}_{w}" for name in ("customer", "instrument", "device")
          for _, w in LABEL_WINDOWS for kind in ("frauds", "fraud_rate")),
    )


FEATURE_NAMES: Final = tuple(sys.intern(name) for name in _feature_names())
"""Every key :meth:`FeatureExtractor.extract` returns, in a stable order."""

_NEVER_LOG: Final = math.log1p(NEVER_SEEN_GAP)
_NO_WINDOWS: Final = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, _NEVER_LOG)
_log1p = math.log1p
_sqrt = math.sqrt
_sin = math.sin
_cos = math.cos

Windows = tuple[float, float, float, float, float, float, float]
_NO_LABELS: Final = (0.0, 0.0, 0.0, 0.0)


def _label_risk(st: dict[str, Any], ts: float) -> tuple[float, float, float, float]:
    """``(log1p frauds, fraud rate)`` over each of :data:`LABEL_WINDOWS` of known labels.

    The rate is smoothed (``frauds / (labelled + 1)``) so one labelled fraud is not 100 %.
    """
    lt: list[float] | None = st.get("lt")
    if not lt:
        return _NO_LABELS
    lf: list[float] = st["lf"]
    n = len(lt)
    m = len(lf)
    t0 = ts - 14 * 86400.0
    n0 = n - bisect_right(lt, t0)
    f0 = m - bisect_right(lf, t0) if m else 0
    if lt[0] > ts - LABEL_HORIZON:
        n1, f1 = n, m
    else:
        t1 = ts - LABEL_HORIZON
        n1 = n - bisect_right(lt, t1)
        f1 = m - bisect_right(lf, t1) if m else 0
    return (_log1p(f0), f0 / (n0 + 1.0), _log1p(f1), f1 / (n1 + 1.0))


def _add_label(st: dict[str, Any], ts: float, is_fraud: bool) -> None:
    """Insert a labelled event at its own time; keep :data:`LABEL_HORIZON` before the newest."""
    lt: list[float] = st.setdefault("lt", [])
    lf: list[float] = st.setdefault("lf", [])
    insort(lt, ts)
    if is_fraud:
        insort(lf, ts)
    cut = lt[-1] - LABEL_HORIZON
    if lt[0] <= cut or len(lt) > MAX_LABELS:
        k = max(bisect_right(lt, cut), len(lt) - MAX_LABELS)
        cut = lt[k - 1]
        del lt[:k]
        if lf and lf[0] <= cut:
            del lf[:bisect_right(lf, cut)]


def _windows(st: dict[str, Any], ts: float, amount: float) -> Windows:
    """The entity's window features from ``st`` (events before ``ts``), then add the event.

    Returns ``(n_10m, n_1h, n_24h, amt_10m, amt_1h, amt_24h, since_last_log)``. A timestamp
    earlier than the entity's last one is treated as that last one.
    """
    t: list[float] = st["t"]
    a: list[float] = st["a"]
    last = st.get("last")
    if last is None:
        out: Windows = _NO_WINDOWS
    else:
        if ts < last:
            ts = last
        since = _log1p(ts - last)
        _prune(t, a, ts)
        n = len(t)
        if not n:
            out = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, since)
        elif t[0] > ts - 600.0:  # everything inside the shortest window
            fn = float(n)
            s = _log1p(sum(a))
            out = (fn, fn, fn, s, s, s, since)
        else:
            i1 = bisect_right(t, ts - 3600.0)
            i0 = bisect_right(t, ts - 600.0, i1)
            s0 = sum(a[i0:]) if i0 < n else 0.0
            s1 = s0 + sum(a[i1:i0]) if i1 < i0 else s0
            out = (float(n - i0), float(n - i1), float(n), _log1p(s0), _log1p(s1),
                   _log1p(s1 + sum(a[:i1]) if i1 else s1), since)
    _add(st, t, a, ts, amount)
    return out


def _counts(st: dict[str, Any], ts: float, amount: float) -> tuple[float, float]:
    """``(n_1h, n_24h)`` of :func:`_windows` (same state update), without the amount sums."""
    t: list[float] = st["t"]
    a: list[float] = st["a"]
    last = st.get("last")
    if last is None:
        n1 = n24 = 0.0
    else:
        if ts < last:
            ts = last
        _prune(t, a, ts)
        n = len(t)
        n24 = float(n)
        n1 = float(n - bisect_right(t, ts - 3600.0)) if n and t[0] <= ts - 600.0 else n24
    _add(st, t, a, ts, amount)
    return n1, n24


def _prune(t: list[float], a: list[float], ts: float) -> None:
    """Drop the events that are more than :data:`HORIZON` before ``ts``."""
    if t and t[0] <= ts - HORIZON:
        k = bisect_right(t, ts - HORIZON)
        del t[:k]
        del a[:k]


def _add(st: dict[str, Any], t: list[float], a: list[float], ts: float, amount: float) -> None:
    """Append the event (dropping the oldest beyond :data:`MAX_EVENTS`); it is the last now."""
    if len(t) >= MAX_EVENTS:
        del t[0]
        del a[0]
    t.append(ts)
    a.append(amount)
    st["last"] = ts


def _new_entity() -> dict[str, Any]:
    return {"t": [], "a": [], "last": None}


def _remember(items: list[str], value: str, cap: int = MAX_DISTINCT) -> bool:
    """Add ``value`` to a capped distinct list (oldest dropped first); True if it was new."""
    if value in items:
        return False
    items.append(value)
    if len(items) > cap:
        del items[0]
    return True


_TWO_PI_PER_DAY: Final = 2.0 * math.pi / 86400.0
_dumps = orjson.dumps  # floats in their shortest exact form: decoded, bit for bit the same
_loads = orjson.loads


ENTITY_KINDS: Final = ("c", "p", "d", "i", "k")
"""The entities of a transaction, as the prefixes of their state keys: customer, payment
instrument, device, IP, coupon."""
MAX_REMEMBERED: Final = 8
"""Transactions whose fragment an entity remembers (:meth:`FeatureExtractor.fragment`)."""
FRAGMENT_SIZES: Final = {"c": 16, "p": 11, "d": 14, "i": 7, "k": 2}
"""How many values each entity kind's fragment holds."""


def local_features(ts: float, amount: float, channel: str, coupon: str | None,
                   item_count: int, address_mismatch: bool) -> list[float]:
    """The features of the transaction alone (no state)."""
    angle = (ts % 86400.0) * _TWO_PI_PER_DAY
    return [
        _log1p(amount), float(item_count), 1.0 if address_mismatch else 0.0,
        1.0 if channel == "web" else 0.0, 1.0 if channel == "app" else 0.0,
        1.0 if channel == "pos" else 0.0, 1.0 if coupon else 0.0,
        _sin(angle), _cos(angle),
    ]


def assemble(local: list[float], c: list[float], p: list[float], d: list[float],
             i: list[float], k: list[float]) -> list[float]:
    """The feature vector (:data:`FEATURE_NAMES` order) from the local features and each
    entity kind's fragment."""
    return [*local, *c[:12], *p[:7], *d[:10], *i, *k, *c[12:], *p[7:], *d[10:]]


_ABSENT: Final = {
    "p": [*_NO_WINDOWS, *_NO_LABELS],
    "d": [*_NO_WINDOWS, 0.0, 0.0, 0.0, *_NO_LABELS],
    "i": list(_NO_WINDOWS),
    "k": [0.0, 0.0],
}


def _absent(kind: str, device: str | None, ip: str | None) -> list[float]:
    """The fragment of an entity the transaction does not have."""
    if kind == "c":
        return [*_NO_WINDOWS, 0.0, 1.0, 0.0 if device is None else 1.0, 0.0,
                0.0 if ip is None else 1.0, *_NO_LABELS]
    return list(_ABSENT[kind])


def _customer(cs: dict[str, Any], ts: float, amount: float, device: str | None,
              ip: str | None) -> list[float]:
    """The customer's fragment: windows, amount z-score, new device or IP, label history."""
    amount_log = _log1p(amount)
    cw = _windows(cs, ts, amount)
    n = cs.get("n", 0)
    if n:
        mu = cs["mu"]
        m2 = cs["m2"]
        var = m2 / n  # tested, not m2: a subnormal m2 divided by n can round to 0
        if n >= 2 and var > 0.0:
            z = (amount_log - mu) / _sqrt(var)
            amount_z = -10.0 if z < -10.0 else 10.0 if z > 10.0 else z
        else:
            amount_z = 0.0
        n1 = n + 1
        d = amount_log - mu
        mu += d / n1
        cs["mu"] = mu
        cs["m2"] = m2 + d * (amount_log - mu)
        cs["n"] = n1
        devs: list[str] = cs["dev"]
        new_device = 1.0 if device is not None and _remember(devs, device) else 0.0
        new_ip = 1.0 if ip is not None and _remember(cs["ip"], ip) else 0.0
        customer_new = 0.0
    else:
        amount_z = 0.0
        cs["mu"] = amount_log
        cs["m2"] = 0.0
        cs["dev"] = devs = [] if device is None else [device]
        cs["ip"] = [] if ip is None else [ip]
        cs["n"] = 1
        new_device = 0.0 if device is None else 1.0
        new_ip = 0.0 if ip is None else 1.0
        customer_new = 1.0
    return [*cw, amount_z, customer_new, new_device, float(len(devs)), new_ip,
            *_label_risk(cs, ts)]


def _device(ds: dict[str, Any], ts: float, amount: float, instrument: str | None,
            customer: str | None, coupon: str | None) -> list[float]:
    """The device's fragment: windows, distinct instruments and customers, coupon reuse,
    label history."""
    dw = _windows(ds, ts, amount)
    if "pi" not in ds:
        ds["pi"] = []
        ds["cu"] = []
        ds["k"] = {}
        ds["n"] = 0
    pis: list[str] = ds["pi"]
    cus: list[str] = ds["cu"]
    if instrument is not None:
        _remember(pis, instrument)
    if customer is not None:
        _remember(cus, customer)
    dn = ds["n"]
    reuse = 0.0
    if coupon:
        codes: dict[str, int] = ds["k"]
        used = codes.get(coupon, 0)
        reuse = used / (dn + 1.0)
        if used or len(codes) < MAX_COUPONS:
            codes[coupon] = used + 1
    ds["n"] = dn + 1
    return [*dw, float(len(pis)), float(len(cus)), reuse, *_label_risk(ds, ts)]


class FeatureExtractor:
    """Compute the streaming feature vector of a transaction and update the entity state.

    ``extract`` accepts a :class:`~fraud.schema.Transaction` or a mapping with the same field
    names (missing optional entities just yield zero features). ``prefix`` namespaces the state
    keys, e.g. per retailer when several retailers share one store.

    :meth:`extract_values` is the same computation as a list in :data:`FEATURE_NAMES` order
    (no dict), for callers that keep vectors positionally.
    """

    __slots__ = ("_kc", "_kd", "_ki", "_kk", "_kp", "_prefix")

    names: tuple[str, ...] = FEATURE_NAMES

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    @property
    def prefix(self) -> str:
        """Namespace of this extractor's state keys."""
        return self._prefix

    @prefix.setter
    def prefix(self, prefix: str) -> None:
        self._prefix = prefix
        self._kc = prefix + "c:"
        self._kp = prefix + "p:"
        self._kd = prefix + "d:"
        self._ki = prefix + "i:"
        self._kk = prefix + "k:"

    def extract(
        self, tx: Transaction | Mapping[str, Any], state: KeyValueState
    ) -> dict[str, float]:
        """Features of ``tx`` from the state *before* it; then fold ``tx`` into ``state``."""
        return dict(zip(FEATURE_NAMES, self.extract_values(tx, state), strict=True))

    def extract_values(
        self, tx: Transaction | Mapping[str, Any], state: KeyValueState
    ) -> list[float]:
        """:meth:`extract` as a list of values in :data:`FEATURE_NAMES` order."""
        if isinstance(tx, Transaction):
            return self._values(
                state, tx.occurred_at, tx.amount, tx.customer_id, tx.payment_instrument,
                tx.device_id, tx.ip, tx.channel, tx.coupon_code, tx.item_count,
                tx.address_mismatch,
            )
        g = tx.get
        ts = g("occurred_at")
        if not isinstance(ts, int | float):
            ts = parse_timestamp(ts, "occurred_at") if ts else 0.0
        return self._values(
            state, float(ts), float(g("amount") or 0.0),
            _opt(g("customer_id")), _opt(g("payment_instrument")), _opt(g("device_id")),
            _opt(g("ip")), str(g("channel") or "web"), _opt(g("coupon_code")),
            int(g("item_count") or 1), bool(g("address_mismatch") or False),
        )

    def extract_many(
        self, txs: Iterable[Transaction | Mapping[str, Any]], state: KeyValueState
    ) -> list[dict[str, float]]:
        """``extract`` for each transaction, in order."""
        values = self.extract_values
        names = FEATURE_NAMES
        return [dict(zip(names, values(tx, state), strict=True)) for tx in txs]

    def extract_fields(
        self,
        state: KeyValueState,
        ts: float,
        amount: float,
        customer: str | None,
        instrument: str | None,
        device: str | None = None,
        ip: str | None = None,
        channel: str = "web",
        coupon: str | None = None,
        item_count: int = 1,
        address_mismatch: bool = False,
    ) -> dict[str, float]:
        """The primitive form of :meth:`extract`; ``None`` entities give zero features."""
        return dict(zip(FEATURE_NAMES, self._values(
            state, ts, amount, customer, instrument, device, ip, channel, coupon, item_count,
            address_mismatch), strict=True))

    def _values(
        self,
        state: KeyValueState,
        ts: float,
        amount: float,
        customer: str | None,
        instrument: str | None,
        device: str | None,
        ip: str | None,
        channel: str,
        coupon: str | None,
        item_count: int,
        address_mismatch: bool,
        tx_id: str | None = None,
    ) -> list[float]:
        fragment = self.fragment
        return assemble(
            local_features(ts, amount, channel, coupon, item_count, address_mismatch),
            fragment(state, "c", customer, tx_id, ts, amount, customer, instrument, device, ip,
                     coupon),
            fragment(state, "p", instrument, tx_id, ts, amount, customer, instrument, device,
                     ip, coupon),
            fragment(state, "d", device, tx_id, ts, amount, customer, instrument, device, ip,
                     coupon),
            fragment(state, "i", ip, tx_id, ts, amount, customer, instrument, device, ip,
                     coupon),
            fragment(state, "k", coupon or None, tx_id, ts, amount, customer, instrument,
                     device, ip, coupon),
        )

    def extract_remembered(self, tx: Transaction, state: KeyValueState) -> list[float]:
        """:meth:`extract_values` of a transaction that may be delivered again: each entity
        remembers the fragment it gave the last :data:`MAX_REMEMBERED` transactions (by
        ``tx_id``) and gives a repeated one the same fragment without counting it again."""
        return self._values(
            state, tx.occurred_at, tx.amount, tx.customer_id, tx.payment_instrument,
            tx.device_id, tx.ip, tx.channel, tx.coupon_code, tx.item_count,
            tx.address_mismatch, tx.tx_id)

    def fragment(
        self,
        state: KeyValueState,
        kind: str,
        entity: str | None,
        tx_id: str | None,
        ts: float,
        amount: float,
        customer: str | None,
        instrument: str | None,
        device: str | None,
        ip: str | None,
        coupon: str | None,
    ) -> list[float]:
        """The features one entity (``kind`` one of :data:`ENTITY_KINDS`, ``entity`` its id,
        None: absent) gives a transaction, from its state before it; then the transaction
        is folded into that state. Only the state of ``kind + ":" + entity`` is read or
        written, so the entity's owner can compute it alone (:func:`assemble` puts the
        fragments together).

        With ``tx_id``, a transaction the entity has already applied (among its last
        :data:`MAX_REMEMBERED`) gets the fragment it got then, and the state is unchanged.
        The state keeps those ids (``"fi"``, oldest first) and fragments as their JSON text
        (``"fv"``): a stored state then decodes and encodes without parsing or writing their
        floats again, which only a repeated transaction reads.
        """
        if entity is None:
            return _absent(kind, device, ip)
        key = self._prefix + kind + ":" + entity
        st = state.get(key) or _new_entity()
        if tx_id is not None:
            ids: list[str] | None = st.get("fi")
            if ids is None and "f" in st:
                ids = _upgrade_remembered(st)
            if ids is not None and tx_id in ids:
                return _loads(st["fv"][ids.index(tx_id)])
        if kind == "c":
            out = _customer(st, ts, amount, device, ip)
        elif kind == "p":
            out = [*_windows(st, ts, amount), *_label_risk(st, ts)]
        elif kind == "d":
            out = _device(st, ts, amount, instrument, customer, coupon)
        elif kind == "i":
            out = list(_windows(st, ts, amount))
        elif kind == "k":
            out = list(_counts(st, ts, amount))
        else:
            raise ValueError(f"unknown entity kind {kind!r}")
        if tx_id is not None:
            ids = st.get("fi")
            if ids is None:
                ids = st["fi"] = []
                st["fv"] = []
            encoded: list[str] = st["fv"]
            ids.append(tx_id)
            encoded.append(_dumps(out).decode())
            if len(ids) > MAX_REMEMBERED:
                del ids[0]
                del encoded[0]
        state[key] = st
        return out

    def learn_label(
        self,
        state: KeyValueState,
        ts: float,
        customer: str | None,
        instrument: str | None,
        device: str | None,
        is_fraud: bool,
    ) -> None:
        """Fold a label that just became known into the label history of the transaction's
        customer, instrument and device (``ts``: when the transaction happened)."""
        for kind, entity in (("c", customer), ("p", instrument), ("d", device)):
            if entity is not None:
                self.learn_entity_label(state, kind, entity, ts, is_fraud)

    def learn_entity_label(self, state: KeyValueState, kind: str, entity: str, ts: float,
                           is_fraud: bool, tx_id: str | None = None) -> bool:
        """:meth:`learn_label` for one entity (so its owner can apply it alone); with
        ``tx_id``, a label of a transaction among the entity's last :data:`MAX_REMEMBERED`
        labelled ones is not counted again (``"li"``). Whether it was counted.

        >>> fx, state = FeatureExtractor(), {}
        >>> [fx.learn_entity_label(state, "d", "d1", 5.0, True, "t1") for _ in range(2)]
        [True, False]
        >>> state["d:d1"]["lt"], state["d:d1"]["lf"], state["d:d1"]["li"]
        ([5.0], [5.0], ['t1'])
        """
        key = self._prefix + kind + ":" + entity
        st = state.get(key) or _new_entity()
        if tx_id is not None and not _remember(st.setdefault("li", []), tx_id, MAX_REMEMBERED):
            return False
        _add_label(st, ts, is_fraud)
        state[key] = st
        return True


def _upgrade_remembered(st: dict[str, Any]) -> list[str]:
    """Turn a state's remembered fragments as written before they were kept encoded
    (``"f": {tx_id: values}``) into ``"fi"``/``"fv"``; the ids."""
    seen: dict[str, list[float]] = st.pop("f")
    ids = st["fi"] = list(seen)
    st["fv"] = [_dumps(values).decode() for values in seen.values()]
    return ids


def _opt(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
