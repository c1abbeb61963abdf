"""Map one source row or document to the canonical :class:`fraud.schema.Transaction`.

A :class:`RowMapper` is built from the ``[mapping]`` table of a CDC config file. Each canonical
field comes from a source column (a dotted path reaches into MongoDB sub-documents and JSON
columns), is coerced to a declared type, or is a static value (``retailer_id``, ``currency``).
Any failure, whatever the input, is raised as :class:`MappingError` naming the field.

>>> from decimal import Decimal
>>> from datetime import datetime
>>> mapper = RowMapper.from_config({
...     "static": {"retailer_id": "acme", "currency": "EUR"},
...     "timezone": "Europe/Paris",
...     "fields": {"tx_id": "id", "customer_id": "customer",
...                "payment_instrument": "card_hash",
...                "amount": {"from": "total", "type": "decimal"},
...                "occurred_at": {"from": "created_at", "type": "datetime"},
...                "device_id": {"from": "meta", "type": "json", "path": "device.id"}},
...     "extras": ["version"]})
>>> tx = mapper.map({"id": 7, "customer": "c1", "card_hash": "h", "total": Decimal("9.90"),
...     "created_at": datetime(2026, 1, 2, 10, 0), "meta": '{"device": {"id": "d1"}}',
...     "version": 3})
>>> tx.tx_id, tx.amount, tx.occurred_at, tx.device_id, tx.extras
('7', 9.9, 1767344400.0, 'd1', {'version': 3})
>>> mapper.map({"id": 7, "customer": "c1", "card_hash": "h", "total": "abc",
...     "created_at": datetime(2026, 1, 2)})
Traceback (most recent call last):
...
cdc.mapping.MappingError: amount: expected a decimal number, got 'abc'
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fraud.schema import SchemaError, Transaction

TYPES: Final = ("auto", "string", "decimal", "float", "int", "bool", "datetime", "epoch_ms",
                "objectid", "json")
_MISSING: Final = object()


class MappingError(ValueError):
    """A row could not be turned into a canonical Transaction; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ConfigError(ValueError):
    """The mapping (or another part of a CDC config) is invalid."""


def json_safe(value: Any) -> Any:
    """A JSON-encodable copy of a source value: decimals, bytes, datetimes, ObjectIds as strings.

    >>> from decimal import Decimal
    >>> json_safe({"a": Decimal("1.10"), "b": b"hi", "c": [b"\\xff", float("nan")]})
    {'a': '1.10', 'b': 'hi', 'c': ['base64:/w==', 'nan']}
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(raw).decode()
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return str(value)  # Decimal, ObjectId, bson Timestamp, UUID, ...


def _timezone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"unknown time zone {name!r}: {exc}") from None


def _lookup(row: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` (``a.b.0``), or ``_MISSING``."""
    if path in row:
        return row[path]
    current: Any = row
    for part in path.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


@dataclass(frozen=True)
class FieldSpec:
    """Where one canonical field comes from and how its value is coerced."""

    name: str
    source: str
    type: str = "auto"
    path: str | None = None
    timezone: tzinfo = UTC
    default: Any = None

    def compile(self) -> Callable[[Mapping[str, Any]], Any]:
        """A closure that does what :meth:`extract` does, with lookup and coercion chosen once.

        Mapping runs once per change: the per-type dispatch of :meth:`_coerce` and the dotted
        path walk are decided here instead. Types without a fast path (and ``path``) use
        :meth:`extract` itself, so both always agree.
        """
        if self.path is not None or "." in self.source:
            return self.extract
        source, default, name, tz = self.source, self.default, self.name, self.timezone
        coerce = self._coerce
        fast = _FAST_COERCIONS.get(self.type)

        def extract(row: Mapping[str, Any]) -> Any:
            if source not in row:
                return default
            value = row[source]
            if value is None:
                return default
            if fast is not None:
                done, result = fast(value, tz)
                if done:
                    return result
            try:
                return coerce(value)
            except MappingError:
                raise
            except Exception as exc:  # any coercion failure is a mapping failure for this field
                raise MappingError(name, f"cannot convert {_short(value)}: {exc}") from None

        return extract

    def extract(self, row: Mapping[str, Any]) -> Any:
        value = _lookup(row, self.source)
        if value is _MISSING or value is None:
            return self.default
        try:
            value = self._coerce(value)
        except MappingError:
            raise
        except Exception as exc:  # any coercion failure is a mapping failure for this field
            raise MappingError(self.name, f"cannot convert {_short(value)}: {exc}") from None
        if self.path is not None and value is not None:
            if not isinstance(value, dict | list):
                raise MappingError(self.name, f"expected a JSON object, got {_short(value)}")
            found = _lookup(value, self.path) if isinstance(value, dict) else _MISSING
            value = self.default if found is _MISSING else _scalar(self.name, found, self.timezone)
        return value

    def _coerce(self, value: Any) -> Any:
        kind = self.type
        if kind == "auto":
            return _scalar(self.name, value, self.timezone)
        if kind == "string":
            if isinstance(value, bytes | bytearray):
                try:
                    return bytes(value).decode()
                except UnicodeDecodeError:
                    raise MappingError(self.name, "bytes are not UTF-8 text") from None
            if isinstance(value, dict | list):
                raise MappingError(self.name, f"expected a scalar, got {type(value).__name__}")
            if isinstance(value, float) and value.is_integer():
                return str(int(value))
            return str(value)
        if kind == "decimal":
            try:
                number = Decimal(value.decode() if isinstance(value, bytes) else str(value))
            except (InvalidOperation, UnicodeDecodeError, ValueError):
                raise MappingError(self.name, f"expected a decimal number, got {_short(value)}") \
                    from None
            if isinstance(value, bool) or not number.is_finite():
                raise MappingError(self.name, f"expected a decimal number, got {_short(value)}")
            return str(number)
        if kind == "float":
            if isinstance(value, bool):
                raise MappingError(self.name, f"expected a number, got {value!r}")
            return float(value)
        if kind == "int":
            if isinstance(value, bool):
                raise MappingError(self.name, f"expected an integer, got {value!r}")
            number = Decimal(str(value))
            if not number.is_finite() or number != number.to_integral_value():
                raise MappingError(self.name, f"expected an integer, got {_short(value)}")
            return int(number)
        if kind == "bool":
            return value
        if kind == "datetime":
            return _datetime(self.name, value, self.timezone)
        if kind == "epoch_ms":
            if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
                raise MappingError(self.name, f"expected epoch milliseconds, got {_short(value)}")
            return float(value) / 1000.0
        if kind == "objectid":
            if hasattr(value, "binary") and hasattr(value, "generation_time"):
                return str(value)
            text = str(value)
            if len(text) != 24 or any(c not in "0123456789abcdefABCDEF" for c in text):
                raise MappingError(self.name, f"expected an ObjectId, got {_short(value)}")
            return text.lower()
        if kind == "json":
            if isinstance(value, dict | list):
                return value
            if isinstance(value, bytes | bytearray):
                value = bytes(value).decode()
            if not isinstance(value, str):
                raise MappingError(self.name, f"expected JSON text, got {_short(value)}")
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise MappingError(self.name, f"invalid JSON: {exc.msg}") from None
            return parsed if self.path is not None else _scalar(self.name, parsed, self.timezone)
        raise MappingError(self.name, f"unknown type {kind!r}")  # pragma: no cover


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _datetime(name: str, value: Any, tz: tzinfo) -> float:
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=tz)
        return dt.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=tz).timestamp()
    if isinstance(value, bool):
        raise MappingError(name, f"expected a date-time, got {value!r}")
    if isinstance(value, int | float | Decimal):
        number = float(value)
        if not math.isfinite(number):
            raise MappingError(name, f"expected a date-time, got {_short(value)}")
        return number
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise MappingError(name, f"not an ISO 8601 date-time: {_short(value)}") from None
        return (dt if dt.tzinfo else dt.replace(tzinfo=tz)).timestamp()
    raise MappingError(name, f"expected a date-time, got {type(value).__name__}")


def _scalar(name: str, value: Any, tz: tzinfo) -> Any:
    """The ``auto`` coercion: a value ``Transaction.from_dict`` understands, or MappingError."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MappingError(name, f"must be finite, got {value!r}")
        return value
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise MappingError(name, f"must be finite, got {value}")
        return str(value)
    if isinstance(value, datetime | date):
        return _datetime(name, value, tz)
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise MappingError(name, "bytes are not UTF-8 text") from None
    if hasattr(value, "binary") and hasattr(value, "generation_time"):  # bson ObjectId
        return str(value)
    if isinstance(value, dict | list | tuple | set):
        raise MappingError(name, f"expected a scalar, got {type(value).__name__}")
    type_name = type(value).__name__
    if type_name in ("Decimal128", "UUID", "Int64"):
        return str(value)
    raise MappingError(name, f"unsupported value type {type_name}")


def _fast_auto(value: Any, tz: tzinfo) -> tuple[bool, Any]:
    kind = type(value)
    if kind is str or kind is int:
        return True, value
    if kind is datetime and value.tzinfo is not None:
        return True, value.timestamp()
    return False, None


def _fast_string(value: Any, tz: tzinfo) -> tuple[bool, Any]:
    if type(value) is str:
        return True, value
    if type(value) is int:
        return True, str(value)
    return False, None


def _fast_decimal(value: Any, tz: tzinfo) -> tuple[bool, Any]:
    # str(Decimal(str(d))) == str(d): building a Decimal from a string is exact
    if type(value) is Decimal and value.is_finite():
        return True, str(value)
    return False, None


def _fast_datetime(value: Any, tz: tzinfo) -> tuple[bool, Any]:
    if type(value) is datetime:
        return True, (value if value.tzinfo else value.replace(tzinfo=tz)).timestamp()
    return False, None


# exact shortcuts for the commonest (type, value) pairs; anything else goes through _coerce
_FAST_COERCIONS: Final[dict[str, Callable[[Any, tzinfo], tuple[bool, Any]]]] = {
    "auto": _fast_auto, "string": _fast_string, "decimal": _fast_decimal,
    "datetime": _fast_datetime,
}


def _field_spec(name: str, spec: Any, tz: tzinfo) -> FieldSpec:
    if isinstance(spec, str):
        return FieldSpec(name=name, source=spec, timezone=tz)
    if not isinstance(spec, dict):
        raise ConfigError(f"mapping.fields.{name}: expected a column name or a table")
    unknown = set(spec) - {"from", "type", "path", "timezone", "default"}
    if unknown:
        raise ConfigError(f"mapping.fields.{name}: unknown keys {', '.join(sorted(unknown))}")
    if not isinstance(spec.get("from"), str) or not spec["from"]:
        raise ConfigError(f"mapping.fields.{name}: 'from' (the source column) is required")
    kind = spec.get("type", "auto")
    if kind not in TYPES:
        raise ConfigError(f"mapping.fields.{name}: type must be one of {', '.join(TYPES)}")
    path = spec.get("path")
    if path is not None and kind != "json":
        raise ConfigError(f"mapping.fields.{name}: 'path' needs type = \"json\"")
    zone = _timezone(spec["timezone"]) if "timezone" in spec else tz
    return FieldSpec(name=name, source=spec["from"], type=kind, path=path, timezone=zone,
                     default=spec.get("default"))


@dataclass(frozen=True)
class RowMapper:
    """Turns a source row into a validated :class:`Transaction`; raises only MappingError."""

    fields: tuple[FieldSpec, ...]
    static: dict[str, Any] = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    timezone: tzinfo = UTC
    _compiled: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = field(
        init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple((s.name, s.compile()) for s in self.fields))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RowMapper:
        """Build from the ``[mapping]`` table (see ``examples/cdc/*.toml``)."""
        unknown = set(cfg) - {"fields", "static", "extras", "timezone"}
        if unknown:
            raise ConfigError(f"mapping: unknown keys {', '.join(sorted(unknown))}")
        tz = _timezone(str(cfg.get("timezone", "UTC")))
        fields_cfg = cfg.get("fields", {})
        if not isinstance(fields_cfg, dict) or not fields_cfg:
            raise ConfigError("mapping.fields: at least one field mapping is required")
        static = dict(cfg.get("static", {}))
        extras = cfg.get("extras", [])
        if not isinstance(extras, list) or not all(isinstance(e, str) for e in extras):
            raise ConfigError("mapping.extras: expected a list of column names")
        specs = tuple(_field_spec(name, spec, tz) for name, spec in fields_cfg.items())
        required = {"tx_id", "customer_id", "amount", "occurred_at", "payment_instrument",
                    "retailer_id"}
        missing = required - {s.name for s in specs} - set(static)
        if missing:
            raise ConfigError(f"mapping: no source for {', '.join(sorted(missing))}")
        return cls(fields=specs, static=static, extras=tuple(extras), timezone=tz)

    def map(self, row: Mapping[str, Any]) -> Transaction:
        """The canonical transaction for ``row``; MappingError (naming the field) otherwise."""
        if not isinstance(row, Mapping):
            raise MappingError("row", f"expected a row/document, got {type(row).__name__}")
        data: dict[str, Any] = dict(self.static)
        for name, extract in self._compiled:
            value = extract(row)
            if value is not None:
                data[name] = value
        extras: dict[str, Any] = {}
        for column in self.extras:
            value = _lookup(row, column)
            if value is not _MISSING:
                extras[column] = _scalar(f"extras.{column}", value, self.timezone)
        if extras:
            data["extras"] = extras
        try:
            return Transaction.from_dict(data)
        except SchemaError as exc:
            raise MappingError(exc.field, exc.message) from None
        except Exception as exc:  # e.g. OverflowError on a huge integer
            raise MappingError("row", f"{type(exc).__name__}: {exc}") from None
