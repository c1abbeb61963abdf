"""Debezium change events -> qsfraud envelopes: the recorded MySQL and MongoDB events of
``tests/streams/fixtures/debezium`` through the example mappings, the logical types, the
errors, and a property test that the decoder raises only DebeziumError."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.config import CdcConfig
from cdc.debezium import DebeziumDecoder, DebeziumError, connect_row, from_extended_json
from cdc.mapping import ConfigError, RowMapper
from fraud.schema import Transaction

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests/streams/fixtures/debezium"
EXAMPLES = ROOT / "examples"


def event(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def decode(decoder: DebeziumDecoder, name: str) -> tuple[dict[str, Any], Transaction | None]:
    env = decoder.envelope(event(name))
    return env, None if env["tx"] is None else Transaction.from_dict(env["tx"])


@pytest.fixture
def mysql_decoder() -> DebeziumDecoder:
    return DebeziumDecoder.load("acme", EXAMPLES / "debezium/mysql.toml", strict=True)


@pytest.fixture
def mongo_decoder() -> DebeziumDecoder:
    # the qsfraud CDC's own config file: its [mapping] is all that is read
    return DebeziumDecoder.load("acme", EXAMPLES / "cdc/mongo.toml", strict=True)


def test_mysql_event_with_schema_maps_as_the_qsfraud_cdc_maps_the_same_row(mysql_decoder):
    env, tx = decode(mysql_decoder, "mysql-schema/02-create.json")
    assert env["op"] == "c" and env["committed_at"] == 1767258121.0 and env["v"] == 1
    assert tx is not None
    # DATETIME(3) 2026-01-01 10:02:00.250 in Europe/Paris; DECIMAL(10,2) 45.50 (precise bytes)
    assert (tx.tx_id, tx.retailer_id, tx.customer_id, tx.payment_instrument) == (
        "1002", "acme", "cust-2", "9f2c0002e1aa")
    assert tx.amount == 45.5 and tx.occurred_at == 1767258120.25 and tx.currency == "EUR"
    assert (tx.device_id, tx.ip, tx.channel, tx.extras) == (
        "dev-2", "203.0.113.2", "app", {"version": 1})
    # the row as qsfraud's MySQL source reads it from the binlog, through the same mapping
    cdc_row = {"id": 1002, "customer_id": "cust-2", "card_hash": "9f2c0002e1aa",
               "amount": Decimal("45.50"), "created_at": datetime(2026, 1, 1, 10, 2, 0, 250000),
               "attrs": '{"device": {"id": "dev-2"}, "ip": "203.0.113.2"}', "channel": "app",
               "version": 1}
    assert mysql_decoder.mapper is not None
    assert mysql_decoder.mapper.map(cdc_row) == tx


@pytest.mark.parametrize("schema", ["schema", "noschema"])
def test_recorded_mariadb_events_map_as_the_hand_built_ones(schema):
    mapping = "mysql.toml" if schema == "schema" else "mysql-schemaless.toml"
    decoder = DebeziumDecoder.load("acme", EXAMPLES / "debezium" / mapping, strict=True)
    recorded = decoder.envelope(event(f"mariadb-recorded-{schema}/03-create.json"))
    commits = {"schema": 1796611716.0, "noschema": 1796611749.0}  # when it was recorded
    assert recorded["op"] == "c" and recorded["committed_at"] == commits[schema]
    written = decoder.envelope(event(f"mysql-{schema}/03-create.json"))
    assert recorded["tx"] == written["tx"]
    tx = Transaction.from_dict(recorded["tx"])
    assert (tx.tx_id, tx.amount, tx.device_id, tx.ip) == ("1003", 999.99, "dev-3",
                                                         "203.0.113.3")


def test_mysql_event_without_schema_with_the_schemaless_mapping(mysql_decoder):
    decoder = DebeziumDecoder.load("acme", EXAMPLES / "debezium/mysql-schemaless.toml")
    env, tx = decode(decoder, "mysql-noschema/02-create.json")
    assert tx is not None and env["op"] == "c" and env["committed_at"] == 1767258121.0
    assert (tx.tx_id, tx.amount, tx.device_id, tx.extras) == ("1002", 45.5, "dev-2",
                                                             {"version": 1})
    assert tx.occurred_at == 1767261720.25  # the wall clock read as UTC: no zone on a number
    # and the same event with its schema, by the other example: all but the zone agree
    _, with_schema = decode(mysql_decoder, "mysql-schema/02-create.json")
    assert with_schema is not None
    assert with_schema.occurred_at == tx.occurred_at - 3600
    assert with_schema.to_dict() | {"occurred_at": 0} == tx.to_dict() | {"occurred_at": 0}


@pytest.mark.parametrize("schema", ["mysql-schema", "mysql-noschema"])
def test_mysql_snapshot_update_delete_and_tombstone(schema):
    mapping = "mysql.toml" if schema == "mysql-schema" else "mysql-schemaless.toml"
    decoder = DebeziumDecoder.load("acme", EXAMPLES / "debezium" / mapping, strict=True)
    env, tx = decode(decoder, f"{schema}/01-snapshot-read.json")
    assert env["op"] == "r" and tx is not None and tx.amount == 129.9 and tx.tx_id == "1001"
    env, tx = decode(decoder, f"{schema}/04-update.json")
    assert env["op"] == "u" and tx is not None and tx.tx_id == "1002"
    assert tx.channel == "web" and tx.extras == {"version": 2}
    env, tx = decode(decoder, f"{schema}/05-delete.json")
    assert (env["op"], tx, env["committed_at"]) == ("d", None, 1767258301.0)
    assert event(f"{schema}/06-tombstone.json") is None
    assert decoder.envelope(None)["op"] == "d" and decoder.envelope(None)["tx"] is None


def test_schemaless_precise_decimal_is_an_error_naming_the_field():
    decoder = DebeziumDecoder.load("acme", EXAMPLES / "debezium/mysql-schemaless.toml")
    with pytest.raises(DebeziumError) as err:
        decoder.envelope(event("mysql-noschema/07-precise-decimal.json"))
    assert err.value.reason == "invalid" and err.value.message.startswith("amount:")


def test_mongo_events_with_the_qsfraud_cdc_mapping(mongo_decoder):
    env, tx = decode(mongo_decoder, "mongo/02-create.json")
    assert tx is not None and env["op"] == "c" and env["committed_at"] == 1767258121.0
    assert (tx.tx_id, tx.retailer_id, tx.customer_id, tx.payment_instrument) == (
        "65a1b2c3d4e5f60718293a02", "acme", "cust-2", "tok_0002")
    assert (tx.amount, tx.occurred_at, tx.currency, tx.channel, tx.item_count, tx.extras) == (
        45.5, 1767258120.25, "USD", "app", 2, {"version": 1})
    # relaxed extended JSON: an ISO $date, plain numbers
    env, tx = decode(mongo_decoder, "mongo/03-create-relaxed.json")
    assert tx is not None and tx.occurred_at == 1767258180.25 and tx.item_count == 3
    assert tx.amount == 999.99 and tx.channel == "pos"
    env, tx = decode(mongo_decoder, "mongo/01-snapshot-read.json")
    assert env["op"] == "r" and tx is not None and tx.amount == 129.9
    env, tx = decode(mongo_decoder, "mongo/04-update-full.json")
    assert env["op"] == "u" and tx is not None and tx.extras == {"version": 2}
    env, tx = decode(mongo_decoder, "mongo/06-delete.json")
    assert (env["op"], tx) == ("d", None)
    assert event("mongo/07-tombstone.json") is None and mongo_decoder.envelope(None)["op"] == "d"


@pytest.mark.parametrize("schema", ["schema", "noschema"])
def test_recorded_mongo_events_map_as_the_hand_built_ones(mongo_decoder, schema):
    recorded = mongo_decoder.envelope(event(f"mongo-recorded-{schema}/03-create.json"))
    written = mongo_decoder.envelope(event("mongo/03-create-relaxed.json"))
    assert recorded["op"] == "c" and recorded["tx"] == written["tx"]
    env, tx = decode(mongo_decoder, f"mongo-recorded-{schema}/01-snapshot-read.json")
    assert env["op"] == "r" and tx is not None and tx.occurred_at == 1767258060.25
    assert (tx.tx_id, tx.amount, tx.item_count) == ("65a1b2c3d4e5f60718293a01", 129.9, 2)
    if schema == "noschema":  # capture.mode=change_streams_update_full: the whole document
        env, tx = decode(mongo_decoder, "mongo-recorded-noschema/04-update.json")
        assert env["op"] == "u" and tx is not None and tx.extras == {"version": 2}
    else:  # capture.mode=change_streams: only the changed fields
        with pytest.raises(DebeziumError, match=r"capture\.mode=change_streams_update_full"):
            mongo_decoder.envelope(event("mongo-recorded-schema/04-update-without-after.json"))


def test_mongo_update_without_its_document_says_which_capture_mode_gives_it(mongo_decoder):
    with pytest.raises(DebeziumError, match=r"capture\.mode=change_streams_update_full"):
        mongo_decoder.envelope(event("mongo/05-update-without-after.json"))


def test_the_mongo_document_maps_as_the_qsfraud_cdc_maps_the_driver_document(mongo_decoder):
    from bson import json_util

    raw = event("mongo/02-create.json")["after"]
    driver_doc = json_util.loads(raw)  # ObjectId, Decimal128, datetime: as pymongo gives them
    mapper = mongo_decoder.mapper
    assert mapper is not None
    assert mapper.map(driver_doc) == mapper.map(from_extended_json(json.loads(raw)))


def test_without_a_mapping_rows_with_canonical_names_work_and_retailer_defaults():
    decoder = DebeziumDecoder("acme")
    after = {"tx_id": "t1", "amount": "12.50", "customer_id": "c1",
             "payment_instrument": "p1", "occurred_at": 1767225600.0, "extra_col": 3}
    env = decoder.envelope({"op": "c", "after": after, "source": {"ts_ms": 5000}})
    tx = Transaction.from_dict(env["tx"])
    assert (tx.retailer_id, tx.amount, tx.extras, env["committed_at"]) == (
        "acme", 12.5, {"extra_col": 3}, 5.0)
    other = decoder.envelope({"op": "c", "after": {**after, "retailer_id": "globex"},
                              "source": {}})
    assert other["tx"]["retailer_id"] == "globex" and other["committed_at"] is None


def test_with_schema_logical_types_are_decoded():
    schema = {"fields": [
        {"field": "neg", "type": "bytes", "name": "org.apache.kafka.connect.data.Decimal",
         "parameters": {"scale": "3"}},
        {"field": "us", "type": "int64", "name": "io.debezium.time.MicroTimestamp"},
        {"field": "ns", "type": "int64", "name": "io.debezium.time.NanoTimestamp"},
        {"field": "zoned", "type": "string", "name": "io.debezium.time.ZonedTimestamp"},
        {"field": "blob", "type": "bytes"},
        {"field": "var", "type": "struct", "name": "io.debezium.data.VariableScaleDecimal"}]}
    row = connect_row({"neg": "/w==", "us": 1_000_001, "ns": 2_000_000_000,
                       "zoned": "2026-01-01T09:00:00Z", "blob": "aGk=",
                       "var": {"scale": 1, "value": "Dw=="}, "none": None}, schema)
    assert row == {"neg": Decimal("-0.001"), "us": datetime(1970, 1, 1, 0, 0, 1, 1),
                   "ns": datetime(1970, 1, 1, 0, 0, 2), "zoned": "2026-01-01T09:00:00Z",
                   "blob": b"hi", "var": Decimal("1.5"), "none": None}


@pytest.mark.parametrize(("value", "reason", "words"), [
    ({"op": "t", "after": None, "source": {}}, "invalid", "op 't'"),
    ({"op": "c", "after": None, "source": {}}, "invalid", "a create without 'after'"),
    ({"op": "c", "after": [1], "source": {}}, "invalid", "after: expected a row"),
    ({"op": "c", "after": "{nope", "source": {}}, "invalid", "after: not JSON"),
    ({"op": "c", "after": "[1]", "source": {}}, "invalid", "expected a document"),
    ({"op": "c", "after": {}, "source": []}, "invalid", "source: expected an object"),
    ({"op": "c", "after": {}, "source": {"ts_ms": "x"}}, "invalid", "source.ts_ms"),
    ({"op": "c", "after": {}, "source": {"ts_ms": True}}, "invalid", "source.ts_ms"),
    ({"op": "c", "after": {}, "source": {"ts_ms": float("nan")}}, "invalid", "source.ts_ms"),
    ({"op": "c", "after": {}, "source": {}, "ts_ms": 10**400}, "invalid", "ts_ms"),
    ({"op": "c", "after": {}, "source": {"ts_ms": 10**5000}}, "invalid", "int of 16610 bits"),
    ({"op": "c", "after": '{"_id": {"$numberLong": "y"}}', "source": {}},
     "invalid", "bad extended JSON"),
    ({"schema": {"fields": [{"field": "after", "fields": [
        {"field": "a", "type": "bytes", "name": "org.apache.kafka.connect.data.Decimal"}]}]},
      "payload": {"op": "c", "after": {"a": "not base64!"}, "source": {}}},
     "invalid", "after.a: not a valid org.apache.kafka.connect.data.Decimal"),
    ({"v": 1, "op": "c", "tx": {}, "source": {}}, "not-debezium", "expected a Debezium"),
    ([1, 2], "not-debezium", "got list"),
])
def test_malformed_events_raise_debezium_errors_with_their_reason(value, reason, words):
    with pytest.raises(DebeziumError) as err:
        DebeziumDecoder("acme", strict=True).envelope(value)
    assert err.value.reason == reason and words in err.value.message


def test_shape_detection_claims_debezium_and_leaves_qsfraud_records_alone():
    auto = DebeziumDecoder("acme")
    assert auto.claims(event("mysql-schema/02-create.json"))
    assert auto.claims(event("mysql-noschema/02-create.json"))
    assert auto.claims(event("mongo/02-create.json"))
    assert not auto.claims({"v": 1, "op": "c", "tx": {}, "before": None, "source": {}})
    assert not auto.claims({"tx_id": "t", "amount": 1})
    assert not auto.claims([1])
    assert DebeziumDecoder("acme", strict=True).claims({"tx_id": "t"})


def test_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        DebeziumDecoder.load("acme", tmp_path / "absent.toml")
    (tmp_path / "none.toml").write_text('retailer = "acme"\n')
    with pytest.raises(ConfigError, match="no \\[mapping\\] table"):
        DebeziumDecoder.load("acme", tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[mapping\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        DebeziumDecoder.load("acme", tmp_path / "bad.toml")
    (tmp_path / "m.yaml").write_text(
        "mapping:\n  fields: {tx_id: id, customer_id: c, payment_instrument: p,\n"
        "           amount: a, occurred_at: t}\n")
    decoder = DebeziumDecoder.load("acme", tmp_path / "m.yaml")
    assert decoder.mapper is not None and decoder.mapper.static == {"retailer_id": "acme"}
    (tmp_path / "partial.toml").write_text('[mapping.fields]\ntx_id = "id"\n')
    with pytest.raises(ConfigError, match="no source for"):
        DebeziumDecoder.load("acme", tmp_path / "partial.toml")
    # the qsfraud CDC config files parse as CDC configs and as worker mappings alike
    for name in ("mysql.toml", "mongo.toml"):
        cdc = CdcConfig.load(EXAMPLES / "cdc" / name)
        worker = DebeziumDecoder.load(cdc.retailer, EXAMPLES / "cdc" / name)
        assert isinstance(worker.mapper, RowMapper) and worker.mapper == cdc.mapper


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
_extended = st.dictionaries(
    st.sampled_from(["$oid", "$date", "$numberDecimal", "$numberLong", "$numberInt",
                     "$numberDouble", "$binary", "$type", "$uuid", "$timestamp", "$symbol"]),
    _json, min_size=1, max_size=2)
_row = st.dictionaries(st.sampled_from(["id", "customer_id", "card_hash", "amount",
                                        "created_at", "attrs", "channel", "version"]),
                       _json | _extended, max_size=8)
_event = st.fixed_dictionaries(
    {"op": st.sampled_from(["c", "r", "u", "d", "t", "x"]) | _json,
     "after": st.none() | _row | _row.map(json.dumps) | _json,
     "source": st.fixed_dictionaries({}, optional={"ts_ms": _json}) | _json},
    optional={"before": _json, "ts_ms": _json})
_schema = st.fixed_dictionaries({"fields": st.lists(st.fixed_dictionaries(
    {"field": st.just("after"), "fields": st.lists(st.fixed_dictionaries(
        {"field": st.sampled_from(["amount", "created_at", "version"]),
         "type": st.sampled_from(["bytes", "int64", "string"]),
         "name": st.sampled_from(["org.apache.kafka.connect.data.Decimal",
                                  "io.debezium.time.Timestamp", "io.debezium.time.Date",
                                  "io.debezium.data.VariableScaleDecimal"]) | _json,
         "parameters": st.fixed_dictionaries({"scale": _json})}), max_size=3)}),
    max_size=1)}) | _json


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_event | st.fixed_dictionaries({"schema": _schema, "payload": _event | _json})
       | _json)
def test_the_decoder_raises_only_debezium_errors(value):
    decoder = DebeziumDecoder.load("acme", EXAMPLES / "debezium/mysql.toml", strict=True)
    try:
        env = decoder.envelope(value)
    except DebeziumError as exc:
        assert exc.reason in ("invalid", "not-debezium") and exc.message
    else:
        assert env["op"] in ("c", "r", "u", "d")
        if env["tx"] is not None:
            Transaction.from_dict(env["tx"])
