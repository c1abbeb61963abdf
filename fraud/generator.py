"""Synthetic multi-retailer transactions with labelled fraud scenarios and delayed labels.

Customers have a home retailer and sometimes shop at others; each has a spending profile,
devices, IPs, payment instruments and a preferred channel. Retailers have stores with
terminals (a POS row's ``device_id`` is its terminal). Fraud scenarios, each row tagged with
its ``scenario``:

* ``large_amount``: a customer's card used for an amount far above their profile;
* ``compromised_terminal``: an insider runs cloned cards through one terminal at night;
* ``card_cross_retailer``: a stolen card used at one retailer, then at others, from new
  guest accounts on one fraudster device;
* ``coupon_abuse``: many new accounts on one device redeem a single-use code;
* ``bot_burst``: card testing, dozens of small payments from one device/IP within minutes;
* ``account_takeover``: an existing customer on a new device and IP, shipping elsewhere.

Labels arrive late: chargebacks 5-45 days after the purchase, analyst verdicts within hours
to days; a legitimate row is confirmed when its 30-day chargeback window closes (source
``chargeback``) or sooner if an analyst reviewed it. Rows come out in time order, and the same
seed gives the same rows.

>>> rows = list(generate(GeneratorConfig(retailers=2, days=2, tx_per_day=50, seed=1)))
>>> rows == list(generate(GeneratorConfig(retailers=2, days=2, tx_per_day=50, seed=1)))
True
>>> sorted({r["retailer_id"] for r in rows})
['retailer_1', 'retailer_2']
>>> all(a["occurred_at"] <= b["occurred_at"] for a, b in zip(rows, rows[1:]))
True
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from fraud.schema import format_timestamp

DAY: Final = 86400.0
COLUMNS: Final = (
    "tx_id", "retailer_id", "occurred_at", "amount", "currency", "customer_id",
    "payment_instrument", "device_id", "ip", "channel", "store_id", "terminal_id",
    "coupon_code", "item_count", "address_mismatch", "is_fraud", "scenario", "label_source",
    "labelled_at",
)
SCENARIOS: Final = ("large_amount", "compromised_terminal", "card_cross_retailer",
                    "coupon_abuse", "bot_burst", "account_takeover")
LEGIT_CODES: Final = ("SPRING10", "SAVE5", "VIP20", "FREESHIP")
# share of the day's purchases per hour (UTC), shops busy in the day and evening
HOUR_WEIGHTS: Final = (1, 1, 1, 1, 1, 2, 3, 5, 7, 8, 9, 10, 11, 10, 9, 9, 10, 11, 12, 11, 9,
                       6, 4, 2)


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """How much to generate. ``tx_per_day`` is per retailer; ``fraud_scale`` scales campaigns."""

    retailers: int = 3
    days: int = 60
    seed: int = 7
    tx_per_day: int = 1000
    fraud_scale: float = 1.0
    start: float = 1767225600.0  # 2026-01-01T00:00:00Z


@dataclass(slots=True)
class _Customer:
    id: str
    home: int
    mu: float
    sigma: float
    devices: list[str]
    ips: list[str]
    instruments: list[str]
    channel_weights: tuple[float, float, float]
    store: int
    wanders: float


@dataclass(slots=True)
class _Retailer:
    id: str
    stores: list[tuple[str, list[str]]]
    customers: list[_Customer]


class _World:
    def __init__(self, cfg: GeneratorConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        rng = self.rng
        self.serial = 0
        self.retailers: list[_Retailer] = []
        for r in range(cfg.retailers):
            stores = []
            for s in range(rng.randint(3, 8)):
                terminals = [f"term_{r + 1}_{s + 1}_{t + 1}" for t in range(rng.randint(2, 4))]
                stores.append((f"store_{r + 1}_{s + 1}", terminals))
            self.retailers.append(_Retailer(f"retailer_{r + 1}", stores, []))
        self.customers: list[_Customer] = []
        per_retailer = max(20, cfg.tx_per_day * 4)
        for r, retailer in enumerate(self.retailers):
            for _ in range(per_retailer):
                c = self._new_customer(r)
                retailer.customers.append(c)
                self.customers.append(c)
        self.hour_cum = list(_cumulative(HOUR_WEIGHTS))

    def token(self, prefix: str, nbytes: int = 6) -> str:
        return f"{prefix}_{self.rng.getrandbits(nbytes * 8):0{nbytes * 2}x}"

    def ip(self) -> str:
        g = self.rng.getrandbits
        return f"{10 + g(7)}.{g(8)}.{g(8)}.{1 + g(7)}"

    def _new_customer(self, home: int) -> _Customer:
        rng = self.rng
        self.serial += 1
        web, app, pos = rng.random(), rng.random() * 0.8, rng.random() * 1.2
        total = web + app + pos
        return _Customer(
            id=f"cust_{self.serial:07d}",
            home=home,
            mu=math.log(rng.uniform(12.0, 140.0)),
            sigma=rng.uniform(0.35, 0.8),
            devices=[self.token("dev") for _ in range(rng.choice((1, 1, 1, 2)))],
            ips=[self.ip() for _ in range(rng.choice((1, 1, 2)))],
            instruments=[self.token("pi", 8) for _ in range(rng.choice((1, 1, 1, 2)))],
            channel_weights=(web / total, (web + app) / total, 1.0),
            store=rng.randrange(len(self.retailers[home].stores)),
            wanders=rng.choice((0.0, 0.0, 0.05, 0.1, 0.3)),
        )

    def time_in_day(self, day_start: float) -> float:
        rng = self.rng
        hour = _pick(self.hour_cum, rng.random() * self.hour_cum[-1])
        return day_start + hour * 3600.0 + rng.random() * 3600.0

    def row(self, ts: float, r: int, c: _Customer | None, amount: float, *, channel: str,
            instrument: str, customer_id: str, device: str | None = None, ip: str | None = None,
            store: tuple[str, str] | None = None, coupon: str | None = None,
            mismatch: bool = False, scenario: str = "") -> dict[str, Any]:
        rng = self.rng
        if channel == "pos":
            if store is None:
                s = self.retailers[r].stores[c.store if c and c.home == r else
                                            rng.randrange(len(self.retailers[r].stores))]
                store = (s[0], rng.choice(s[1]))
            device, ip = store[1], None
        return {
            "occurred_at": ts,
            "retailer_id": self.retailers[r].id,
            "amount": round(max(0.5, amount), 2),
            "currency": "EUR",
            "customer_id": customer_id,
            "payment_instrument": instrument,
            "device_id": device,
            "ip": ip,
            "channel": channel,
            "store_id": store[0] if store else None,
            "terminal_id": store[1] if store else None,
            "coupon_code": coupon,
            "item_count": 1 + min(int(rng.expovariate(0.7)), 20),
            "address_mismatch": mismatch,
            "is_fraud": bool(scenario),
            "scenario": scenario,
        }

    def legit(self, ts: float, r: int) -> dict[str, Any]:
        rng = self.rng
        home = self.retailers[r].customers
        c = rng.choice(home)
        if c.wanders and rng.random() < 0.5:
            # someone from another retailer who also shops here
            other = rng.choice(self.customers)
            if other.wanders and rng.random() < other.wanders * 3:
                c = other
        u = rng.random()
        cw = c.channel_weights
        channel = "web" if u < cw[0] else "app" if u < cw[1] else "pos"
        coupon = rng.choice(LEGIT_CODES) if rng.random() < 0.06 else None
        return self.row(
            ts, r, c, math.exp(rng.gauss(c.mu, c.sigma)), channel=channel,
            instrument=rng.choice(c.instruments), customer_id=c.id,
            device=rng.choice(c.devices), ip=rng.choice(c.ips), coupon=coupon,
            mismatch=rng.random() < 0.03,
        )

    # -- fraud campaigns: each returns rows, possibly reaching into the following days --------
    def large_amount(self, day: float, r: int) -> list[dict[str, Any]]:
        rng = self.rng
        c = rng.choice(self.retailers[r].customers)
        amount = math.exp(c.mu + 3 * c.sigma) * rng.uniform(3.0, 12.0)
        return [self.row(self.time_in_day(day), r, c, amount, channel=rng.choice(("web", "app")),
                         instrument=rng.choice(c.instruments), customer_id=c.id,
                         device=rng.choice(c.devices), ip=rng.choice(c.ips),
                         mismatch=rng.random() < 0.4, scenario="large_amount")]

    def compromised_terminal(self, day: float, r: int) -> list[dict[str, Any]]:
        rng = self.rng
        store_id, terminals = rng.choice(self.retailers[r].stores)
        terminal = rng.choice(terminals)
        t = day + rng.uniform(0.5, 4.0) * 3600.0
        rows = []
        for _ in range(rng.randint(8, 25)):
            victim = rng.choice(self.customers)
            t += rng.expovariate(1 / 240.0)
            rows.append(self.row(t, r, victim, rng.choice((100, 150, 200, 250, 300, 400, 500)),
                                 channel="pos", instrument=rng.choice(victim.instruments),
                                 customer_id=victim.id, store=(store_id, terminal),
                                 scenario="compromised_terminal"))
        return rows

    def card_cross_retailer(self, day: float, r: int) -> list[dict[str, Any]]:
        rng = self.rng
        victim = rng.choice(self.customers)
        card = rng.choice(victim.instruments)
        device, ip = self.token("dev"), self.ip()
        order = [r, *rng.sample([i for i in range(len(self.retailers)) if i != r],
                                k=min(len(self.retailers) - 1, rng.randint(1, 3)))]
        t = self.time_in_day(day)
        rows = []
        for where in order:
            guest = self.token("guest")
            for _ in range(rng.randint(1, 4)):
                t += rng.expovariate(1 / 600.0)
                rows.append(self.row(t, where, None, rng.uniform(150.0, 1500.0),
                                     channel=rng.choice(("web", "web", "app")), instrument=card,
                                     customer_id=guest, device=device, ip=ip,
                                     mismatch=rng.random() < 0.6, scenario="card_cross_retailer"))
            t += rng.uniform(0.5, 6.0) * 3600.0
        return rows

    def coupon_abuse(self, day: float, r: int) -> list[dict[str, Any]]:
        rng = self.rng
        device = self.token("dev")
        ips = [self.ip() for _ in range(rng.randint(1, 3))]
        code = rng.choice(("WELCOME50", "STAFF40", "FIRSTORDER"))
        t = self.time_in_day(day)
        rows = []
        for _ in range(rng.randint(6, 20)):
            t += rng.expovariate(1 / 500.0)
            rows.append(self.row(t, r, None, rng.uniform(40.0, 180.0),
                                 channel=rng.choice(("web", "app")),
                                 instrument=self.token("pi", 8), customer_id=self.token("acct"),
                                 device=device, ip=rng.choice(ips), coupon=code,
                                 mismatch=rng.random() < 0.3, scenario="coupon_abuse"))
        return rows

    def bot_burst(self, day: float, r: int) -> list[dict[str, Any]]:
        rng = self.rng
        device, ip = self.token("dev"), self.ip()
        account = self.token("guest")
        t = self.time_in_day(day)
        rows = []
        for _ in range(rng.randint(15, 50)):
            t += rng.uniform(0.5, 6.0)
            rows.append(self.row(t, r, None, rng.uniform(1.0, 9.0), channel="web",
                                 instrument=self.token("pi", 8), customer_id=account,
                                 device=device, ip=ip, scenario="bot_burst"))
        return rows

    def account_takeover(self, day: float, r: int) -> list[dict[str, Any]]:
        rng = self.rng
        c = rng.choice(self.retailers[r].customers)
        device, ip = self.token("dev"), self.ip()
        t = self.time_in_day(day)
        rows = []
        for _ in range(rng.randint(1, 3)):
            t += rng.expovariate(1 / 900.0)
            amount = math.exp(c.mu + c.sigma) * rng.uniform(2.0, 8.0)
            rows.append(self.row(t, r, c, amount, channel=rng.choice(("web", "app")),
                                 instrument=rng.choice(c.instruments), customer_id=c.id,
                                 device=device, ip=ip, mismatch=rng.random() < 0.85,
                                 scenario="account_takeover"))
        return rows


def _cumulative(weights: Iterable[float]) -> Iterator[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


def _pick(cum: list[float], u: float) -> int:
    for i, edge in enumerate(cum):
        if u < edge:
            return i
    return len(cum) - 1


# expected campaigns per retailer per day, before ``fraud_scale``
_CAMPAIGN_RATES: Final = {
    "large_amount": 1.0,
    "compromised_terminal": 0.05,
    "card_cross_retailer": 0.25,
    "coupon_abuse": 0.15,
    "bot_burst": 0.12,
    "account_takeover": 1.0,
}


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _label(rng: random.Random, row: dict[str, Any]) -> None:
    ts = row["occurred_at"]
    if row["is_fraud"]:
        if rng.random() < 0.6:
            row["label_source"], delay = "chargeback", rng.uniform(5.0, 45.0) * DAY
        else:
            row["label_source"], delay = "analyst", rng.uniform(1.0, 72.0) * 3600.0
    elif rng.random() < 0.03:
        row["label_source"], delay = "analyst", rng.uniform(2.0, 48.0) * 3600.0
    else:
        row["label_source"], delay = "chargeback", 30.0 * DAY
    row["labelled_at"] = ts + delay


def generate(cfg: GeneratorConfig) -> Iterator[dict[str, Any]]:
    """Rows in time order; ``occurred_at``/``labelled_at`` are epoch seconds (floats)."""
    if cfg.retailers < 1 or cfg.days < 1 or cfg.tx_per_day < 1:
        raise ValueError("retailers, days and tx_per_day must be >= 1")
    world = _World(cfg)
    rng = world.rng
    pending: list[tuple[float, int, dict[str, Any]]] = []
    serial = 0
    counter = 0
    for d in range(cfg.days):
        day = cfg.start + d * DAY
        for r in range(cfg.retailers):
            for _ in range(_poisson(rng, cfg.tx_per_day)):
                row = world.legit(world.time_in_day(day), r)
                heapq.heappush(pending, (row["occurred_at"], serial, row))
                serial += 1
            for name, rate in _CAMPAIGN_RATES.items():
                for _ in range(_poisson(rng, rate * cfg.fraud_scale * cfg.tx_per_day / 1000.0)):
                    for row in getattr(world, name)(day, r):
                        heapq.heappush(pending, (row["occurred_at"], serial, row))
                        serial += 1
        end = day + DAY if d < cfg.days - 1 else math.inf
        while pending and pending[0][0] < end:
            _, _, row = heapq.heappop(pending)
            counter += 1
            row["tx_id"] = f"tx_{counter:09d}"
            _label(rng, row)
            yield row


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return value


def write_rows(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write rows as CSV or JSONL (by extension); timestamps in ISO 8601. Returns the count."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"output must end in .csv or .jsonl, got {path.name!r}")
    n = 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        out: TextIO = fh
        if suffix == ".csv":
            writer = csv.writer(out)
            writer.writerow(COLUMNS)
            for row in rows:
                row = {**row, "occurred_at": format_timestamp(row["occurred_at"]),
                       "labelled_at": format_timestamp(row["labelled_at"])}
                writer.writerow([_csv_value(row[c]) for c in COLUMNS])
                n += 1
        else:
            for row in rows:
                row = {**row, "occurred_at": format_timestamp(row["occurred_at"]),
                       "labelled_at": format_timestamp(row["labelled_at"])}
                out.write(json.dumps({c: row[c] for c in COLUMNS}, separators=(",", ":")))
                out.write("\n")
                n += 1
    return n
