"""The row mapper: coercions, config errors, and a property test that it raises only
MappingError whatever rows, documents or field specs it is given."""

from __future__ import annotations

import contextlib
import json
import math
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from bson.decimal128 import Decimal128
from bson.objectid import ObjectId
from bson.timestamp import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.config import CdcConfig
from cdc.envelope import dumps
from cdc.mapping import TYPES, ConfigError, MappingError, RowMapper, json_safe
from cdc.mongo_source import apply_update

BASE = {
    "static": {"retailer_id": "acme", "currency": "EUR"},
    "fields": {"tx_id": "id", "customer_id": "customer", "payment_instrument": "card",
               "amount": {"from": "amount", "type": "decimal"},
               "occurred_at": {"from": "at", "type": "datetime"}},
}
ROW = {"id": 1, "customer": "c1", "card": "h", "amount": Decimal("3.10"),
       "at": datetime(2026, 1, 1, tzinfo=UTC)}


def test_maps_decimals_datetimes_objectids_and_json():
    oid = ObjectId("65a1b2c3d4e5f60718293a4b")
    mapper = RowMapper.from_config({
        **BASE, "timezone": "America/New_York",
        "fields": {**BASE["fields"], "tx_id": {"from": "_id", "type": "objectid"},
                   "customer_id": "customer.id",
                   "amount": {"from": "total", "type": "decimal"},
                   "occurred_at": {"from": "at", "type": "datetime"},
                   "item_count": {"from": "meta", "type": "json", "path": "items"}},
        "extras": ["tier"],
    })
    tx = mapper.map({"_id": oid, "customer": {"id": 42}, "card": "h",
                     "total": Decimal128("19.99"), "at": datetime(2026, 7, 1, 12, 0),
                     "meta": json.dumps({"items": 3}), "tier": "gold"})
    assert tx.tx_id == str(oid)
    assert tx.customer_id == "42"
    assert tx.amount == 19.99
    # naive datetime read in the configured zone (EDT = UTC-4)
    assert tx.occurred_at == datetime(2026, 7, 1, 16, 0, tzinfo=UTC).timestamp()
    assert tx.item_count == 3 and tx.extras == {"tier": "gold"}


def test_aware_datetimes_and_iso_strings_keep_their_offset():
    mapper = RowMapper.from_config(BASE)
    plus2 = timezone(timedelta(hours=2))
    for at in (datetime(2026, 1, 1, 2, tzinfo=plus2), "2026-01-01T02:00:00+02:00",
               "2026-01-01T00:00:00Z"):
        assert mapper.map({**ROW, "at": at}).occurred_at == datetime(2026, 1, 1,
                                                                     tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("row", "field"), [
    ({**ROW, "amount": Decimal("-1")}, "amount"),
    ({**ROW, "amount": "NaN"}, "amount"),
    ({**ROW, "at": "yesterday"}, "occurred_at"),
    ({**ROW, "customer": {"nested": 1}}, "customer_id"),
    ({k: v for k, v in ROW.items() if k != "card"}, "payment_instrument"),
    ({**ROW, "card": "4111 1111 1111 1111"}, "payment_instrument"),
])
def test_bad_rows_raise_mapping_error_naming_the_field(row: dict[str, Any], field: str):
    with pytest.raises(MappingError) as err:
        RowMapper.from_config(BASE).map(row)
    assert err.value.field == field and field in str(err.value)


@pytest.mark.parametrize(("cfg", "message"), [
    ({"fields": {"tx_id": "id"}}, "no source for"),
    ({**BASE, "fields": {**BASE["fields"], "amount": {"from": "a", "type": "money"}}},
     "type must be one of"),
    ({**BASE, "timezone": "Mars/Olympus"}, "unknown time zone"),
    ({**BASE, "fields": {**BASE["fields"], "ip": {"from": "x", "path": "a"}}}, "needs type"),
    ({**BASE, "colour": 1}, "unknown keys"),
])
def test_config_errors_are_clear(cfg: dict[str, Any], message: str):
    with pytest.raises(ConfigError, match=message):
        RowMapper.from_config(cfg)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('retailer = "acme"\n[source]\nkind = "oracle"\n')
    with pytest.raises(ConfigError, match=r"source\.kind"):
        CdcConfig.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        CdcConfig.load(tmp_path / "missing.toml")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "retailer: acme\nsource: {kind: mysql, id: s1, user: u, password: p, database: d, "
        "table: t}\nkafka: {bootstrap_servers: 'h:1'}\nmapping:\n  fields: {tx_id: id, "
        "customer_id: c, amount: a, occurred_at: t, payment_instrument: p}\n")
    assert CdcConfig.load(yaml_file).topic == "acme.transactions"


def test_example_configs_load(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("ACME_CDC_PASSWORD", "secret")
    root = Path(__file__).resolve().parents[2] / "examples" / "cdc"
    for name in ("mysql.toml", "mongo.toml"):
        cfg = CdcConfig.load(root / name)
        assert cfg.build_source().source_id == cfg.source_id


def test_json_safe_output_always_encodes():
    raw = {"d": Decimal("1.5"), "b": b"\x00\xff", "t": datetime(2026, 1, 1),
           "day": date(2026, 1, 2), "o": ObjectId(), "ts": Timestamp(1, 2), "n": float("inf"),
           "l": (1, {2}),
           "d128": Decimal128("2.5")}
    out = json.loads(dumps(json_safe(raw)))
    assert out["d"] == "1.5" and out["d128"] == "2.5" and out["n"] == "inf"
    assert out["b"] == "base64:AP8=" and out["t"] == "2026-01-01T00:00:00"
    assert out["day"] == "2026-01-02" and out["o"] == str(raw["o"])
    assert out["l"] == [1, [2]]


def test_apply_update_matches_a_mongo_update():
    doc = {"_id": 1, "a": {"b": [1, 2, 3]}, "gone": 1}
    after = apply_update(doc, {"updatedFields": {"a.b.1": 7, "new.x": 1}, "removedFields": ["gone"],
                               "truncatedArrays": [{"field": "a.b", "newSize": 2}]})
    assert after == {"_id": 1, "a": {"b": [1, 7]}, "new": {"x": 1}}
    assert doc["a"]["b"] == [1, 2, 3], "the pre-image is not modified"


# --- property tests --------------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.binary(max_size=20), st.decimals(allow_nan=True, allow_infinity=True),
    st.datetimes(), st.datetimes(timezones=st.just(UTC)), st.dates(),
    st.builds(ObjectId), st.builds(lambda s: Decimal128(s), st.sampled_from(["1.5", "NaN", "-0",
                                                                             "1E+6000"])),
    st.builds(Timestamp, st.integers(0, 2**31), st.integers(0, 2**31)),
    st.sampled_from(["2026-01-01T00:00:00Z", "4111111111111111", '{"a": {"b": 1}}', "[1,2]",
                     "12.50", "-3", "1e999", "gold", "web", "POS", "true"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6)
columns = st.sampled_from(["id", "customer", "card", "amount", "at", "meta", "x", "a.b", "_id"])
field_specs = st.one_of(columns, st.fixed_dictionaries(
    {"from": columns, "type": st.sampled_from([t for t in TYPES if t != "json"])}),
    st.fixed_dictionaries({"from": columns, "type": st.just("json"),
                           "path": st.sampled_from(["a", "a.b", "0"])}))
canonical = st.sampled_from(["tx_id", "customer_id", "payment_instrument", "amount",
                             "occurred_at", "item_count", "address_mismatch", "channel",
                             "currency", "device_id"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=st.dictionaries(columns, values, max_size=8),
       extra_fields=st.dictionaries(canonical, field_specs, max_size=5),
       extras=st.lists(columns, max_size=2))
def test_mapper_raises_only_mapping_error(row: dict[str, Any], extra_fields: dict[str, Any],
                                          extras: list[str]):
    mapper = RowMapper.from_config({**BASE, "fields": {**BASE["fields"], **extra_fields},
                                    "extras": extras})
    try:
        tx = mapper.map(row)
    except MappingError as exc:
        assert exc.field and str(exc).startswith(exc.field)
        return
    out = tx.to_dict()
    assert math.isfinite(out["amount"]) and out["amount"] >= 0
    json.loads(tx.to_json())


@settings(max_examples=200, deadline=None)
@given(row=values)
def test_mapper_rejects_non_rows_with_mapping_error(row: Any):
    mapper = RowMapper.from_config(BASE)
    if isinstance(row, dict):
        with contextlib.suppress(MappingError):  # a row: mapped, or refused naming a field
            mapper.map(row)
        return
    with pytest.raises(MappingError) as caught:
        mapper.map(row)
    assert caught.value.field == "row"


def _reference_map(mapper: RowMapper, row: Any) -> Any:
    """RowMapper.map (without extras) through the generic FieldSpec.extract, not compiled."""
    from fraud.schema import SchemaError, Transaction

    data: dict[str, Any] = dict(mapper.static)
    for spec in mapper.fields:
        value = spec.extract(row)
        if value is not None:
            data[spec.name] = value
    try:
        return Transaction.from_dict(data)
    except SchemaError as exc:
        raise MappingError(exc.field, exc.message) from None
    except Exception as exc:
        raise MappingError("row", f"{type(exc).__name__}: {exc}") from None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=st.dictionaries(columns, values, max_size=8),
       extra_fields=st.dictionaries(canonical, field_specs, max_size=5))
def test_compiled_fields_agree_with_the_generic_extract(row: dict[str, Any],
                                                        extra_fields: dict[str, Any]):
    mapper = RowMapper.from_config({**BASE, "fields": {**BASE["fields"], **extra_fields}})
    outcomes = []
    for fn in (mapper.map, lambda r: _reference_map(mapper, r)):
        try:
            outcomes.append(("ok", fn(row)))
        except MappingError as exc:
            outcomes.append(("error", (exc.field, exc.message)))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("value", [
    Decimal("12.50"), Decimal("-0"), Decimal("1E+6000"), Decimal("0.000001"),
    Decimal("123456789012345678901234567890.5")])
def test_compiled_decimal_keeps_the_exact_text(value: Decimal):
    spec = RowMapper.from_config(BASE).fields[3]
    assert spec.compile()({"amount": value}) == spec.extract({"amount": value}) == str(value)
