# Frozen copy of fraud/features.py at commit 6f653c3, before the fast paths, plus the label
# history (v2: per-entity fraud counts and rates over 14 and 60 days of known labels, written
# plainly: every label scanned): the reference for tests/fraud/test_fast_paths.py. Do not edit.
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
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol

from fraud.schema import Transaction, parse_timestamp

STATE_VERSION: Final = 1
WINDOWS: Final = ((600.0, "10m"), (3600.0, "1h"), (86400.0, "24h"))
HORIZON: Final = 86400.0
MAX_EVENTS: Final = 256
MAX_DISTINCT: Final = 32
MAX_COUPONS: Final = 8
NEVER_SEEN_GAP: Final = 30 * 86400.0
ENTITIES: Final = (("customer", "c:"), ("instrument", "p:"), ("device", "d:"), ("ip", "i:"))


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
          for w in ("14d", "60d") for kind in ("frauds", "fraud_rate")),
    )


FEATURE_NAMES: Final = _feature_names()
"""Every key :meth:`FeatureExtractor.extract` returns, in a stable order."""


def _entity_names(entity: str) -> tuple[str, ...]:
    return (*(f"{entity}_n_{w}" for _, w in WINDOWS), *(f"{entity}_amt_{w}" for _, w in WINDOWS),
            f"{entity}_since_last_log")


_NAMES: Final = {e: _entity_names(e) for e in ("customer", "instrument", "device", "ip", "coupon")}
_NEVER_LOG: Final = math.log1p(NEVER_SEEN_GAP)
_log1p = math.log1p


def _windows(st: dict[str, Any], ts: float, amount: float, f: dict[str, float],
             names: tuple[str, ...]) -> None:
    """Fill the entity's window features from ``st`` (events before ``ts``), then add the event.

    A timestamp earlier than the entity's last one is treated as that last one.
    """
    n10, n1, n24, a10, a1, a24, since = names
    t: list[float] = st["t"]
    a: list[float] = st["a"]
    last = st.get("last")
    if last is None:
        f[n10] = f[n1] = f[n24] = f[a10] = f[a1] = f[a24] = 0.0
        f[since] = _NEVER_LOG
    else:
        if ts < last:
            ts = last
        gap = ts - last
        if t and t[0] <= ts - HORIZON:
            k = bisect_right(t, ts - HORIZON)
            del t[:k]
            del a[:k]
        n = len(t)
        if not n:
            f[n10] = f[n1] = f[n24] = f[a10] = f[a1] = f[a24] = 0.0
        elif t[0] > ts - 600.0:  # everything inside the shortest window
            f[n10] = f[n1] = f[n24] = float(n)
            f[a10] = f[a1] = f[a24] = _log1p(sum(a))
        else:
            i1 = bisect_right(t, ts - 3600.0)
            i0 = bisect_right(t, ts - 600.0, i1)
            f[n10] = float(n - i0)
            f[n1] = float(n - i1)
            f[n24] = float(n)
            s0 = sum(a[i0:]) if i0 < n else 0.0
            s1 = s0 + sum(a[i1:i0]) if i1 < i0 else s0
            f[a10] = _log1p(s0)
            f[a1] = _log1p(s1)
            f[a24] = _log1p(s1 + sum(a[:i1]) if i1 else s1)
        f[since] = _log1p(gap)
        if n >= MAX_EVENTS:
            del t[0]
            del a[0]
    t.append(ts)
    a.append(amount)
    st["last"] = ts


def _new_entity() -> dict[str, Any]:
    return {"t": [], "a": [], "last": None}


def _zero_entity(f: dict[str, float], names: tuple[str, ...]) -> None:
    for name in names[:6]:
        f[name] = 0.0
    f[names[6]] = _NEVER_LOG


def _remember(items: list[str], value: str) -> bool:
    """Add ``value`` to a capped distinct list; True if it was new."""
    if value in items:
        return False
    items.append(value)
    if len(items) > MAX_DISTINCT:
        del items[0]
    return True


_TWO_PI_PER_DAY: Final = 2.0 * math.pi / 86400.0


class FeatureExtractor:
    """Compute the streaming feature vector of a transaction and update the entity state.

    ``extract`` accepts a :class:`~fraud.schema.Transaction` or a mapping with the same field
    names (missing optional entities just yield zero features). ``prefix`` namespaces the state
    keys, e.g. per retailer when several retailers share one store.
    """

    names: tuple[str, ...] = FEATURE_NAMES

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def extract(
        self, tx: Transaction | Mapping[str, Any], state: KeyValueState
    ) -> dict[str, float]:
        """Features of ``tx`` from the state *before* it; then fold ``tx`` into ``state``."""
        if isinstance(tx, Transaction):
            return self.extract_fields(
                state, tx.occurred_at, tx.amount, tx.customer_id, tx.payment_instrument,
                tx.device_id, tx.ip, tx.channel, tx.coupon_code, tx.item_count,
                tx.address_mismatch,
            )
        g = tx.get
        ts = g("occurred_at")
        if not isinstance(ts, int | float):
            ts = parse_timestamp(ts, "occurred_at") if ts else 0.0
        return self.extract_fields(
            state, float(ts), float(g("amount") or 0.0),
            _opt(g("customer_id")), _opt(g("payment_instrument")), _opt(g("device_id")),
            _opt(g("ip")), str(g("channel") or "web"), _opt(g("coupon_code")),
            int(g("item_count") or 1), bool(g("address_mismatch") or False),
        )

    def extract_many(
        self, txs: Iterable[Transaction | Mapping[str, Any]], state: KeyValueState
    ) -> list[dict[str, float]]:
        """``extract`` for each transaction, in order."""
        return [self.extract(tx, state) for tx in txs]

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
        pre = self.prefix
        amount_log = math.log1p(amount)
        angle = (ts % 86400.0) * _TWO_PI_PER_DAY
        f: dict[str, float] = {
            "amount_log": amount_log,
            "item_count": float(item_count),
            "address_mismatch": 1.0 if address_mismatch else 0.0,
            "channel_web": 1.0 if channel == "web" else 0.0,
            "channel_app": 1.0 if channel == "app" else 0.0,
            "channel_pos": 1.0 if channel == "pos" else 0.0,
            "has_coupon": 1.0 if coupon else 0.0,
            "hour_sin": math.sin(angle),
            "hour_cos": math.cos(angle),
        }

        # customer: windows, amount history, known devices and IPs
        if customer is not None:
            key = pre + "c:" + customer
            cs = state.get(key) or _new_entity()
            _windows(cs, ts, amount, f, _NAMES["customer"])
            n = cs.get("n", 0)
            # v1 tested m2 > 0 and divided by zero when m2 / n rounded to 0 (a subnormal m2);
            # fixed here as in fraud.features, the only change to this copy
            if n >= 2 and cs["m2"] / n > 0.0:
                z = (amount_log - cs["mu"]) / math.sqrt(cs["m2"] / n)
                f["customer_amount_z"] = -10.0 if z < -10.0 else 10.0 if z > 10.0 else z
            else:
                f["customer_amount_z"] = 0.0
            f["customer_new"] = 0.0 if n else 1.0
            if n:
                n1 = n + 1
                d = amount_log - cs["mu"]
                cs["mu"] += d / n1
                cs["m2"] += d * (amount_log - cs["mu"])
            else:
                n1 = 1
                cs["mu"] = amount_log
                cs["m2"] = 0.0
                cs["dev"] = []
                cs["ip"] = []
            cs["n"] = n1
            devs: list[str] = cs["dev"]
            f["customer_new_device"] = (
                1.0 if device is not None and _remember(devs, device) else 0.0
            )
            f["customer_devices"] = float(len(devs))
            f["customer_new_ip"] = 1.0 if ip is not None and _remember(cs["ip"], ip) else 0.0
            state[key] = cs
        else:
            _zero_entity(f, _NAMES["customer"])
            f["customer_amount_z"] = 0.0
            f["customer_new"] = 1.0
            f["customer_new_device"] = 1.0 if device is not None else 0.0
            f["customer_devices"] = 0.0
            f["customer_new_ip"] = 1.0 if ip is not None else 0.0

        if instrument is not None:
            key = pre + "p:" + instrument
            ps = state.get(key) or _new_entity()
            _windows(ps, ts, amount, f, _NAMES["instrument"])
            state[key] = ps
        else:
            _zero_entity(f, _NAMES["instrument"])

        # device: windows, distinct instruments and customers, coupon reuse
        reuse = 0.0
        if device is not None:
            key = pre + "d:" + device
            ds = state.get(key) or _new_entity()
            _windows(ds, ts, amount, f, _NAMES["device"])
            if "pi" not in ds:
                ds["pi"] = []
                ds["cu"] = []
                ds["k"] = {}
                ds["n"] = 0
            if instrument is not None:
                _remember(ds["pi"], instrument)
            if customer is not None:
                _remember(ds["cu"], customer)
            f["device_instruments"] = float(len(ds["pi"]))
            f["device_customers"] = float(len(ds["cu"]))
            codes: dict[str, int] = ds["k"]
            if coupon:
                used = codes.get(coupon, 0)
                reuse = used / (ds["n"] + 1.0)
                if used or len(codes) < MAX_COUPONS:
                    codes[coupon] = used + 1
            ds["n"] += 1
            state[key] = ds
        else:
            _zero_entity(f, _NAMES["device"])
            f["device_instruments"] = 0.0
            f["device_customers"] = 0.0
        f["coupon_reuse_rate"] = reuse

        if ip is not None:
            key = pre + "i:" + ip
            ist = state.get(key) or _new_entity()
            _windows(ist, ts, amount, f, _NAMES["ip"])
            state[key] = ist
        else:
            _zero_entity(f, _NAMES["ip"])

        if coupon:
            key = pre + "k:" + coupon
            ks = state.get(key) or _new_entity()
            tmp: dict[str, float] = {}
            _windows(ks, ts, amount, tmp, _NAMES["coupon"])
            f["coupon_n_1h"] = tmp["coupon_n_1h"]
            f["coupon_n_24h"] = tmp["coupon_n_24h"]
            state[key] = ks
        else:
            f["coupon_n_1h"] = 0.0
            f["coupon_n_24h"] = 0.0
        for name, kind, entity in (("customer", "c:", customer), ("instrument", "p:", instrument),
                                   ("device", "d:", device)):
            st = (state.get(pre + kind + entity) or {}) if entity is not None else {}
            for days, w in ((14, "14d"), (60, "60d")):
                since = ts - days * 86400.0
                labelled = sum(1 for t in st.get("lt", []) if t > since)
                frauds = sum(1 for t in st.get("lf", []) if t > since)
                f[f"{name}_frauds_{w}"] = math.log1p(frauds)
                f[f"{name}_fraud_rate_{w}"] = frauds / (labelled + 1.0)
        return f

    def learn_label(self, state: KeyValueState, ts: float, customer: str | None,
                    instrument: str | None, device: str | None, is_fraud: bool) -> None:
        """Add the label at its time; keep the 60 days before the newest (at most 512)."""
        for kind, entity in (("c:", customer), ("p:", instrument), ("d:", device)):
            if entity is None:
                continue
            key = self.prefix + kind + entity
            st = state.get(key) or _new_entity()
            lt = sorted([*st.get("lt", []), ts])
            lf = sorted([*st.get("lf", []), ts]) if is_fraud else list(st.get("lf", []))
            cut = lt[-1] - 60 * 86400.0
            drop = max(sum(1 for t in lt if t <= cut), len(lt) - 512)
            if drop:
                cut = lt[drop - 1]
                lt = lt[drop:]
                lf = [t for t in lf if t > cut]
            st["lt"], st["lf"] = lt, lf
            state[key] = st


def _opt(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
