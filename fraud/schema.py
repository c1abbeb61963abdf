"""Canonical records that travel between qsfraud's parts: transactions, labels, decisions.

Every record encodes to versioned JSON (``{"v": 1, "kind": ..., ...}``). Decoding validates
each field and raises :class:`SchemaError` naming the bad one; fields the schema does not know
are kept in ``extras`` rather than dropped.

>>> tx = Transaction.from_dict({"tx_id": "t1", "retailer_id": "acme", "amount": "12.50",
...     "customer_id": "c9", "payment_instrument": "pi_3f2a", "occurred_at": "2026-01-02T03:04:05Z",
...     "loyalty_tier": "gold"})
>>> tx.amount, tx.currency, tx.channel, tx.extras
(12.5, 'EUR', 'web', {'loyalty_tier': 'gold'})
>>> Transaction.from_json(tx.to_json()) == tx
True
>>> Transaction.from_dict({"tx_id": "t1", "retailer_id": "acme", "amount": -3,
...     "customer_id": "c9", "payment_instrument": "x", "occurred_at": 0})
Traceback (most recent call last):
...
fraud.schema.SchemaError: amount: must be >= 0, got -3.0
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Self

SCHEMA_VERSION: Final = 1

CHANNELS: Final = ("web", "app", "pos")
LABEL_SOURCES: Final = ("chargeback", "analyst")
ACTIONS: Final = ("allow", "verify", "hold", "block")
WATCH_FIELDS: Final = {"instrument": "payment_instrument", "device": "device_id"}
"""The entity kinds a federated watchlist may name, and the transaction field of each (here,
not in ``fraud.decisions``: that module loads the models, and River with them)."""

ExtraValue = float | int | str | bool | None


class SchemaError(ValueError):
    """A record failed validation; ``field`` names the offending field, ``reason`` says how
    (``invalid``; ``too-long`` or ``out-of-range`` for a value beyond :class:`InputBounds`)."""

    def __init__(self, field: str, message: str, reason: str = "invalid") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InputBounds:
    """The limits a record from outside must meet before anything of it reaches state.

    One place for all of them: the worker checks the raw record (size, JSON nesting depth,
    digits of an integer: :func:`streams.scoring.parse_transaction`) and the decoded fields
    (id lengths, amount and item count ranges, timestamps within a window of now: the
    ``from_dict`` of :class:`Transaction` and :class:`Label`). ``qsfraud worker`` sets the
    ones a deployment may need to change (``--max-record-bytes``, ``--max-amount``,
    ``--max-event-age``, ``--max-event-future``).

    >>> b = InputBounds()
    >>> b.max_record_bytes, b.max_id_chars, b.max_amount, b.max_age_s / 86400
    (65536, 256, 1000000000.0, 3650.0)
    """

    max_record_bytes: int = 64 * 1024
    """A transaction is ~0.5 KB, a Debezium event with its schema a few KB."""
    max_depth: int = 32
    """JSON nesting (objects and arrays) of a whole record."""
    max_int_digits: int = 40
    """Digits of a JSON integer (a 128-bit id has 39); Python refuses beyond 4,300."""
    max_id_chars: int = 256
    """Characters of an id or other string field of the schema."""
    max_amount: float = 1e9
    """Amounts are finite and in ``[0, max_amount]``: sums and squares of them in the
    feature state must stay finite."""
    max_item_count: int = 100_000
    max_age_s: float = 10 * 365 * 86400.0
    """Timestamps (``occurred_at``, ``committed_at``, ``labelled_at``) are no older than
    this before now (replays of history are fine; year 1 is not)..."""
    max_future_s: float = 86400.0
    """... and no further ahead of now than this (clocks disagree; year 9999 is not)."""


DEFAULT_BOUNDS: Final = InputBounds()
NO_BOUNDS: Final = InputBounds(max_record_bytes=2**62, max_depth=2**62, max_int_digits=4300,
                               max_id_chars=2**62, max_amount=math.inf, max_item_count=2**53,
                               max_age_s=math.inf, max_future_s=math.inf)
"""What ``from_dict`` checks without bounds: the schema's own rules only."""


def parse_timestamp(value: Any, name: str = "timestamp") -> float:
    """Seconds since the epoch (UTC) from a number, an ISO 8601 string or a ``datetime``.

    >>> parse_timestamp("1970-01-01T00:01:00+00:00")
    60.0
    >>> parse_timestamp(datetime(1970, 1, 1, 1, tzinfo=UTC))
    3600.0
    """
    try:
        ts = _timestamp(value, name)
    except OverflowError:  # an aware datetime at the edge of year 1 or 9999, a huge int
        raise SchemaError(name, f"not a representable timestamp: {value!r}") from None
    if not math.isfinite(ts):
        raise SchemaError(name, f"not a finite timestamp: {value!r}")
    return ts


def _timestamp(value: Any, name: str) -> float:
    if type(value) is str:  # the wire form, first: this runs per event
        try:
            aware = datetime.fromisoformat(value)
        except ValueError:
            pass  # the general path below: spaces around it, or not ISO 8601 at all
        else:
            if aware.tzinfo is not None:
                return aware.timestamp()
    if isinstance(value, bool):
        raise SchemaError(name, f"expected a timestamp, got {value!r}")
    if isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        ts = dt.timestamp()
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            try:
                ts = float(value)
            except ValueError:
                raise SchemaError(name, f"not an ISO 8601 timestamp: {value!r}") from None
        else:
            ts = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    else:
        raise SchemaError(name, f"expected a timestamp, got {type(value).__name__}")
    return ts


def check_window(ts: float, name: str, now: float | None, bounds: InputBounds) -> float:
    """``ts`` if it is within ``bounds``' window of ``now`` (no check when ``now`` is None).

    >>> check_window(100.0, "t", now=None, bounds=DEFAULT_BOUNDS)
    100.0
    >>> check_window(100.0, "t", now=1e9, bounds=DEFAULT_BOUNDS)
    Traceback (most recent call last):
    ...
    fraud.schema.SchemaError: t: 100.0 is outside [now - 315360000 s, now + 86400 s]
    """
    if now is not None and not (now - bounds.max_age_s <= ts <= now + bounds.max_future_s):
        raise SchemaError(name, f"{ts!r} is outside [now - {bounds.max_age_s:.0f} s, now + "
                                f"{bounds.max_future_s:.0f} s]", "out-of-range")
    return ts


def format_timestamp(ts: float) -> str:
    """ISO 8601 in UTC with microseconds, the wire form of every timestamp."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z"
    )


def _str(d: dict[str, Any], name: str, *, required: bool = True, default: str | None = None,
         limit: int = 2**62) -> Any:
    value = d.get(name)
    if type(value) is str and value and len(value) <= limit:  # the common case, first
        return value
    if value is None or value == "":
        if required:
            raise SchemaError(name, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise SchemaError(name, f"expected a string, got {type(value).__name__}")
    if type(value) is int and limit < 4300 and not -(10**limit) < value < 10**limit:
        raise SchemaError(name, f"longer than {limit} characters", "too-long")
    try:
        text = str(value)
    except ValueError:  # an int beyond Python's 4,300 digits
        raise SchemaError(name, "an integer too long to convert", "too-long") from None
    if len(text) > limit:
        raise SchemaError(name, f"longer than {limit} characters ({len(text)})", "too-long")
    return text


def _float(d: dict[str, Any], name: str, *, minimum: float | None = None,
           maximum: float | None = None) -> float:
    value = d.get(name)
    if (type(value) is float and math.isfinite(value) and (minimum is None or value >= minimum)
            and (maximum is None or value <= maximum)):
        return value
    if value is None:
        raise SchemaError(name, "is required")
    if isinstance(value, bool):
        raise SchemaError(name, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise SchemaError(name, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SchemaError(name, f"must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise SchemaError(name, f"must be >= {minimum:g}, got {number!r}")
    if maximum is not None and number > maximum:
        raise SchemaError(name, f"must be <= {maximum:g}, got {number!r}", "out-of-range")
    return number


_EXACT_INT: Final = 2**53
"""Integers up to here are exact as floats: what the general path of :func:`_int` returns."""


def _int(d: dict[str, Any], name: str, default: int, maximum: int = _EXACT_INT) -> int:
    value = d.get(name, default)
    if type(value) is int and 0 <= value <= maximum:  # the common case, first
        return value
    if value is None:
        return default
    if isinstance(value, bool):
        raise SchemaError(name, f"expected an integer, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise SchemaError(name, f"expected an integer, got {value!r}") from None
    if not number.is_integer() or number < 0:
        raise SchemaError(name, f"expected a non-negative integer, got {value!r}")
    if number > maximum:
        raise SchemaError(name, f"must be <= {maximum}, got {value!r}", "out-of-range")
    return int(number)


def _bool(d: dict[str, Any], name: str) -> bool:
    value = d.get(name, False)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise SchemaError(name, f"expected a boolean, got {value!r}")


def _ts(d: dict[str, Any], name: str) -> float:
    if d.get(name) is None:
        raise SchemaError(name, "is required")
    return parse_timestamp(d[name], name)


def _choice(d: dict[str, Any], name: str, choices: tuple[str, ...], default: str | None) -> str:
    value = d.get(name, default)
    if value in choices:  # already in canonical form: the common case
        return str(value)
    if value is None:
        raise SchemaError(name, "is required")
    text = str(value).strip().lower() if isinstance(value, str) else ""
    if text not in choices:
        raise SchemaError(name, f"must be one of {', '.join(choices)}; got {value!r}")
    return text


_ENVELOPE_KEYS: Final = frozenset(("v", "kind", "extras"))


def _extras(d: dict[str, Any], not_extra: frozenset[str]) -> dict[str, ExtraValue]:
    """The fields of ``d`` (and of its ``extras`` object) that are not in ``not_extra``: the
    record's known fields and :data:`_ENVELOPE_KEYS`."""
    extras: dict[str, ExtraValue] = {}
    nested = d.get("extras")
    if (nested is None or (type(nested) is dict and not nested)) and not_extra.issuperset(d):
        return extras  # nothing beyond the schema: the common case
    if nested is not None and not isinstance(nested, dict):
        raise SchemaError("extras", f"expected an object, got {type(nested).__name__}")
    for key, value in [*d.items(), *(nested or {}).items()]:
        if key in not_extra:
            continue
        if value is None or isinstance(value, bool | int | str):
            extras[str(key)] = value
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise SchemaError(f"extras.{key}", f"must be finite, got {value!r}")
            extras[str(key)] = value
        else:
            raise SchemaError(
                f"extras.{key}", f"expected a number, string or boolean, got {type(value).__name__}"
            )
    return extras


def _check_envelope(d: Any, kind: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise SchemaError(kind, f"expected an object, got {type(d).__name__}")
    version = d.get("v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise SchemaError("v", f"unsupported schema version {version!r} (this is {SCHEMA_VERSION})")
    if d.get("kind", kind) != kind:
        raise SchemaError("kind", f"expected {kind!r}, got {d.get('kind')!r}")
    return d


def _loads(data: bytes | str, kind: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # also integers beyond Python's digit limit
        raise SchemaError(kind, f"not valid JSON: {str(exc)[:200]}") from None


def _looks_like_card_number(value: str) -> bool:
    digits = value.replace(" ", "").replace("-", "")
    if not (13 <= len(digits) <= 19 and digits.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


class JsonRecord:
    """Versioned JSON in and out, for every record type below."""

    __slots__ = ()
    KIND: ClassVar[str]

    @classmethod
    def from_dict(cls, d: Any) -> Self:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        return cls.from_dict(_loads(data, cls.KIND))


# Not frozen, though a value: built once per event on the workers' hot path, and a frozen
# dataclass sets each field through object.__setattr__ (6.8 us for these 16 fields, 2.6 us
# as plain slots). The same for Decision.
@dataclass(slots=True)
class Transaction(JsonRecord):
    """One purchase as qsfraud sees it. ``payment_instrument`` is a hash, never a card number."""

    tx_id: str
    retailer_id: str
    occurred_at: float
    amount: float
    customer_id: str
    payment_instrument: str
    currency: str = "EUR"
    device_id: str | None = None
    ip: str | None = None
    channel: str = "web"
    store_id: str | None = None
    terminal_id: str | None = None
    coupon_code: str | None = None
    item_count: int = 1
    address_mismatch: bool = False
    extras: dict[str, ExtraValue] = field(default_factory=dict)

    KIND: ClassVar[str] = "transaction"
    FIELDS: ClassVar[frozenset[str]] = frozenset(
        ("tx_id", "retailer_id", "occurred_at", "amount", "customer_id", "payment_instrument",
         "currency", "device_id", "ip", "channel", "store_id", "terminal_id", "coupon_code",
         "item_count", "address_mismatch")
    )
    NOT_EXTRA: ClassVar[frozenset[str]] = FIELDS | _ENVELOPE_KEYS

    @classmethod
    def from_dict(
        cls, d: Any, bounds: InputBounds | None = None, now: float | None = None
    ) -> Transaction:
        """Validate ``d``, within ``bounds`` if given (the worker's input), ``occurred_at``
        also within their window of ``now`` if that is given."""
        d = _check_envelope(d, cls.KIND)
        if bounds is None:
            bounds = NO_BOUNDS
        ids = bounds.max_id_chars
        instrument = _str(d, "payment_instrument", limit=ids)
        if _looks_like_card_number(instrument):
            raise SchemaError("payment_instrument", "looks like a card number; send a hash")
        currency = _str(d, "currency", required=False, default="EUR").upper()
        if len(currency) != 3 or not currency.isalpha():
            raise SchemaError("currency", f"expected an ISO 4217 code, got {currency!r}")
        return cls(
            tx_id=_str(d, "tx_id", limit=ids),
            retailer_id=_str(d, "retailer_id", limit=ids),
            occurred_at=check_window(_ts(d, "occurred_at"), "occurred_at", now, bounds),
            amount=_float(d, "amount", minimum=0.0, maximum=bounds.max_amount),
            customer_id=_str(d, "customer_id", limit=ids),
            payment_instrument=instrument,
            currency=currency,
            device_id=_str(d, "device_id", required=False, limit=ids),
            ip=_str(d, "ip", required=False, limit=ids),
            channel=_choice(d, "channel", CHANNELS, "web"),
            store_id=_str(d, "store_id", required=False, limit=ids),
            terminal_id=_str(d, "terminal_id", required=False, limit=ids),
            coupon_code=_str(d, "coupon_code", required=False, limit=ids),
            item_count=_int(d, "item_count", 1, bounds.max_item_count),
            address_mismatch=_bool(d, "address_mismatch"),
            extras=_extras(d, cls.NOT_EXTRA),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "kind": self.KIND,
            "tx_id": self.tx_id,
            "retailer_id": self.retailer_id,
            "occurred_at": format_timestamp(self.occurred_at),
            "amount": self.amount,
            "currency": self.currency,
            "customer_id": self.customer_id,
            "payment_instrument": self.payment_instrument,
            "device_id": self.device_id,
            "ip": self.ip,
            "channel": self.channel,
            "store_id": self.store_id,
            "terminal_id": self.terminal_id,
            "coupon_code": self.coupon_code,
            "item_count": self.item_count,
            "address_mismatch": self.address_mismatch,
            "extras": dict(self.extras),
        }


@dataclass(frozen=True, slots=True)
class Label(JsonRecord):
    """Ground truth for one transaction, from a chargeback or an analyst's verdict.

    >>> Label.from_dict({"tx_id": "t1", "is_fraud": 1, "source": "analyst", "labelled_at": 5})
    Label(tx_id='t1', is_fraud=True, source='analyst', labelled_at=5.0, retailer_id=None)
    """

    tx_id: str
    is_fraud: bool
    source: str
    labelled_at: float
    retailer_id: str | None = None

    KIND: ClassVar[str] = "label"

    @classmethod
    def from_dict(
        cls, d: Any, bounds: InputBounds | None = None, now: float | None = None
    ) -> Label:
        """Validate ``d``, within ``bounds`` if given (``labelled_at`` also within their
        window of ``now``, if that is given)."""
        d = _check_envelope(d, cls.KIND)
        if bounds is None:
            bounds = NO_BOUNDS
        if "is_fraud" not in d:
            raise SchemaError("is_fraud", "is required")
        ids = bounds.max_id_chars
        return cls(
            tx_id=_str(d, "tx_id", limit=ids),
            is_fraud=_bool(d, "is_fraud"),
            source=_choice(d, "source", LABEL_SOURCES, None),
            labelled_at=check_window(_ts(d, "labelled_at"), "labelled_at", now, bounds),
            retailer_id=_str(d, "retailer_id", required=False, limit=ids),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "kind": self.KIND,
            "tx_id": self.tx_id,
            "is_fraud": self.is_fraud,
            "source": self.source,
            "labelled_at": format_timestamp(self.labelled_at),
            "retailer_id": self.retailer_id,
        }


@dataclass(slots=True)  # not frozen: see Transaction
class Decision(JsonRecord):
    """What qsfraud decided for one transaction, and why.

    ``timings`` holds epoch seconds keyed by stage (``committed``, ``received``, ``decided``).
    """

    tx_id: str
    retailer_id: str
    score: float
    action: str
    reasons: tuple[str, ...] = ()
    model_version: str = ""
    config_version: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    KIND: ClassVar[str] = "decision"

    @classmethod
    def from_dict(cls, d: Any) -> Decision:
        d = _check_envelope(d, cls.KIND)
        score = _float(d, "score", minimum=0.0)
        if score > 1.0:
            raise SchemaError("score", f"must be <= 1, got {score!r}")
        reasons = d.get("reasons", [])
        if not isinstance(reasons, list | tuple) or not all(isinstance(r, str) for r in reasons):
            raise SchemaError("reasons", "expected a list of strings")
        timings = d.get("timings", {})
        if not isinstance(timings, dict):
            raise SchemaError("timings", "expected an object")
        return cls(
            tx_id=_str(d, "tx_id"),
            retailer_id=_str(d, "retailer_id"),
            score=score,
            action=_choice(d, "action", ACTIONS, None),
            reasons=tuple(reasons),
            model_version=_str(d, "model_version", required=False, default=""),
            config_version=_int(d, "config_version", 0),
            timings={str(k): _float(timings, k) for k in timings},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "kind": self.KIND,
            "tx_id": self.tx_id,
            "retailer_id": self.retailer_id,
            "score": self.score,
            "action": self.action,
            "reasons": list(self.reasons),
            "model_version": self.model_version,
            "config_version": self.config_version,
            "timings": dict(self.timings),
        }
