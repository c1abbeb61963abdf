"""Debezium change events (Kafka Connect JSON converter) as qsfraud change envelopes.

A shop that already runs Debezium points qsfraud workers at its topics: each event's row is
mapped by the same ``[mapping]`` table the qsfraud CDC uses (:class:`cdc.mapping.RowMapper`)
and comes out as the envelope of :mod:`cdc.envelope` (``{"v": 1, "op", "tx", ...}``), which
the worker then reads as it reads the qsfraud CDC's own records. Pure: no I/O but
:meth:`DebeziumDecoder.load`, which reads the mapping file.

Accepted shapes: ``{"schema": {...}, "payload": {...}}`` (``schemas.enable=true``) or the
payload itself; ``payload`` has ``before``, ``after``, ``source``, ``op`` (``c`` create,
``r`` snapshot read, ``u`` update, ``d`` delete) and ``ts_ms``.

* MySQL/MariaDB (and other relational) connectors: ``after`` is the flat row. With a schema,
  Connect's logical types become Python values first, as the qsfraud MySQL source would
  give them: ``Decimal`` bytes -> :class:`~decimal.Decimal`; ``io.debezium.time.Timestamp``
  (and Micro/Nano, Connect ``Timestamp``), a DATETIME's wall clock -> naive ``datetime`` (the
  mapping's ``timezone`` applies); ``Date`` -> ``date``; plain ``bytes`` -> bytes.
  ``io.debezium.data.VariableScaleDecimal`` structs are decoded with or without a schema.
* MongoDB connector: ``after`` (and ``before``) is a string of the document in extended JSON
  (``{"$oid": ...}``, ``{"$date": ...}``, ``{"$numberDecimal": ...}``, canonical or relaxed),
  decoded into the values a driver would give (ObjectId as its hex string). An update has
  ``after`` only with ``capture.mode=change_streams_update_full``; without it is an error.

``committed_at`` is ``source.ts_ms`` (the commit in the database) in seconds. A delete, or
a tombstone (a null value, what Debezium writes after a delete), is an envelope with
``op = "d"`` and no ``tx``. Anything else raises :class:`DebeziumError` naming the problem.

>>> decoder = DebeziumDecoder.from_mapping({
...     "static": {"currency": "EUR"},
...     "fields": {"tx_id": "id", "customer_id": "customer_id", "payment_instrument": "card",
...                "amount": {"from": "amount", "type": "decimal"},
...                "occurred_at": {"from": "created_at", "type": "epoch_ms"}}}, "acme")
>>> env = decoder.envelope({"op": "c", "before": None, "after": {"id": 7,
...     "customer_id": "c1", "card": "h1", "amount": "9.90", "created_at": 1767225600000},
...     "source": {"connector": "mysql", "ts_ms": 1767225601000}, "ts_ms": 1767225601050})
>>> env["op"], env["committed_at"], env["tx"]["tx_id"], env["tx"]["amount"]
('c', 1767225601.0, '7', 9.9)
>>> try:
...     decoder.envelope({"op": "u", "after": None, "source": {"connector": "mongodb"}})
... except DebeziumError as exc:
...     print(exc.reason, "/", exc.message)
invalid / an update without 'after' (MongoDB: set capture.mode=change_streams_update_full)
"""

from __future__ import annotations

import base64
import json
import math
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

from cdc.envelope import ENVELOPE_VERSION
from cdc.mapping import ConfigError, MappingError, RowMapper

OPS: Final = frozenset(("c", "r", "u", "d"))
_EPOCH: Final = datetime(1970, 1, 1)
_EPOCH_DAY: Final = date(1970, 1, 1)
_DATETIME_UNITS: Final = {  # Connect logical type of a DATETIME -> its unit, in microseconds
    "io.debezium.time.Timestamp": 1_000, "org.apache.kafka.connect.data.Timestamp": 1_000,
    "io.debezium.time.MicroTimestamp": 1, "io.debezium.time.NanoTimestamp": 0.001,
}
_DATES: Final = frozenset(("io.debezium.time.Date", "org.apache.kafka.connect.data.Date"))
_DECIMAL: Final = "org.apache.kafka.connect.data.Decimal"


class DebeziumError(ValueError):
    """A record that is not a usable Debezium change event; ``reason`` is a short word
    (``invalid``, ``not-debezium``), ``message`` says what is wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def looks_like_debezium(doc: Mapping[str, Any]) -> bool:
    """Whether ``doc`` has the shape of a Debezium change event (and not of a qsfraud
    envelope or a bare transaction).

    >>> looks_like_debezium({"schema": {}, "payload": {}})
    True
    >>> looks_like_debezium({"op": "c", "after": {}, "source": {}})
    True
    >>> looks_like_debezium({"v": 1, "op": "c", "tx": {}, "before": None, "source": {}})
    False
    """
    if "payload" in doc:
        return "schema" in doc
    return "after" in doc and "source" in doc and "op" in doc and "tx" not in doc


@dataclass(frozen=True)
class DebeziumDecoder:
    """Turns Debezium events into qsfraud change envelopes with ``mapper`` (None: the row
    already has canonical field names, ``retailer_id`` defaulting to ``retailer``; it is
    validated where every envelope's ``tx`` is, by its reader).

    ``strict``: every record is expected to be a Debezium event (the worker's
    ``--input-format debezium``): other shapes are errors and a null value is a delete.
    Otherwise (auto), only records of Debezium's shape are claimed.
    """

    retailer: str
    mapper: RowMapper | None = None
    strict: bool = False
    _static: dict[str, Any] = field(init=False, repr=False, compare=False,
                                    default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_static", {"retailer_id": self.retailer})

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], retailer: str,
                     strict: bool = False) -> DebeziumDecoder:
        """A decoder with the mapper of a ``[mapping]`` table (``examples/cdc/*.toml``);
        ``static.retailer_id`` defaults to ``retailer``. Raises ConfigError."""
        table = dict(mapping)
        table["static"] = {"retailer_id": retailer, **dict(table.get("static") or {})}
        return cls(retailer, RowMapper.from_config(table), strict)

    @classmethod
    def load(cls, retailer: str, mapping_file: Path | None = None,
             strict: bool = False) -> DebeziumDecoder:
        """The decoder of a worker: the ``[mapping]`` table of ``mapping_file`` (TOML, or
        YAML by its suffix; a whole CDC config file works too), else canonical rows."""
        if mapping_file is None:
            return cls(retailer, None, strict)
        try:
            text = Path(mapping_file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {mapping_file}: {exc.strerror}") from None
        try:
            if Path(mapping_file).suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = tomllib.loads(text)
        except Exception as exc:  # tomllib/yaml syntax errors
            raise ConfigError(f"{mapping_file}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("mapping"), dict):
            raise ConfigError(f"{mapping_file}: no [mapping] table")
        return cls.from_mapping(data["mapping"], retailer, strict)

    def claims(self, doc: Any) -> bool:
        """Whether this decoder, not the qsfraud envelope parser, reads ``doc`` (parsed JSON)."""
        return self.strict or (isinstance(doc, dict) and looks_like_debezium(doc))

    def envelope(self, value: Any) -> dict[str, Any]:
        """The qsfraud change envelope of one Debezium event value (parsed JSON; None for a
        tombstone). Raises only :class:`DebeziumError`."""
        try:
            return self._envelope(value)
        except DebeziumError:
            raise
        except MappingError as exc:
            raise DebeziumError("invalid", str(exc)) from None
        except RecursionError:
            raise DebeziumError("invalid", "nested too deeply") from None
        except Exception as exc:  # a malformed event must never escape as anything else
            raise DebeziumError("invalid", f"{type(exc).__name__}: {exc}") from None

    def _envelope(self, value: Any) -> dict[str, Any]:
        schema: Any = None
        payload = value
        if isinstance(value, dict) and "payload" in value and "schema" in value:
            schema, payload = value["schema"], value["payload"]
        if payload is None:  # a tombstone (or its schema-wrapped form)
            return _change("d", None, None, {})
        if not isinstance(payload, dict) or not looks_like_debezium(payload):
            raise DebeziumError("not-debezium", "expected a Debezium change event "
                                "(before/after/source/op), got " + _shape(payload))
        op = payload["op"]
        if op not in OPS:
            raise DebeziumError("invalid", f"op {op!r} carries no row to decide "
                                "(expected c, r, u or d)")
        source = payload["source"]
        if not isinstance(source, dict):
            raise DebeziumError("invalid", f"source: expected an object, got {_shape(source)}")
        committed = _committed_at(source, payload)
        if op == "d":
            return _change("d", None, committed, source)
        after = payload.get("after")
        if after is None:
            hint = (" (MongoDB: set capture.mode=change_streams_update_full)" if op == "u"
                    else "")
            word = {"c": "a create", "r": "a snapshot read", "u": "an update"}[op]
            raise DebeziumError("invalid", f"{word} without 'after'{hint}")
        row = self._row(after, _field_schema(schema, "after"))
        return _change(op, self._canonical(row), committed, source)

    def _row(self, after: Any, schema: Any) -> dict[str, Any]:
        if isinstance(after, str):  # MongoDB: the document as extended JSON text
            try:
                document = json.loads(after)
            except ValueError as exc:
                raise DebeziumError("invalid", f"after: not JSON: {exc}") from None
            if not isinstance(document, dict):
                raise DebeziumError("invalid", f"after: expected a document, got "
                                    f"{_shape(document)}")
            decoded: dict[str, Any] = from_extended_json(document)
            return decoded
        if not isinstance(after, dict):
            raise DebeziumError("invalid", f"after: expected a row, got {_shape(after)}")
        return connect_row(after, schema)

    def _canonical(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.mapper is not None:
            return self.mapper.map(row).to_dict()
        if "retailer_id" in row:
            return {k: _plain(v) for k, v in row.items()}
        return {**self._static, **{k: _plain(v) for k, v in row.items()}}


def _change(op: str, tx: dict[str, Any] | None, committed: float | None,
            source: dict[str, Any]) -> dict[str, Any]:
    return {"v": ENVELOPE_VERSION, "op": op, "tx": tx, "before": None,
            "source": {"debezium": source}, "committed_at": committed}


def _committed_at(source: dict[str, Any], payload: dict[str, Any]) -> float | None:
    """``source.ts_ms`` (commit time in the database), else the top-level ``ts_ms``."""
    for where, ms in (("source.ts_ms", source.get("ts_ms")), ("ts_ms", payload.get("ts_ms"))):
        if ms is None:
            continue
        try:
            seconds = ms / 1000.0 if isinstance(ms, int | float) else math.nan
        except OverflowError:  # an integer beyond any float
            seconds = math.nan
        if isinstance(ms, bool) or not math.isfinite(seconds):
            raise DebeziumError("invalid", f"{where}: expected epoch milliseconds, got "
                                f"{_shape(ms)}")
        return seconds
    return None


def _shape(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 200:  # repr of a huge int is slow
        return f"int of {value.bit_length()} bits"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _field_schema(schema: Any, name: str) -> Any:
    """The Connect schema of field ``name`` of a struct schema, or None."""
    if isinstance(schema, dict) and isinstance(schema.get("fields"), list):
        for f in schema["fields"]:
            if isinstance(f, dict) and f.get("field") == name:
                return f
    return None


def _plain(value: Any) -> Any:
    """A value ``Transaction.from_dict`` takes, for rows that need no mapping."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def connect_row(row: dict[str, Any], schema: Any = None) -> dict[str, Any]:
    """A relational row with Connect's logical types decoded (see the module docstring).

    >>> row = connect_row({"amount": "AeI=", "at": 1767225600000, "d": 20454, "n": "x"},
    ...     {"fields": [{"field": "amount", "type": "bytes", "parameters": {"scale": "2"},
    ...                  "name": "org.apache.kafka.connect.data.Decimal"},
    ...                 {"field": "at", "type": "int64", "name": "io.debezium.time.Timestamp"},
    ...                 {"field": "d", "type": "int32", "name": "io.debezium.time.Date"}]})
    >>> row["amount"], row["at"], row["d"], row["n"]
    (Decimal('4.82'), datetime.datetime(2026, 1, 1, 0, 0), datetime.date(2026, 1, 1), 'x')
    >>> connect_row({"total": {"scale": 2, "value": "AeI="}})
    {'total': Decimal('4.82')}
    """
    types: dict[str, dict[str, Any]] = {}
    if isinstance(schema, dict) and isinstance(schema.get("fields"), list):
        types = {f["field"]: f for f in schema["fields"]
                 if isinstance(f, dict) and isinstance(f.get("field"), str)}
    out: dict[str, Any] = {}
    for name, value in row.items():
        spec = types.get(name)
        if spec is not None and value is not None:
            value = _connect_value(name, value, spec)
        elif isinstance(value, dict) and value.keys() == {"scale", "value"}:
            value = _variable_decimal(name, value)
        out[name] = value
    return out


def _connect_value(name: str, value: Any, spec: dict[str, Any]) -> Any:
    logical = spec.get("name")
    try:
        if logical == _DECIMAL:
            scale = int((spec.get("parameters") or {}).get("scale", 0))
            return _unscaled(name, value).scaleb(-scale)
        if logical == "io.debezium.data.VariableScaleDecimal" and isinstance(value, dict):
            return _variable_decimal(name, value)
        if logical in _DATETIME_UNITS:
            # a DATETIME's wall clock counted as if it were UTC: naive, the mapping's zone
            return _EPOCH + timedelta(microseconds=_integer(name, value) *
                                      _DATETIME_UNITS[logical])
        if logical in _DATES:
            return _EPOCH_DAY + timedelta(days=_integer(name, value))
        if logical is None and spec.get("type") == "bytes" and isinstance(value, str):
            return base64.b64decode(value, validate=True)
    except (ValueError, OverflowError, InvalidOperation, TypeError) as exc:
        raise DebeziumError("invalid", f"after.{name}: not a valid {logical or 'bytes'}: "
                            f"{_shape(value)} ({exc})") from None
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DebeziumError("invalid", f"after.{name}: expected an integer, got {_shape(value)}")
    return value


def _unscaled(name: str, value: Any) -> Decimal:
    """Connect's Decimal bytes: a big-endian two's complement integer, base64 in JSON."""
    if not isinstance(value, str):
        raise DebeziumError("invalid", f"after.{name}: expected base64 decimal bytes, got "
                            f"{_shape(value)}")
    raw = base64.b64decode(value, validate=True)
    return Decimal(int.from_bytes(raw, "big", signed=True))


def _variable_decimal(name: str, value: dict[str, Any]) -> Decimal:
    scale = value.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise DebeziumError("invalid", f"after.{name}.scale: expected an integer, got "
                            f"{_shape(scale)}")
    try:
        return _unscaled(name, value.get("value")).scaleb(-scale)
    except ValueError as exc:
        raise DebeziumError("invalid", f"after.{name}: not a valid decimal: {exc}") from None


def from_extended_json(value: Any) -> Any:
    """MongoDB extended JSON (canonical or relaxed, as parsed by ``json.loads``) as the
    values a driver gives: ObjectId as its hex string, dates as aware UTC datetimes,
    ``$numberDecimal`` as Decimal, ``$numberLong``/``$numberInt`` as int, ``$binary`` as
    bytes (a UUID subtype as its string). Other ``$`` types are left as they are.

    >>> doc = from_extended_json({"_id": {"$oid": "65A1B2C3D4E5F60718293A4B"},
    ...     "total": {"$numberDecimal": "19.90"}, "n": {"$numberLong": "3"},
    ...     "at": {"$date": {"$numberLong": "1767225600000"}}, "tags": [{"$numberInt": "1"}]})
    >>> doc["_id"], doc["total"], doc["n"], doc["tags"], doc["at"].isoformat()
    ('65a1b2c3d4e5f60718293a4b', Decimal('19.90'), 3, [1], '2026-01-01T00:00:00+00:00')
    """
    if isinstance(value, list):
        return [from_extended_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) in (1, 2) and all(isinstance(k, str) and k.startswith("$") for k in value):
        decoded = _extended_scalar(value)
        if decoded is not _UNKNOWN:
            return decoded
    return {k: from_extended_json(v) for k, v in value.items()}


_UNKNOWN: Final = object()


def _extended_scalar(value: dict[str, Any]) -> Any:
    try:
        if "$oid" in value:
            return str(value["$oid"]).lower()
        if "$numberDecimal" in value:
            return Decimal(str(value["$numberDecimal"]))
        if "$numberLong" in value or "$numberInt" in value:
            return int(str(value.get("$numberLong", value.get("$numberInt"))))
        if "$numberDouble" in value:
            return float(str(value["$numberDouble"]))
        if "$date" in value:
            return _extended_date(value["$date"])
        if "$binary" in value:
            binary = value["$binary"]
            if isinstance(binary, dict):  # canonical v2: {"base64": ..., "subType": "04"}
                raw, subtype = binary.get("base64"), binary.get("subType")
            else:  # legacy: {"$binary": ..., "$type": ...}
                raw, subtype = binary, value.get("$type")
            data = base64.b64decode(str(raw), validate=True)
            return str(uuid.UUID(bytes=data)) if subtype in ("04", "4") else data
        if "$uuid" in value:
            return str(uuid.UUID(str(value["$uuid"])))
        if "$timestamp" in value:  # the oplog's (seconds, increment): the seconds
            return int(value["$timestamp"]["t"])
        if "$symbol" in value or "$code" in value:
            return str(value.get("$symbol", value.get("$code")))
    except (ValueError, TypeError, KeyError, InvalidOperation, OverflowError) as exc:
        raise DebeziumError("invalid", f"bad extended JSON {_shape(value)}: {exc}") from None
    return _UNKNOWN


def _extended_date(value: Any) -> datetime:
    if isinstance(value, dict):
        value = int(str(value["$numberLong"]))
    if isinstance(value, str):  # relaxed: ISO 8601 for years 1970-9999
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected milliseconds or an ISO date, got {value!r}")
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=value)

